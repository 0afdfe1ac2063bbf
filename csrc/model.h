// A loaded FLUX.1-mini: the files, the backend and the four networks, one per Component.
//
// Thread-safety: one Model may be shared between threads. Every call into it goes through a
// Model::Call, which holds the model's mutex (a second caller waits) and sets the calling thread's
// log verbosity to the model's. Cancellation is per call: each call takes a CancelToken that any
// thread may cancel, which stops that call only.
#pragma once

#include "backend.h"
#include "clip.h"
#include "flux.h"
#include "memory.h"
#include "network.h"
#include "options.h"
#include "t5.h"
#include "vae.h"
#include "weights.h"

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fm {

constexpr std::array<Component, 4> kComponents = {Component::Diffusion, Component::ClipL, Component::T5xxl,
                                                  Component::Vae};

struct ModelParams {
    std::string path, clip_l, t5xxl, vae;
    std::string backend = "cpu";
    int threads = 0;                                                  // 0 = physical cores
    std::vector<Component> components{kComponents.begin(), kComponents.end()};  // required
    EngineOptions options = engine_default_params();
};
// The defaults (options without the environment: the bindings apply engine_options_from_env()).
ModelParams model_default_params();

struct ComponentInfo {
    std::string name;
    bool present = false;
    std::vector<std::string> sources;
    std::map<std::string, int64_t> tensors_per_type;  // type name -> count
    int64_t parameters = 0;
    int64_t bytes = 0;                                 // bytes in the file(s)
    ConfigItems config;
};

class Model {
public:
    explicit Model(const ModelParams &params);
    ~Model();

    // Held for the duration of every call into the model: serialises callers, and logs at the
    // model's verbosity on the calling thread.
    class Call {
    public:
        explicit Call(Model &m) : lock_(m.mutex_), verbosity_(m.options_.verbosity) {}

    private:
        std::lock_guard<std::mutex> lock_;
        VerbosityScope verbosity_;
    };

    std::vector<ComponentInfo> info() const;
    std::vector<std::string> ignored_tensors() const { return weights_->ignored(); }
    std::string backend_name() const { return backend_->name(); }
    std::string backend_description() const { return backend_->description(); }
    // Which CPU kernels run: fluxmini's own (cpu_qmatmul.h, cpu_conv.h) or ggml's.
    std::string kernels() const;
    int threads() const { return backend_->threads(); }
    void set_threads(int n);
    const EngineOptions &options() const { return options_; }
    // ggml's per-op timings on stderr for every graph run (benchmarks); the one option that may
    // change after load.
    void set_profile(bool on) { options_.profile = on; }

    // The network of a component, or a FluxMiniValueError saying which file to pass.
    Network &net(Component c);
    FluxNet &flux() { return static_cast<FluxNet &>(net(Component::Diffusion)); }
    ClipNet &clip() { return static_cast<ClipNet &>(net(Component::ClipL)); }
    T5Net &t5() { return static_cast<T5Net &>(net(Component::T5xxl)); }
    VaeNet &vae() { return static_cast<VaeNet &>(net(Component::Vae)); }
    // Frees a component's weights and compute memory and drops its file pages from memory (and,
    // under a tight memory budget, from the page cache).
    void release(Component c);
    // A component's tensors as found in the files (the embedding cache fingerprints them).
    const ComponentWeights &component_weights(Component c) const { return weights_->component(c); }
    // Called before a computation of component c: under a tight budget the other networks' compute
    // buffers are freed first (a stage's buffers are not kept while another stage runs).
    void begin(Component c);
    const MemoryPolicy &memory_policy() const { return policy_; }
    const MemoryLimits &memory_limits() const { return limits_; }
    // Where each parameter of a component lives and why (empty for an absent component).
    std::vector<PlacementRow> placement(Component c) const;

private:
    [[noreturn]] void missing(Component c) const;

    EngineOptions options_;
    MemoryLimits limits_;
    MemoryPolicy policy_;
    std::unique_ptr<Backend> backend_;
    std::unique_ptr<WeightSet> weights_;
    std::array<std::unique_ptr<Network>, kComponents.size()> nets_;
    std::mutex mutex_;
};

}  // namespace fm
