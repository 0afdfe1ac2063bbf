#include "flux.h"

#include "common.h"
#include "layers.h"
#include "params.h"

namespace fm {

FluxConfig FluxConfig::infer(const ComponentWeights &w) {
    FluxConfig c;
    const TensorRef &img_in = w.get("img_in.weight");
    c.in_channels = img_in.ne[0];
    c.hidden = img_in.ne[1];
    c.depth = w.count_indexed("double_blocks.");
    c.depth_single = w.count_indexed("single_blocks.");
    if (c.depth == 0 && c.depth_single == 0)
        fail_value("the diffusion model has no double_blocks or single_blocks tensors; it is not a Flux model");
    const std::string qn = c.depth > 0 ? "double_blocks.0.img_attn.norm.query_norm.scale"
                                       : "single_blocks.0.norm.query_norm.scale";
    c.head_dim = w.get(qn).ne[0];
    if (c.head_dim != 128)
        fail_value("Flux head_dim is %lld (length of %s) but Flux's 3-axis RoPE (16/56/56) needs 128",
                   (long long)c.head_dim, qn.c_str());
    if (c.hidden % c.head_dim != 0)
        fail_value("Flux hidden size %lld is not a multiple of head_dim %lld", (long long)c.hidden,
                   (long long)c.head_dim);
    c.heads = c.hidden / c.head_dim;
    c.mlp_hidden = c.depth > 0 ? w.get("double_blocks.0.img_mlp.0.weight").ne[1]
                               : w.get("single_blocks.0.linear1.weight").ne[1] - 3 * c.hidden;
    c.context_dim = w.get("txt_in.weight").ne[0];
    c.vec_dim = w.get("vector_in.in_layer.weight").ne[0];
    c.guidance = w.has("guidance_in.in_layer.weight");
    if (c.in_channels % 4 != 0) fail_value("img_in takes %lld features, not 4 x latent channels", (long long)c.in_channels);
    return c;
}

std::vector<std::pair<std::string, int64_t>> FluxConfig::items() const {
    return {{"hidden", hidden},           {"heads", heads},          {"head_dim", head_dim},
            {"double_blocks", depth},     {"single_blocks", depth_single}, {"mlp_hidden", mlp_hidden},
            {"latent_channels", in_channels / 4}, {"context_dim", context_dim}, {"vec_dim", vec_dim},
            {"guidance_embed", guidance ? 1 : 0}};
}

struct FluxNet::Impl {
    Backend &backend;
    FluxConfig cfg;
    ParamStore params;
    bool flash_attn = true;
    Impl(Backend &b, const ComponentWeights &w) : backend(b), cfg(FluxConfig::infer(w)), params(b, w) {}
};

FluxNet::FluxNet(Backend &backend, const ComponentWeights &weights) : impl_(new Impl(backend, weights)) {}
FluxNet::~FluxNet() = default;
const FluxConfig &FluxNet::config() const { return impl_->cfg; }
void FluxNet::load() { impl_->params.materialize(); }
void FluxNet::release() { impl_->params.release(); }
bool FluxNet::loaded() const { return impl_->params.bytes() > 0; }
size_t FluxNet::weight_bytes() const { return impl_->params.bytes(); }
void FluxNet::set_flash_attn(bool on) { impl_->flash_attn = on; }

std::vector<float> FluxNet::forward(const float *, int64_t, int64_t, float, float, const float *, int64_t,
                                    const float *) {
    fail_runtime("the Flux forward pass is not implemented yet");
}

}  // namespace fm
