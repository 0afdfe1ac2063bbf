// GroupNorm + scale and shift + SiLU for the CPU (see cpu_norm.h).
//
// Statistics in one pass: sums of (x − s) and (x − s)² with s = the group's first value (so the
// variance E[(x−s)²] − E[x−s]² does not cancel when the mean is large next to the spread), summed
// in F32 lanes over runs of 256 values and the runs in double. Then per channel one pass
// y = act((x − μ)·a + β) with a = σ⁻¹·γ: one subtraction and one fused multiply-add a value.
#include "cpu_norm.h"

#include "common.h"
#include "cpu_exp.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_NORM_X86 1
#include <immintrin.h>
#endif

namespace fm {

namespace {
constexpr int64_t kRun = 256;  // values summed in F32 lanes before the sum moves to double

struct Moments {
    double s1 = 0, s2 = 0;  // Σ(x − shift), Σ(x − shift)²
};

Moments moments_portable(const float *x, int64_t n, float shift) {
    Moments m;
    for (int64_t i = 0; i < n; ++i) {
        const double d = double(x[i]) - double(shift);
        m.s1 += d;
        m.s2 += d * d;
    }
    return m;
}

void normalize_portable(const float *x, float *y, int64_t n, float mean, float a, float b, bool silu) {
    for (int64_t i = 0; i < n; ++i) {
        const float v = std::fma(x[i] - mean, a, b);
        y[i] = silu ? v / (1.0f + std::exp(-v)) : v;
    }
}

#ifdef FM_NORM_X86
__attribute__((target("avx2,fma"))) inline double hsum_double(__m256 v) {
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    const __m256d s = _mm256_add_pd(lo, hi);
    const __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(_mm_add_sd(t, _mm_unpackhi_pd(t, t)));
}

__attribute__((target("avx2,fma"))) Moments moments_avx2(const float *x, int64_t n, float shift) {
    Moments m;
    const __m256 s = _mm256_set1_ps(shift);
    int64_t i = 0;
    for (; i + kRun <= n; i += kRun) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        for (int64_t j = i; j < i + kRun; j += 16) {
            const __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + j), s), d1 = _mm256_sub_ps(_mm256_loadu_ps(x + j + 8), s);
            a0 = _mm256_add_ps(a0, d0);
            a1 = _mm256_add_ps(a1, d1);
            b0 = _mm256_fmadd_ps(d0, d0, b0);
            b1 = _mm256_fmadd_ps(d1, d1, b1);
        }
        m.s1 += hsum_double(_mm256_add_ps(a0, a1));
        m.s2 += hsum_double(_mm256_add_ps(b0, b1));
    }
    const Moments tail = moments_portable(x + i, n - i, shift);
    m.s1 += tail.s1;
    m.s2 += tail.s2;
    return m;
}

__attribute__((target("avx2,fma"))) void normalize_avx2(const float *x, float *y, int64_t n, float mean, float a,
                                                       float b, bool silu) {
    const __m256 vm = _mm256_set1_ps(mean), va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), va, vb);
        if (silu) v = _mm256_div_ps(v, _mm256_add_ps(one, exp_neg_avx2(v)));
        _mm256_storeu_ps(y + i, v);
    }
    normalize_portable(x + i, y + i, n - i, mean, a, b, silu);
}
#endif
}  // namespace

bool norm_path_supported(NormPath path) {
#ifdef FM_NORM_X86
    if (path == NormPath::Avx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return path == NormPath::Portable;
}

const char *norm_path_name(NormPath path) { return path == NormPath::Avx2 ? "avx2" : "portable"; }

NormPath norm_engine_path() {
    static const NormPath path = kernel_choice() != KernelChoice::Portable && norm_path_supported(NormPath::Avx2)
                                     ? NormPath::Avx2
                                     : NormPath::Portable;
    return path;
}

void group_norm_f32(const float *x, const float *gamma, const float *beta, float *y, int64_t plane, int64_t C,
                    int groups, float eps, bool silu, int ith, int nth, NormPath path) {
    const bool vec = path == NormPath::Avx2 && norm_path_supported(path);
    const int64_t per = C / groups, n = per * plane;
    for (int64_t g = int64_t(groups) * ith / nth; g < int64_t(groups) * (ith + 1) / nth; ++g) {
        const float *xg = x + g * n;
        const float shift = n > 0 ? xg[0] : 0.0f;
#ifdef FM_NORM_X86
        const Moments m = vec ? moments_avx2(xg, n, shift) : moments_portable(xg, n, shift);
#else
        const Moments m = moments_portable(xg, n, shift);
#endif
        const double d1 = n > 0 ? m.s1 / double(n) : 0.0;
        const double var = std::max(0.0, (n > 0 ? m.s2 / double(n) : 0.0) - d1 * d1);
        const double rstd = 1.0 / std::sqrt(var + double(eps));
        const float mean = float(double(shift) + d1);
        for (int64_t c = g * per; c < (g + 1) * per; ++c) {
            const float a = float(rstd * (gamma ? double(gamma[c]) : 1.0)), b = beta ? beta[c] : 0.0f;
#ifdef FM_NORM_X86
            if (vec) {
                normalize_avx2(x + c * plane, y + c * plane, plane, mean, a, b, silu);
                continue;
            }
#endif
            normalize_portable(x + c * plane, y + c * plane, plane, mean, a, b, silu);
        }
    }
}

namespace {
// groups (low 16 bits), SiLU (bit 16) and eps (its F32 bits, high 32) travel in the userdata
// pointer's value (nothing to allocate or free).
void *norm_params(int groups, float eps, bool silu) {
    uint32_t bits;
    std::memcpy(&bits, &eps, 4);
    return reinterpret_cast<void *>(uintptr_t(groups) | (uintptr_t(silu) << 16) | (uintptr_t(bits) << 32));
}

void norm_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *x = dst->src[0], *gamma = dst->src[1], *beta = dst->src[2];
    const auto p = reinterpret_cast<uintptr_t>(userdata);
    const uint32_t bits = uint32_t(p >> 32);
    float eps;
    std::memcpy(&eps, &bits, 4);
    group_norm_f32(static_cast<const float *>(x->data), static_cast<const float *>(gamma->data),
                   static_cast<const float *>(beta->data), static_cast<float *>(dst->data), x->ne[0] * x->ne[1],
                   x->ne[2], int(p & 0xffff), eps, (p >> 16) & 1, ith, nth, norm_engine_path());
}
}  // namespace

ggml_tensor *group_norm_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *gamma, ggml_tensor *beta, int groups,
                           float eps, bool silu) {
    static_assert(sizeof(uintptr_t) >= 8, "the op's parameters travel in a 64-bit pointer value");
    if (groups < 1 || groups > 0xffff || x->type != GGML_TYPE_F32 || !ggml_is_contiguous(x) || x->ne[3] != 1 ||
        x->ne[2] % groups != 0 || !gamma || !beta || gamma->type != GGML_TYPE_F32 || beta->type != GGML_TYPE_F32 ||
        ggml_nelements(gamma) != x->ne[2] || ggml_nelements(beta) != x->ne[2] || !ggml_is_contiguous(gamma) ||
        !ggml_is_contiguous(beta))
        fail_runtime("internal error: group_norm_op takes contiguous F32 x [W, H, C, 1] (C a multiple of the groups) "
                     "and F32 gamma, beta [C]");
    ggml_tensor *args[3] = {x, gamma, beta};
    ggml_tensor *out = ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0], x->ne[1], x->ne[2], 1, args, 3, norm_node,
                                      GGML_N_TASKS_MAX, norm_params(groups, eps, silu));
    ggml_set_name(out, "fm.norm");  // for FLUXMINI_PROFILE's table
    return out;
}

}  // namespace fm
