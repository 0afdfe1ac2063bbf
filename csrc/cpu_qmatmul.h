// Q4_0, Q4_1 and Q8_0 matrix products for the CPU with AVX-VNNI, used where the CPU has it: ggml's
// prebuilt wheel is compiled for AVX2 only (maddubs + madd for its int8 dot products, ~45
// GFLOP/s per core here), while VNNI's dpbusd does a 4-way u8 x s8 dot product and its
// accumulation in one instruction. The numerics are ggml's: activations quantized per block of
// 32 to 8 bits (scale = max|x| / 127, round to nearest even), exact integer block sums, scaled in
// F32 (ggml also rounds the activation scales to F16; we keep them F32).
#pragma once

#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace fm {

// Whether this CPU runs the vector kernel (x86-64 with AVX2, FMA and AVX-VNNI). The functions
// below work everywhere (plain C++ elsewhere, for tests); the engine uses them only where this
// is true.
bool cpu_qmatmul_available();

// One activation block: 32 values x ≈ d·q, and sum = Σq.
struct QuantBlock {
    float d;
    int32_t sum;
    int8_t q[32];
};
static_assert(sizeof(QuantBlock) == 40, "QuantBlock is packed into I8 tensors");

// Quantizes rows [r0, r1) of x (rows of k floats, k a multiple of 32) into blocks.
void quantize_rows_q8(const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out);

// out[r·n + c] = bias[c] + Σ_k w[c][k] · x[r][k] for rows r < rows, columns c < n (a multiple of
// 8) in this thread's share of the columns; w is ggml's Q4_0, Q4_1 or Q8_0 [k, n] (row c at
// w + c·row_bytes), x the quantized rows (k/32 blocks each). Each output sums its blocks in one
// fixed order, whatever the thread count.
void qmatmul(ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x, const float *bias, float *out,
             int64_t rows, int64_t n, int64_t k, int ith, int nth);

// Whether a weight tensor has the form the kernel takes: Q4_0, Q4_1 or Q8_0, 2-D [k, n], n % 8 == 0.
inline bool qmatmul_shape(const ggml_tensor *w) {
    return (w->type == GGML_TYPE_Q4_0 || w->type == GGML_TYPE_Q4_1 || w->type == GGML_TYPE_Q8_0) && w->ne[2] == 1 &&
           w->ne[3] == 1 && w->ne[0] % 32 == 0 && w->ne[1] % 8 == 0;
}

// ggml graph nodes computing ggml_mul_mat(w, x) (+ bias) with the above on the CPU backend:
// one quantizes x's rows, one multiplies. w as qmatmul_shape, x F32 [k, ...] -> F32 [n, ...].
ggml_tensor *qmatmul_op(ggml_context *ctx, ggml_tensor *w, ggml_tensor *x, ggml_tensor *bias);

}  // namespace fm
