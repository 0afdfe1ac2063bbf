#include "network.h"

#include "common.h"

#include <ggml-alloc.h>

#include <cmath>
#include <cstring>

namespace fm {

Network::Network(Backend &backend, const ComponentWeights &weights, const EngineOptions &options)
    : backend_(backend), weights_(weights), options_(options), params_(backend, weights), runner_(backend, options) {}

Network::~Network() { free_adapters(); }

void Network::load() { params_.materialize(); }

void Network::set_memory_policy(const MemoryPolicy &policy) {
    policy_ = policy;
    StreamSettings s;
    s.on = policy.stream && backend_.is_cpu();  // other backends hold copies, nothing to stream
    s.evict = policy.evict;
    runner_.release();  // segments are planned when a graph is built
    runner_.set_streaming(s);
}

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
    l.adapters = &adapters_[prefix];
    linear_shapes_[prefix] = {in, out};
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

// Each adapter adds at most five nodes (two matmuls, a scale, an add or acc, one view).
constexpr size_t kNodesPerAdapter = 6;

void Network::set_graph_nodes(size_t base) {
    base_nodes_ = base;
    runner_.set_max_nodes(graph_nodes());
}

size_t Network::graph_nodes() const { return base_nodes_ + kNodesPerAdapter * adapter_count_; }

std::vector<LinearInfo> Network::linears() const {
    std::vector<LinearInfo> out;
    for (auto &kv : linear_shapes_) out.push_back({kv.first, kv.second.first, kv.second.second});
    return out;
}

size_t Network::adapter_bytes() const { return adapter_buf_ ? ggml_backend_buffer_get_size(adapter_buf_) : 0; }

void Network::free_adapters() {
    for (auto &kv : adapters_) kv.second.clear();
    if (adapter_buf_) ggml_backend_buffer_free(adapter_buf_);
    adapter_buf_ = nullptr;
    if (adapter_ctx_) ggml_free(adapter_ctx_);
    adapter_ctx_ = nullptr;
    adapter_count_ = 0;
}

void Network::set_adapters(const std::vector<AdapterSpec> &specs) {
    const char *comp = component_name(component());
    for (const AdapterSpec &a : specs) {
        auto it = linear_shapes_.find(a.target);
        if (it == linear_shapes_.end())
            fail_value("adapter for '%s': the %s network has no linear layer of that name", a.target.c_str(), comp);
        const int64_t in = it->second.first, out = it->second.second;
        if (a.type != GGML_TYPE_F32 && a.type != GGML_TYPE_F16 && a.type != GGML_TYPE_BF16)
            fail_value("adapter for '%s': factors must be F32, F16 or BF16, not %s", a.target.c_str(),
                       ggml_type_name(a.type));
        if (a.rank < 1 || a.rows < 1 || !a.down || !a.up)
            fail_value("adapter for '%s': empty factors", a.target.c_str());
        const int64_t want_in = a.on_output ? out : in;
        if (a.in != want_in)
            fail_value("adapter for '%s' reads %lld features; the layer's %s has %lld", a.target.c_str(),
                       (long long)a.in, a.on_output ? "output" : "input", (long long)want_in);
        if (a.row0 < 0 || a.row0 + a.rows > out)
            fail_value("adapter for '%s' writes rows %lld..%lld; the layer has %lld outputs", a.target.c_str(),
                       (long long)a.row0, (long long)(a.row0 + a.rows), (long long)out);
        if (!std::isfinite(a.scale)) fail_value("adapter for '%s': the scale is not a finite number", a.target.c_str());
    }
    runner_.release();  // graphs hold the old adapters' nodes
    free_adapters();
    if (specs.empty()) {
        runner_.set_max_nodes(graph_nodes());
        return;
    }
    ggml_init_params ip{ggml_tensor_overhead() * (2 * specs.size() + 1), nullptr, true};
    adapter_ctx_ = ggml_init(ip);
    if (!adapter_ctx_) fail_runtime("out of memory for the adapters");
    std::vector<std::pair<ggml_tensor *, const void *>> data;
    for (const AdapterSpec &a : specs) {
        LowRankAdapter la;
        la.down = ggml_new_tensor_2d(adapter_ctx_, a.type, a.in, a.rank);
        la.up = ggml_new_tensor_2d(adapter_ctx_, a.type, a.rank, a.rows);
        la.scale = a.scale;
        la.row0 = a.row0;
        la.on_output = a.on_output;
        data.push_back({la.down, a.down});
        data.push_back({la.up, a.up});
        adapters_[a.target].push_back(la);
    }
    adapter_count_ = specs.size();
    adapter_buf_ = ggml_backend_alloc_ctx_tensors(adapter_ctx_, backend_.main());
    if (!adapter_buf_) {
        free_adapters();
        fail_runtime("out of %s memory for the adapters", backend_.name().c_str());
    }
    ggml_backend_buffer_set_usage(adapter_buf_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (auto &d : data) ggml_backend_tensor_set(d.first, d.second, 0, ggml_nbytes(d.first));
    runner_.set_max_nodes(graph_nodes());
}

}  // namespace fm
