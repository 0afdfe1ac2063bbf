#include "vae.h"

#include "common.h"
#include "layers.h"
#include "params.h"

namespace fm {

VaeConfig VaeConfig::infer(const ComponentWeights &w) {
    VaeConfig c;
    const TensorRef &conv_in = w.get("decoder.conv_in.weight");  // ne [3, 3, z, top]
    c.z_channels = conv_in.ne[2];
    c.top_channels = conv_in.ne[3];
    const TensorRef &conv_out = w.get("decoder.conv_out.weight");  // ne [3, 3, ch, out]
    c.ch = conv_out.ne[2];
    c.out_channels = conv_out.ne[3];
    c.levels = w.count_indexed("decoder.up.");
    if (c.levels == 0) fail_value("the VAE decoder has no up levels");
    c.num_res_blocks = w.count_indexed("decoder.up.0.block.") - 1;
    if (c.num_res_blocks < 1) fail_value("the VAE decoder's up.0 level has no resnet blocks");
    c.has_encoder = w.has("encoder.conv_in.weight");
    c.in_channels = c.has_encoder ? w.get("encoder.conv_in.weight").ne[2] : 3;
    if (c.ch % 32 != 0 || c.top_channels % 32 != 0)
        fail_value("VAE channel counts (%lld, %lld) must be multiples of 32 for GroupNorm(32)", (long long)c.ch,
                   (long long)c.top_channels);
    return c;
}

std::vector<std::pair<std::string, int64_t>> VaeConfig::items() const {
    return {{"z_channels", z_channels}, {"base_channels", ch}, {"top_channels", top_channels},
            {"levels", levels},         {"res_blocks", num_res_blocks}, {"has_encoder", has_encoder ? 1 : 0}};
}

struct VaeNet::Impl {
    Backend &backend;
    VaeConfig cfg;
    ParamStore params;
    Impl(Backend &b, const ComponentWeights &w) : backend(b), cfg(VaeConfig::infer(w)), params(b, w) {}
};

VaeNet::VaeNet(Backend &backend, const ComponentWeights &weights) : impl_(new Impl(backend, weights)) {}
VaeNet::~VaeNet() = default;
const VaeConfig &VaeNet::config() const { return impl_->cfg; }
void VaeNet::load() { impl_->params.materialize(); }
void VaeNet::release() { impl_->params.release(); }
bool VaeNet::loaded() const { return impl_->params.bytes() > 0; }
size_t VaeNet::weight_bytes() const { return impl_->params.bytes(); }

std::vector<float> VaeNet::decode(const float *, int64_t, int64_t, const VaeTiling &) {
    fail_runtime("the VAE decoder is not implemented yet");
}
std::vector<float> VaeNet::encode(const float *, int64_t, int64_t, const VaeTiling &) {
    fail_runtime("the VAE encoder is not implemented yet");
}

}  // namespace fm
