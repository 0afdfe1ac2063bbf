// What every network (Flux, CLIP-L, T5, VAE) has, written once: its parameters (ParamStore),
// its graph runner, the engine options, load / release, and helpers to declare parameters and
// set up a graph's Ops. A network's own file then holds only its configuration and its math.
#pragma once

#include "backend.h"
#include "layers.h"
#include "memory.h"
#include "options.h"
#include "params.h"
#include "weights.h"

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace fm {

// Inferred hyper-parameters as (name, value) pairs, for info().
using ConfigItems = std::vector<std::pair<std::string, int64_t>>;

// One low-rank adapter to attach to a linear layer (see AdapterFactors): factors in their file
// type (F32, F16 or BF16), row-major as stored by PyTorch: down [rank, in_features], up
// [rows, rank]. The data is copied by set_adapters().
struct AdapterSpec {
    std::string target;  // the linear layer's name, e.g. "double_blocks.0.img_attn.qkv"
    int64_t row0 = 0;
    bool on_output = false;
    float scale = 1.0f;
    ggml_type type = GGML_TYPE_F32;
    int64_t rank = 0, in = 0, rows = 0;
    const void *down = nullptr, *up = nullptr;
};

// A linear layer as adapters see it: name, in and out features.
struct LinearInfo {
    std::string name;
    int64_t in = 0, out = 0;
};

class Network {
public:
    // options: the model's, which must outlive the network.
    Network(Backend &backend, const ComponentWeights &weights, const EngineOptions &options);
    virtual ~Network();
    Network(const Network &) = delete;
    Network &operator=(const Network &) = delete;

    Component component() const { return weights_.component; }
    virtual ConfigItems config_items() const = 0;

    void load();     // materialises the weights (no-op when loaded)
    void release();  // frees the weights and the compute memory (both come back on next use)
    void release_compute() { runner_.release(); }  // frees the compute memory only
    size_t compute_bytes() const { return runner_.compute_buffer_bytes(); }
    // The model's memory policy (memory.h): streaming of this network's in-place weights, and
    // what the network gives back after each call.
    void set_memory_policy(const MemoryPolicy &policy);
    const MemoryPolicy &memory_policy() const { return policy_; }
    // Where each parameter lives and why (fluxmini info).
    std::vector<PlacementRow> placement() const { return params_.placement(); }
    // Graph segments of the last graph and the in-place bytes its last run dropped (tests).
    size_t stream_segments() const { return runner_.segments(); }
    size_t stream_dropped_bytes() const { return runner_.dropped_bytes(); }
    bool loaded() const { return params_.bytes() > 0; }
    size_t weight_bytes() const { return params_.bytes(); }

    // Low-rank adapters (LoRA), applied at run time as extra graph nodes; the base weights stay
    // as they are. Replaces every adapter of this network (an empty list removes them); the
    // factors go into a buffer of their own, in their own type. Checks every target and shape.
    // merge: add the input adapters into copies of their layers' weights instead (F16 / F32 weights
    // only, else FluxMiniValueError; output adapters stay run-time). The weights of the file are
    // never written: removing or changing the adapters points the layers at them again (an exact
    // un-merge), and release() / load() redo the merge from the adapters kept in their buffer.
    void set_adapters(const std::vector<AdapterSpec> &adapters, bool merge = false);
    // set_adapters()'s checks alone (targets, shapes, types; with merge, the weights' types).
    void check_adapters(const std::vector<AdapterSpec> &adapters, bool merge) const;
    size_t merged_bytes() const { return merge_buf_ ? ggml_backend_buffer_get_size(merge_buf_) : 0; }
    size_t adapter_bytes() const;
    size_t adapter_count() const { return adapter_count_; }
    std::vector<LinearInfo> linears() const;

protected:
    // Ops for a graph on this network's backend: its kernel choice, and the exact activation
    // path when every big weight is F32.
    Ops ops(ggml_context *ctx) const;

    // Parameter declarations (shapes in ggml order; see ParamStore::declare).
    // "<prefix>.weight" [in, out] and, with bias, "<prefix>.bias" [out].
    Linear declare_linear(const std::string &prefix, int64_t in, int64_t out, bool bias = true);
    // "<prefix>.weight" [n] and, with bias, "<prefix>.bias" [n].
    Norm declare_norm(const std::string &prefix, int64_t n, bool bias = true);
    // One F32 vector or table.
    ggml_tensor *declare_f32(const std::string &name, std::initializer_list<int64_t> ne);

    // The node budget of this network's graphs: `base` for the network itself plus room for the
    // adapters' nodes.
    void set_graph_nodes(size_t base);
    size_t graph_nodes() const;

    Backend &backend_;
    const ComponentWeights &weights_;
    const EngineOptions &options_;
    ParamStore params_;
    GraphRunner runner_;
    MemoryPolicy policy_;

private:
    void free_adapters();
    void apply_merge();  // merge_ on loaded weights: the merged copies in merge_buf_
    void undo_merge();   // the layers read the file's weights again

    struct Swapped {  // a weight pointed at its merged copy, and where it pointed before
        ggml_tensor *tensor;
        ggml_backend_buffer_t buffer;
        void *data;
        void *extra;
    };
    std::map<std::string, ggml_tensor *> linear_weights_;
    bool merge_ = false;
    ggml_backend_buffer_t merge_buf_ = nullptr;
    std::vector<Swapped> swapped_;

    std::map<std::string, std::vector<LoraPack>> adapters_;  // per linear layer (stable nodes)
    std::map<std::string, std::pair<int64_t, int64_t>> linear_shapes_;  // name -> (in, out)
    ggml_context *adapter_ctx_ = nullptr;
    ggml_backend_buffer_t adapter_buf_ = nullptr;
    size_t adapter_count_ = 0;
    size_t base_nodes_ = 8192;
};

}  // namespace fm
