// Micro-benchmarks for benchmarks/bench_flux.py and benchmarks/compare_sdcpp.py (the matmul-bound
// estimate), exposed as fluxmini._core.testing: not used by the engine.
#pragma once

#include "common.h"

#include <ggml.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fm {

// Median wall-clock seconds and median process CPU seconds (all threads; less sensitive to other
// processes on a shared machine) of one F32-activation matmul of a [k -> n] weight of `type`
// (placed as the model's weights are, repacked where ggml has a kernel) over m tokens, and of one
// attention of `heads` heads of d over l tokens as the Flux graph computes it on the CPU (flash:
// our fused kernel where the engine would use it, else ggml's flash attention with F32 K/V;
// not flash: the explicit F32 softmax). CPU backend, `threads` threads.
struct BenchTime {
    double wall = 0, cpu = 0;
};
// ggml_only: ggml's matmul even where the engine would use its own kernel (cpu_qmatmul.h).
BenchTime bench_mul_mat(const std::string &type, int64_t k, int64_t n, int64_t m, int threads, int reps,
                        bool ggml_only = false);
// kernels: "" (the engine's choice under FLUXMINI_KERNELS / FLUXMINI_ATTENTION), "ggml" (ggml's
// flash attention), or a path of our kernel ("avx512", "avx2", "portable").
BenchTime bench_attention(int64_t d, int64_t heads, int64_t l, bool flash, int threads, int reps,
                          const std::string &kernels = "");

// linear() (layers.h) on its own, for tests: F32 x [rows, in] (row-major), W [out, in], bias
// [out] or null, adapters of ranks r_i (down [r_i, in or out], up [rows_i, r_i], scale, first row,
// on_output; F32 values stored in `type`: F32, or rounded to F16 / BF16) -> [rows, out], on the
// CPU backend with the kernel choice `kernels` (our matmul/LoRA paths, or Ggml).
struct AdapterData {
    const float *down, *up;
    int64_t rank;
    float scale;
    int64_t row0 = 0, rows = 0;  // rows 0: every output
    bool on_output = false;
    ggml_type type = GGML_TYPE_F32;
};
std::vector<float> linear_f32(const float *x, int64_t rows, int64_t in, const float *w, int64_t out, const float *bias,
                              const std::vector<AdapterData> &adapters, int threads,
                              KernelChoice kernels = KernelChoice::Own);

}  // namespace fm
