#include "network.h"

#include "common.h"

#include <ggml-alloc.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>

namespace fm {

Network::Network(Backend &backend, const ComponentWeights &weights, const EngineOptions &options)
    : backend_(backend), weights_(weights), options_(options), params_(backend, weights), runner_(backend, options) {}

Network::~Network() {
    undo_merge();
    free_adapters();
}

void Network::load() {
    if (loaded()) return;
    params_.materialize();
    if (merge_) apply_merge();
}

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
    undo_merge();
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
    linear_weights_[prefix] = l.w;
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

void Network::check_adapters(const std::vector<AdapterSpec> &specs, bool merge) const {
    const char *comp = component_name(component());
    for (const AdapterSpec &a : specs) {
        const ggml_tensor *w = linear_weights_.count(a.target) ? linear_weights_.at(a.target) : nullptr;
        if (merge && !a.on_output && w && w->type != GGML_TYPE_F32 && w->type != GGML_TYPE_F16)
            fail_value("cannot merge a LoRA into layer '%s' of the %s network: its weight is %s; merging needs F16 "
                       "or F32 weights (a quantized weight would lose the adapter to rounding). Apply it at run time "
                       "instead (lora_mode=\"runtime\", the default)", a.target.c_str(), comp, ggml_type_name(w->type));
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
}

void Network::set_adapters(const std::vector<AdapterSpec> &specs, bool merge) {
    check_adapters(specs, merge);
    runner_.release();  // graphs hold the old adapters' nodes
    undo_merge();
    free_adapters();
    merge_ = merge && !specs.empty();
    if (specs.empty()) {
        runner_.set_max_nodes(graph_nodes());
        return;
    }
    ggml_init_params ip{ggml_tensor_overhead() * (2 * specs.size() + 1), nullptr, true};
    adapter_ctx_ = ggml_init(ip);
    if (!adapter_ctx_) fail_runtime("out of memory for the adapters");
    std::map<std::string, std::vector<AdapterFactors>> per_layer;
    for (const AdapterSpec &a : specs)
        per_layer[a.target].push_back({a.row0, a.on_output, a.scale, a.type, a.rank, a.in, a.rows, a.down, a.up});
    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> data;
    for (auto &kv : per_layer) adapters_[kv.first] = pack_adapters(adapter_ctx_, kv.second, data);
    adapter_count_ = specs.size();
    adapter_buf_ = ggml_backend_alloc_ctx_tensors(adapter_ctx_, backend_.main());
    if (!adapter_buf_) {
        free_adapters();
        fail_runtime("out of %s memory for the adapters", backend_.name().c_str());
    }
    ggml_backend_buffer_set_usage(adapter_buf_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (auto &d : data) ggml_backend_tensor_set(d.first, d.second.data(), 0, ggml_nbytes(d.first));
    runner_.set_max_nodes(graph_nodes());
    if (merge_ && loaded()) apply_merge();
}

void Network::undo_merge() {
    for (const Swapped &s : swapped_) {
        s.tensor->buffer = s.buffer;
        s.tensor->data = s.data;
        s.tensor->extra = s.extra;
    }
    swapped_.clear();
    if (merge_buf_) ggml_backend_buffer_free(merge_buf_);
    merge_buf_ = nullptr;
    for (auto &kv : adapters_)
        for (LoraPack &pk : kv.second) pk.merged = false;
}

void Network::apply_merge() {
    undo_merge();
    runner_.release();
    std::vector<std::pair<std::string, ggml_tensor *>> layers;
    for (auto &kv : adapters_)
        for (const LoraPack &pk : kv.second)
            if (!pk.on_output) {
                layers.emplace_back(kv.first, linear_weights_.at(kv.first));
                break;
            }
    if (layers.empty()) return;
    ggml_backend_buffer_type_t buft = ggml_backend_get_default_buffer_type(backend_.main());
    const size_t align = ggml_backend_buft_get_alignment(buft);
    size_t total = 0;
    for (auto &l : layers) total += (ggml_nbytes(l.second) + align - 1) / align * align;
    merge_buf_ = ggml_backend_buft_alloc_buffer(buft, total);
    if (!merge_buf_)
        fail_runtime("out of memory: merging the LoRA needs %.1f MiB for copies of the adapted weights",
                     total / 1048576.0);
    ggml_backend_buffer_set_usage(merge_buf_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    uint8_t *base = static_cast<uint8_t *>(ggml_backend_buffer_get_base(merge_buf_));
    size_t off = 0;
    std::vector<float> w, down;
    std::vector<uint8_t> raw;
    for (auto &l : layers) {
        ggml_tensor *t = l.second;
        const int64_t in = t->ne[0], out = t->ne[1];
        // W in F32, read from the file again (never from a weight merged before)
        const TensorRef &src = weights_.get(l.first + ".weight");
        if (src.nelements() != in * out) fail_runtime("internal error: '%s' changed shape", l.first.c_str());
        w.resize(size_t(in * out));
        convert_to_f32(src.type, src.data, w.data(), in * out);
        // W[row0 + j] += scale · Σ_k up[j][k] · down[k] (an axpy along the input per k)
        for (LoraPack &pk : adapters_.at(l.first)) {
            if (pk.on_output) continue;
            const int64_t r_all = pk.down->ne[1];
            raw.resize(ggml_nbytes(pk.down));
            ggml_backend_tensor_get(pk.down, raw.data(), 0, raw.size());
            down.resize(size_t(in * r_all));
            convert_to_f32(pk.down->type, raw.data(), down.data(), in * r_all);
            raw.resize(ggml_nbytes(pk.up_t));
            ggml_backend_tensor_get(pk.up_t, raw.data(), 0, raw.size());
            std::vector<float> up_t(size_t(ggml_nelements(pk.up_t)));
            convert_to_f32(pk.up_t->type, raw.data(), up_t.data(), int64_t(up_t.size()));
            for (const LoraPack::Part &p : pk.parts) {
                auto rows = [&](int64_t j0, int64_t j1) {
                    for (int64_t j = j0; j < j1; ++j) {
                        float *wr = w.data() + (p.row0 + j) * in;
                        for (int64_t k = 0; k < p.rank; ++k) {
                            const float c = p.scale * up_t[size_t(p.up_offset + k * p.rows + j)];
                            const float *d = down.data() + (p.k0 + k) * in;
                            for (int64_t i = 0; i < in; ++i) wr[i] += c * d[i];
                        }
                    }
                };
                const int nt = int(std::min<int64_t>(std::max(1, backend_.threads()), std::max<int64_t>(1, p.rows / 64)));
                std::vector<std::thread> pool;
                for (int t = 1; t < nt; ++t) pool.emplace_back(rows, p.rows * t / nt, p.rows * (t + 1) / nt);
                rows(0, p.rows / nt);
                for (auto &th : pool) th.join();
            }
            pk.merged = true;
        }
        void *dst = base + off;
        off += (ggml_nbytes(t) + align - 1) / align * align;
        swapped_.push_back({t, t->buffer, t->data, t->extra});
        t->buffer = merge_buf_;
        t->data = dst;
        t->extra = nullptr;  // a plain copy, whatever layout the file's weight was given
        if (t->type == GGML_TYPE_F16) {
            raw.resize(ggml_nbytes(t));
            ggml_fp32_to_fp16_row(w.data(), reinterpret_cast<ggml_fp16_t *>(raw.data()), in * out);
            ggml_backend_tensor_set(t, raw.data(), 0, raw.size());
        } else {
            ggml_backend_tensor_set(t, w.data(), 0, w.size() * sizeof(float));
        }
    }
}

}  // namespace fm
