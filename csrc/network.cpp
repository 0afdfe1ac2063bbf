#include "network.h"

namespace fm {

Network::Network(Backend &backend, const ComponentWeights &weights, const EngineOptions &options)
    : backend_(backend), weights_(weights), options_(options), params_(backend, weights), runner_(backend, options) {}

Network::~Network() = default;

void Network::load() { params_.materialize(); }

void Network::release() {
    runner_.release();
    params_.release();
}

Ops Network::ops(ggml_context *ctx) const {
    Ops o{ctx, backend_};
    o.exact = params_.all_f32();
    return o;
}

Linear Network::declare_linear(const std::string &prefix, int64_t in, int64_t out, bool bias) {
    Linear l;
    l.w = params_.declare(prefix + ".weight", ParamKind::Matmul, {in, out});
    if (bias) l.b = params_.declare(prefix + ".bias", ParamKind::F32, {out});
    return l;
}

Norm Network::declare_norm(const std::string &prefix, int64_t n, bool bias) {
    Norm p;
    p.w = params_.declare(prefix + ".weight", ParamKind::F32, {n});
    if (bias) p.b = params_.declare(prefix + ".bias", ParamKind::F32, {n});
    return p;
}

ggml_tensor *Network::declare_f32(const std::string &name, std::initializer_list<int64_t> ne) {
    return params_.declare(name, ParamKind::F32, ne);
}

}  // namespace fm
