// What every network (Flux, CLIP-L, T5, VAE) has, written once: its parameters (ParamStore),
// its graph runner, the engine options, load / release, and helpers to declare parameters and
// set up a graph's Ops. A network's own file then holds only its configuration and its math.
#pragma once

#include "backend.h"
#include "layers.h"
#include "options.h"
#include "params.h"
#include "weights.h"

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace fm {

// Inferred hyper-parameters as (name, value) pairs, for info().
using ConfigItems = std::vector<std::pair<std::string, int64_t>>;

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
    bool loaded() const { return params_.bytes() > 0; }
    size_t weight_bytes() const { return params_.bytes(); }

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

    Backend &backend_;
    const ComponentWeights &weights_;
    const EngineOptions &options_;
    ParamStore params_;
    GraphRunner runner_;
};

}  // namespace fm
