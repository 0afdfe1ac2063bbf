// Fused CPU attention (see cpu_attention.h): one body (cpu_attention_impl.inc) compiled for
// AVX-512, AVX2 and plain C++.
//
// Bit-identical paths need every product and sum rounded the same way: the body fuses
// multiply-adds only where it says so (vfma), so the compiler must not contract a separate
// multiply and add into one (GCC does by default for vector code built for FMA, which would
// change the vector paths' bits but not the portable one's).
#include "cpu_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_ATTN_X86 1
#include <immintrin.h>
#endif

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fm {

namespace {
constexpr int kBk = 64;                 // keys per tile (the scores of a query block: kBk x kBq)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kMaxInit = -1e30f;      // running maximum before the first key (exp2 of it - x is 0)
}  // namespace

// Plain C++: W = 1, the "vector" is one float.
namespace portable_impl {
constexpr int W = 1, kRs = 4, kVs = 4, kRp = 4, kVp = 4, kBq = 32;
using vf = float;
inline vf vzero() { return 0.0f; }
inline vf vload(const float *p) { return *p; }
inline void vstore(float *p, vf x) { *p = x; }
inline vf vset1(float x) { return x; }
inline vf vfma(vf a, vf b, vf c) { return std::fma(a, b, c); }
inline vf vmul(vf a, vf b) { return a * b; }
inline vf vadd(vf a, vf b) { return a + b; }
inline vf vsub(vf a, vf b) { return a - b; }
inline vf vdiv(vf a, vf b) { return a / b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline vf vround(vf x) { return std::nearbyint(x); }
inline vf vscale2(vf p, vf n) { return std::ldexp(p, int(n)); }
#include "cpu_attention_impl.inc"
}  // namespace portable_impl

#ifdef FM_ATTN_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2_impl {
constexpr int W = 8, kRs = 4, kVs = 3, kRp = 4, kVp = 3, kBq = 96;
using vf = __m256;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float *p) { return _mm256_loadu_ps(p); }
inline void vstore(float *p, vf x) { _mm256_storeu_ps(p, x); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vround(vf x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2ⁿ built in the exponent field (n ≥ −126: a normal number), one rounding as in ldexp.
inline vf vscale2(vf p, vf n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#include "cpu_attention_impl.inc"
}  // namespace avx2_impl
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f")
#endif
// GCC 12 warns about the placeholder operand of _mm512_max_ps & co. (_mm512_undefined_ps).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512_impl {
constexpr int W = 16, kRs = 4, kVs = 6, kRp = 4, kVp = 6, kBq = 96;
using vf = __m512;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float *p) { return _mm512_loadu_ps(p); }
inline void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vround(vf x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline vf vscale2(vf p, vf n) { return _mm512_scalef_ps(p, n); }  // p·2ⁿ, one rounding
#include "cpu_attention_impl.inc"
}  // namespace avx512_impl
#pragma GCC diagnostic pop
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // FM_ATTN_X86

const char *attention_path_name(AttnPath path) {
    switch (path) {
    case AttnPath::Ggml: return "ggml";
    case AttnPath::Portable: return "portable";
    case AttnPath::Avx2: return "avx2";
    case AttnPath::Avx512: return "avx512";
    }
    return "?";
}

const char *attention_path_description(AttnPath path) {
    switch (path) {
    case AttnPath::Portable: return "plain C++";
    case AttnPath::Avx2: return "AVX2";
    case AttnPath::Avx512: return "AVX-512";
    default: return "ggml";
    }
}

bool parse_attention_path(const char *name, AttnPath *out) {
    for (AttnPath p : {AttnPath::Ggml, AttnPath::Portable, AttnPath::Avx2, AttnPath::Avx512})
        if (!std::strcmp(name, attention_path_name(p))) {
            *out = p;
            return true;
        }
    return false;
}

bool attention_path_supported(AttnPath path) {
    switch (path) {
    case AttnPath::Ggml:
    case AttnPath::Portable: return true;
#ifdef FM_ATTN_X86
    // __builtin_cpu_supports also checks that the OS saves the ymm / zmm registers.
    case AttnPath::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case AttnPath::Avx512: return attention_path_supported(AttnPath::Avx2) && __builtin_cpu_supports("avx512f");
#endif
    default: return false;
    }
}

AttnPath attention_engine_path(KernelChoice kernels) {
    switch (kernels) {
    case KernelChoice::Ggml: return AttnPath::Ggml;
    case KernelChoice::Portable: return AttnPath::Portable;
    case KernelChoice::Avx2:
    case KernelChoice::AvxVnni: return attention_path_supported(AttnPath::Avx2) ? AttnPath::Avx2 : AttnPath::Ggml;
    case KernelChoice::Avx512Vnni:
    case KernelChoice::Own:
        for (AttnPath p : {AttnPath::Avx512, AttnPath::Avx2})
            if (attention_path_supported(p)) return p;
        return AttnPath::Ggml;  // ggml's vector code beats plain C++
    }
    return AttnPath::Ggml;
}

void attention_f32(AttnPath path, const AttnArgs &a, int ith, int nth) {
#ifdef FM_ATTN_X86
    if (path == AttnPath::Avx512 && attention_path_supported(path)) return avx512_impl::run(a, ith, nth);
    if (path == AttnPath::Avx2 && attention_path_supported(path)) return avx2_impl::run(a, ith, nth);
#endif
    portable_impl::run(a, ith, nth);
}

bool attention_op_supports(const ggml_tensor *q, const ggml_tensor *k, const ggml_tensor *v, const ggml_tensor *mask) {
    const int64_t d = q->ne[0], heads = q->ne[1], lq = q->ne[2], lk = k->ne[2];
    for (const ggml_tensor *t : {q, k, v})
        if (t->type != GGML_TYPE_F32 || t->nb[0] != sizeof(float) || t->ne[3] != 1 || t->nb[1] % sizeof(float) ||
            t->nb[2] % sizeof(float))
            return false;
    if (k->ne[0] != d || v->ne[0] != d || k->ne[1] != heads || v->ne[1] != heads || v->ne[2] != lk) return false;
    if (!mask) return true;
    return mask->type == GGML_TYPE_F32 && mask->nb[0] == sizeof(float) && mask->ne[0] == lk && mask->ne[1] >= lq &&
           mask->ne[3] == 1 && heads % mask->ne[2] == 0 && mask->nb[1] % sizeof(float) == 0 &&
           mask->nb[2] % sizeof(float) == 0;
}

namespace {
// The path and the scale travel in the custom op's userdata pointer's value (nothing to free).
static_assert(sizeof(uintptr_t) >= 8, "the attention node packs a path and an F32 scale into its userdata");
void *node_userdata(AttnPath path, float scale) {
    uint32_t bits;
    std::memcpy(&bits, &scale, 4);
    return reinterpret_cast<void *>(uintptr_t(path) | (uintptr_t(bits) << 32));
}

void attention_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const auto packed = reinterpret_cast<uintptr_t>(userdata);
    const AttnPath path = AttnPath(packed & 0xff);
    const uint32_t bits = uint32_t(packed >> 32);
    AttnArgs a{};
    std::memcpy(&a.scale, &bits, 4);
    const ggml_tensor *q = dst->src[0], *k = dst->src[1], *v = dst->src[2], *mask = dst->src[3];
    const int64_t f = sizeof(float);
    a.q = static_cast<const float *>(q->data);
    a.k = static_cast<const float *>(k->data);
    a.v = static_cast<const float *>(v->data);
    a.q_row = int64_t(q->nb[2]) / f, a.q_head = int64_t(q->nb[1]) / f;
    a.k_row = int64_t(k->nb[2]) / f, a.k_head = int64_t(k->nb[1]) / f;
    a.v_row = int64_t(v->nb[2]) / f, a.v_head = int64_t(v->nb[1]) / f;
    if (mask) {
        a.mask = static_cast<const float *>(mask->data);
        a.mask_row = int64_t(mask->nb[1]) / f, a.mask_head = int64_t(mask->nb[2]) / f, a.mask_heads = mask->ne[2];
    }
    a.out = static_cast<float *>(dst->data);
    a.d = q->ne[0], a.heads = q->ne[1], a.lq = q->ne[2], a.lk = k->ne[2];
    attention_f32(path, a, ith, nth);
}
}  // namespace

ggml_tensor *attention_op(ggml_context *ctx, ggml_tensor *q, ggml_tensor *k, ggml_tensor *v, ggml_tensor *mask,
                          float scale, AttnPath path) {
    if (path == AttnPath::Ggml || !attention_op_supports(q, k, v, mask))
        fail_runtime("internal error: attention_op takes F32 q [d, H, Lq], k/v [d, H, Lk] with d contiguous, a path");
    ggml_tensor *args[4] = {q, k, v, mask};
    ggml_tensor *out = ggml_custom_4d(ctx, GGML_TYPE_F32, q->ne[0], q->ne[1], q->ne[2], 1, args, mask ? 4 : 3,
                                      attention_node, GGML_N_TASKS_MAX, node_userdata(path, scale));
    ggml_set_name(out, "fm.attention");  // for FLUXMINI_PROFILE's table
    return out;
}

}  // namespace fm
