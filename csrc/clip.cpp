#include "clip.h"

#include "common.h"
#include "layers.h"
#include "params.h"

namespace fm {

ClipConfig ClipConfig::infer(const ComponentWeights &w) {
    ClipConfig c;
    const TensorRef &tok = w.get("text_model.embeddings.token_embedding.weight");
    c.hidden = tok.ne[0];
    c.vocab = tok.ne[1];
    c.positions = w.get("text_model.embeddings.position_embedding.weight").ne[1];
    c.layers = w.count_indexed("text_model.encoder.layers.");
    if (c.layers == 0) fail_value("the CLIP-L weights have no encoder layers");
    c.mlp = w.get("text_model.encoder.layers.0.mlp.fc1.weight").ne[1];
    if (c.hidden % 64 != 0) fail_value("CLIP hidden size %lld is not a multiple of the head size 64", (long long)c.hidden);
    c.heads = c.hidden / 64;
    return c;
}

std::vector<std::pair<std::string, int64_t>> ClipConfig::items() const {
    return {{"vocab", vocab}, {"positions", positions}, {"hidden", hidden},
            {"heads", heads}, {"layers", layers},       {"mlp", mlp}};
}

struct ClipNet::Impl {
    Backend &backend;
    ClipConfig cfg;
    ParamStore params;
    Impl(Backend &b, const ComponentWeights &w) : backend(b), cfg(ClipConfig::infer(w)), params(b, w) {}
};

ClipNet::ClipNet(Backend &backend, const ComponentWeights &weights) : impl_(new Impl(backend, weights)) {}
ClipNet::~ClipNet() = default;
const ClipConfig &ClipNet::config() const { return impl_->cfg; }
void ClipNet::load() { impl_->params.materialize(); }
void ClipNet::release() { impl_->params.release(); }
bool ClipNet::loaded() const { return impl_->params.bytes() > 0; }
size_t ClipNet::weight_bytes() const { return impl_->params.bytes(); }

std::vector<float> ClipNet::encode(const int32_t *, int64_t) {
    fail_runtime("the CLIP-L encoder is not implemented yet");
}

}  // namespace fm
