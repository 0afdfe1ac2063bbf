// Q4_0, Q4_1 and Q8_0 matrix products for the CPU, one binary for every x86-64 level, the
// instruction set chosen at run time (each path compiled with function-level target attributes,
// run only where cpuid and the OS's saved register state say the CPU has it):
//   avx512vnni  vpdpbusd on zmm (AVX-512 F/BW/VL/VNNI): 16 columns per register, 32 registers;
//   avxvnni     vpdpbusd on ymm (VEX encoding: Alder Lake and later, Sapphire Rapids, Zen 5);
//   avx2        vpmaddubsw + vpmaddwd (every x86-64 CPU since Haswell / Zen 1);
//   portable    plain C++ (any CPU; the reference the vector code must agree with).
// ggml's prebuilt wheel is compiled for AVX2 only and its generic matmul loses most of the
// int8 throughput to repeated unpacking and per-block reductions; ours unpacks each weight
// panel once per pass and reuses it for every activation row. The numerics are ggml's:
// activations quantized per block of 32 to 8 bits (scale = max|x| / 127, round to nearest even),
// exact integer block sums, scaled in F32 (ggml also rounds the activation scales to F16; we keep
// them F32). All vector paths give bit-identical results.
#pragma once

#include "common.h"
#include "options.h"

#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace fm {

// A path is one of KernelChoice's Avx512Vnni, AvxVnni, Avx2, Portable. Whether this CPU (and its
// OS) runs it: cpuid feature bits plus xgetbv for the ymm / zmm register state.
bool qmatmul_path_supported(KernelChoice path);
// The fastest path this CPU runs (Portable where none of the vector paths is available).
KernelChoice qmatmul_best_path();
// What `fluxmini info` says of a path ("AVX-512 VNNI", ...; FLUXMINI_KERNELS's names are
// kernel_choice_name() in options.h).
const char *qmatmul_path_description(KernelChoice path);
// The path the engine's CPU backend uses for these weights under the kernel choice `choice`
// (EngineOptions::kernels): a vector path (Own: the fastest; never the portable one unless forced,
// ggml's being faster than plain C++), Portable where forced, or Ggml (ggml's matmul). Throws
// FluxMiniValueError for a path this CPU lacks.
KernelChoice qmatmul_engine_path(KernelChoice choice);

// One activation block: 32 values x ≈ d·q, and sum = Σq.
struct QuantBlock {
    float d;
    int32_t sum;
    int8_t q[32];
};
static_assert(sizeof(QuantBlock) == 40, "QuantBlock is packed into I8 tensors");

// Quantizes rows [r0, r1) of x (rows of k floats, k a multiple of 32) into blocks. Every path
// gives the same blocks. f16_scales: each block's scale rounded to F16 after quantizing, as ggml
// stores it (compat="sd.cpp"'s T5, docs/MODEL.md §4.7); the products then equal ggml's.
void quantize_rows_q8(KernelChoice path, const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out,
                      bool f16_scales = false);

// out[r·n + c] = bias[c] + Σ_k w[c][k] · x[r][k] for rows r < rows, columns c < n (a multiple of
// 8) in this thread's share of the columns; w is ggml's Q4_0, Q4_1 or Q8_0 [k, n] (row c at
// w + c·row_bytes), x the quantized rows (k/32 blocks each). Each output sums its blocks in one
// fixed order, whatever the thread count. A path this CPU lacks runs the portable code.
void qmatmul(KernelChoice path, ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x,
             const float *bias, float *out, int64_t rows, int64_t n, int64_t k, int ith, int nth);

// Whether a weight tensor has the form the kernel takes: Q4_0, Q4_1 or Q8_0, 2-D [k, n], n % 8 == 0.
inline bool qmatmul_shape(const ggml_tensor *w) {
    return (w->type == GGML_TYPE_Q4_0 || w->type == GGML_TYPE_Q4_1 || w->type == GGML_TYPE_Q8_0) && w->ne[2] == 1 &&
           w->ne[3] == 1 && w->ne[0] % 32 == 0 && w->ne[1] % 8 == 0;
}

// ggml graph nodes computing ggml_mul_mat(w, x) (+ bias) with the above on the CPU backend, on
// `path` (a path qmatmul_engine_path() returned): one quantizes x's rows, one multiplies. w as
// qmatmul_shape, x F32 [k, ...] -> F32 [n, ...].
ggml_tensor *qmatmul_op(ggml_context *ctx, ggml_tensor *w, ggml_tensor *x, ggml_tensor *bias, KernelChoice path,
                        bool f16_scales = false);

}  // namespace fm
