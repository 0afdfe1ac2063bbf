// FLUX.1 MMDiT (double + single stream blocks), MODEL.md §2-3. Sizes come from tensor shapes.
#pragma once

#include "backend.h"
#include "weights.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct FluxConfig {
    int64_t hidden = 0, head_dim = 0, heads = 0, depth = 0, depth_single = 0, mlp_hidden = 0;
    int64_t in_channels = 0, context_dim = 0, vec_dim = 0;
    bool guidance = false;
    static FluxConfig infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

class FluxNet {
public:
    // Infers the configuration and checks every tensor's shape; reads no weight data.
    FluxNet(Backend &backend, const ComponentWeights &weights);
    ~FluxNet();
    const FluxConfig &config() const;
    void load();     // materialises the weights (no-op when loaded)
    void release();  // frees weights and compute memory
    bool loaded() const;
    size_t weight_bytes() const;
    void set_flash_attn(bool on);

    // latent [16, h, w] (channel-major float32), txt [n_txt, context_dim], pooled [vec_dim];
    // returns the velocity [16, h, w].
    std::vector<float> forward(const float *latent, int64_t h, int64_t w, float sigma, float guidance,
                               const float *txt, int64_t n_txt, const float *pooled);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace fm

namespace fm {

// Micro-benchmarks for benchmarks/bench_flux.py (the matmul-bound estimate): median wall-clock
// seconds and median process CPU seconds (all threads; less sensitive to other processes on a
// shared machine) of one F32-activation matmul of a [k -> n] weight of `type` (placed as the
// model's weights are, repacked where ggml has a kernel) over m tokens, and of one attention of
// `heads` heads of d over l tokens as the Flux graph computes it on the CPU (flash: F32 K/V;
// else the explicit F32 softmax). CPU backend, `threads` threads.
struct BenchTime {
    double wall = 0, cpu = 0;
};
// ggml_only: ggml's matmul even where the engine would use its own kernel (cpu_qmatmul.h).
BenchTime bench_mul_mat(const std::string &type, int64_t k, int64_t n, int64_t m, int threads, int reps,
                        bool ggml_only = false);
BenchTime bench_attention(int64_t d, int64_t heads, int64_t l, bool flash, int threads, int reps);

}  // namespace fm
