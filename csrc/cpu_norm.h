// GroupNorm with its per-channel scale and shift, and optionally SiLU, as one CPU op (the VAE's
// norm1/norm2/norm_out + SiLU, and its attention's norm). ggml runs them as four ops (group_norm,
// mul, add, silu), each a full pass over the activation map in memory: 13% of a 512² decode
// (measured with FLUXMINI_PROFILE=1) once the convolutions ran at 45% of the FMA peak. Here:
// one pass for a group's statistics and one that writes the result.
#pragma once

#include <ggml.h>

#include <cstdint>

namespace fm {

// avx2: AVX2 + FMA (8 floats a step, exp by a polynomial); portable: plain C++ (std::exp).
enum class NormPath { Portable, Avx2 };
bool norm_path_supported(NormPath path);
const char *norm_path_name(NormPath path);  // "portable", "avx2"
// The process's path: avx2 where the CPU has it, unless FLUXMINI_KERNELS=portable.
NormPath norm_engine_path();

// y = act((x − μ_g)·σ_g⁻¹·γ_c + β_c) over x [C planes of `plane` floats] (ggml's [W, H, C]), C
// split into `groups` equal groups; μ_g and σ_g² = the mean and the (biased) variance of group g,
// accumulated in double; σ_g⁻¹ = 1/√(σ_g² + eps); act = SiLU (x·sigmoid(x)) or the identity.
// gamma / beta: C floats, or null for 1 / 0. This thread's share: groups [G·ith/nth, G·(ith+1)/nth),
// each computed in one fixed order, so thread counts do not change results.
void group_norm_f32(const float *x, const float *gamma, const float *beta, float *y, int64_t plane, int64_t C,
                    int groups, float eps, bool silu, int ith, int nth, NormPath path);

// The ggml graph node (CPU backend): x [W, H, C, 1] F32 contiguous, gamma and beta [C] F32 ->
// [W, H, C, 1].
ggml_tensor *group_norm_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *gamma, ggml_tensor *beta, int groups,
                           float eps, bool silu);

}  // namespace fm
