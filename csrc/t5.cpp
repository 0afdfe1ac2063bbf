#include "t5.h"

#include "common.h"
#include "layers.h"
#include "params.h"

namespace fm {

T5Config T5Config::infer(const ComponentWeights &w) {
    T5Config c;
    const TensorRef &shared = w.get("shared.weight");
    c.d_model = shared.ne[0];
    c.vocab = shared.ne[1];
    c.layers = w.count_indexed("encoder.block.");
    if (c.layers == 0) fail_value("the T5 weights have no encoder blocks");
    const TensorRef &rel = w.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
    c.heads = rel.ne[0];
    c.buckets = rel.ne[1];
    const int64_t inner = w.get("encoder.block.0.layer.0.SelfAttention.q.weight").ne[1];
    if (c.heads <= 0 || inner % c.heads != 0)
        fail_value("T5 attention width %lld is not a multiple of the %lld heads", (long long)inner, (long long)c.heads);
    c.d_kv = inner / c.heads;
    c.d_ff = w.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").ne[1];
    return c;
}

std::vector<std::pair<std::string, int64_t>> T5Config::items() const {
    return {{"vocab", vocab}, {"d_model", d_model}, {"heads", heads}, {"d_kv", d_kv},
            {"d_ff", d_ff},   {"layers", layers},   {"buckets", buckets}};
}

struct T5Net::Impl {
    Backend &backend;
    T5Config cfg;
    ParamStore params;
    Impl(Backend &b, const ComponentWeights &w) : backend(b), cfg(T5Config::infer(w)), params(b, w) {}
};

T5Net::T5Net(Backend &backend, const ComponentWeights &weights) : impl_(new Impl(backend, weights)) {}
T5Net::~T5Net() = default;
const T5Config &T5Net::config() const { return impl_->cfg; }
void T5Net::load() { impl_->params.materialize(); }
void T5Net::release() { impl_->params.release(); }
bool T5Net::loaded() const { return impl_->params.bytes() > 0; }
size_t T5Net::weight_bytes() const { return impl_->params.bytes(); }

std::vector<float> T5Net::encode(const int32_t *, int64_t) {
    fail_runtime("the T5 encoder is not implemented yet");
}

}  // namespace fm
