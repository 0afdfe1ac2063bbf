// A loaded FLUX.1-mini: the files, the backend and the four networks.
//
// Thread-safety: one Model may be shared between threads; its public methods serialise on an
// internal mutex (a second caller waits). interrupt() may be called from any thread at any time.
#pragma once

#include "backend.h"
#include "clip.h"
#include "flux.h"
#include "t5.h"
#include "vae.h"
#include "weights.h"

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace fm {

struct ModelParams {
    std::string path, clip_l, t5xxl, vae;
    std::string backend = "cpu";
    int threads = 0;                                  // 0 = physical cores
    std::vector<std::string> components = {"diffusion", "clip_l", "t5xxl", "vae"};  // required
    bool flash_attn = true;
    int verbosity = 0;
};
ModelParams model_default_params();

struct ComponentInfo {
    std::string name;
    bool present = false;
    std::vector<std::string> sources;
    std::map<std::string, int64_t> tensors_per_type;  // type name -> count
    int64_t parameters = 0;
    int64_t bytes = 0;                                 // bytes in the file(s)
    std::vector<std::pair<std::string, int64_t>> config;
};

class Model {
public:
    explicit Model(const ModelParams &params);
    ~Model();

    std::vector<ComponentInfo> info() const;
    std::vector<std::string> ignored_tensors() const { return weights_->ignored(); }
    std::string backend_name() const { return backend_->name(); }
    std::string backend_description() const { return backend_->description(); }
    // Which CPU kernels run: fluxmini's own (cpu_qmatmul.h, cpu_conv.h) or ggml's.
    std::string kernels() const;
    int threads() const { return backend_->threads(); }
    void set_threads(int n);
    void interrupt() { backend_->interrupt_flag().store(true); }

    FluxNet &flux();
    ClipNet &clip();
    T5Net &t5();
    VaeNet &vae();
    // Frees a component's weights and compute memory and drops its file pages from memory.
    void release(const std::string &component);
    std::mutex &mutex() { return mutex_; }

private:
    [[noreturn]] void missing(const char *component) const;

    ModelParams params_;
    std::unique_ptr<Backend> backend_;
    std::unique_ptr<WeightSet> weights_;
    std::unique_ptr<FluxNet> flux_;
    std::unique_ptr<ClipNet> clip_;
    std::unique_ptr<T5Net> t5_;
    std::unique_ptr<VaeNet> vae_;
    std::mutex mutex_;
};

}  // namespace fm
