// Fused multi-head attention for the CPU, flash-style: per block of queries, the scores of one
// tile of keys at a time, an online softmax (running maximum and sum per query) and the P·V
// product, so the [Lk, Lq] score matrix is never stored (the VAE's one head over 128² latent
// positions would need 1 GiB). F32 throughout. One binary for every x86-64 level, the
// instruction set chosen at run time as in cpu_qmatmul.h:
//   avx512    zmm (AVX-512 F): 16 queries per register, 4 x 6 register tiles;
//   avx2      ymm (AVX2 + FMA): 8 queries per register, 4 x 3 register tiles;
//   portable  plain C++ (any CPU; the reference the vector code must agree with).
// Every path computes each query with the same operations in the same order (fused
// multiply-adds, the same exp polynomial), so all paths give bit-identical results, whatever the
// thread count.
#pragma once

#include "common.h"

#include <ggml.h>

#include <cstddef>
#include <cstdint>

namespace fm {

// Ggml: ggml's flash attention (the engine's fallback: FLUXMINI_KERNELS=ggml,
// FLUXMINI_ATTENTION=ggml, GPU backends, CPUs without AVX2).
enum class AttnPath { Ggml, Portable, Avx2, Avx512 };

// "ggml", "portable", "avx2", "avx512"; parse: false for another name.
const char *attention_path_name(AttnPath path);
bool parse_attention_path(const char *name, AttnPath *out);
// What `fluxmini info` says of a path: "AVX-512", "AVX2", "plain C++", "ggml".
const char *attention_path_description(AttnPath path);
// Whether this CPU (and its OS) runs the path (Ggml and Portable: always).
bool attention_path_supported(AttnPath path);
// The path the engine's CPU backend uses under the kernel choice `kernels` (a choice the CPU
// runs, checked by qmatmul_engine_path()): Own: the fastest vector path (Ggml where there is
// none, ggml's vector code beating plain C++); Ggml: Ggml; Portable: Portable; Avx2 / AvxVnni:
// Avx2; Avx512Vnni: Avx512.
AttnPath attention_engine_path(KernelChoice kernels);

// The kernel on plain arrays: q (Lq rows), k and v (Lk rows) of `heads` heads of d floats; row t
// of head h starts at base + t·row + h·head (in floats). mask: null, or scores[h][i][j] +=
// mask[j + i·mask_row + (h % mask_heads)·mask_head]. out: [Lq][heads][d] contiguous. The work
// (heads x blocks of queries) is split over nth threads; this call does share ith.
struct AttnArgs {
    const float *q, *k, *v;
    int64_t q_row, q_head, k_row, k_head, v_row, v_head;  // strides in floats
    const float *mask = nullptr;
    int64_t mask_row = 0, mask_head = 0, mask_heads = 1;
    float *out;
    int64_t d, heads, lq, lk;
    float scale;
};
void attention_f32(AttnPath path, const AttnArgs &a, int ith, int nth);

// Whether attention_op takes these tensors: F32, d contiguous (nb[0] = 4), mask null or F32
// [Lk, Lq] / [Lk, Lq, H'] with H % H' == 0 and contiguous rows.
bool attention_op_supports(const ggml_tensor *q, const ggml_tensor *k, const ggml_tensor *v, const ggml_tensor *mask);

// ggml graph node computing the above on the CPU backend: q [d, H, Lq], k and v [d, H, Lk]
// (views allowed), scores scaled by `scale` -> F32 [d, H, Lq] (contiguous). path: not Ggml.
ggml_tensor *attention_op(ggml_context *ctx, ggml_tensor *q, ggml_tensor *k, ggml_tensor *v, ggml_tensor *mask,
                          float scale, AttnPath path);

}  // namespace fm
