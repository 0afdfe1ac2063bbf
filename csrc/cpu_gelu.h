// The tanh-approximated GELU for the CPU (Flux's MLPs, T5's gated feed-forward). ggml's CPU GELU
// rounds each value to F16 and looks its result up in a table of F16 values, one value at a time:
// 6% of a Flux step at 256² (FLUXMINI_PROFILE=1, 2 threads, Q4_0). Here 8 values a step in F32.
#pragma once

#include "common.h"    // KernelChoice
#include "cpu_norm.h"  // NormPath: the same AVX2 / plain C++ paths as the GroupNorm op

#include <ggml.h>

#include <cstdint>

namespace fm {

// y[i] = GELU(x[i]) = 0.5·x·(1 + tanh(u)), u = √(2/π)·(x + 0.044715·x³) (docs/MODEL.md §3.5), computed
// as x / (1 + e^(−2u)) (the same function: 0.5·(1 + tanh u) = sigmoid(2u)); 0 for x ≤ −10, where
// F32 tanh(u) is −1. avx2: e^(−2u) by the polynomial of cpu_exp.h; portable: std::exp.
void gelu_tanh_f32(const float *x, float *y, int64_t n, NormPath path);

// The ggml graph node (CPU backend): x F32 with contiguous rows (a view is fine) -> GELU(x), the same
// shape, contiguous. With `head` (F32, contiguous rows, x's row counts), each output row is head's
// row followed by GELU of x's: ggml_concat(head, GELU(x), 0) in one pass (Flux's single blocks
// feed [attention, GELU(MLP)] to linear2). Threads take equal shares of the values; each value is computed alone (the avx2
// path runs a short tail through the same vector arithmetic), so thread counts do not change results.
ggml_tensor *gelu_tanh_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *head, NormPath path);

// The GELU path for a backend whose quantized matmul runs on `qmatmul` (Backend::qmatmul_path()):
// plain C++ with the portable kernels, else AVX2 where the CPU has it.
NormPath gelu_path_for(KernelChoice qmatmul);

}  // namespace fm
