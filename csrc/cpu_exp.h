// e^−v on 8 floats for the AVX2 elementwise ops (cpu_norm.cpp's SiLU, cpu_gelu.cpp's GELU): both
// are x·sigmoid(·) = x / (1 + e^−v). The attention kernel has its own 2^x (cpu_attention_impl.inc),
// written once for every vector width.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

namespace fm {

// 2^t with t = −v·log2 e clamped to [−126, 126] (beyond, a sigmoid of v is 0 or 1 to within F32),
// 2^f for f = t − round(t) ∈ [−1/2, 1/2] by a degree-5 polynomial (relative error ≤ 1.6e-7), 2^round(t)
// built in the exponent field.
__attribute__((target("avx2,fma"))) inline __m256 exp_neg_avx2(__m256 v) {
    __m256 t = _mm256_mul_ps(v, _mm256_set1_ps(-1.4426950408889634f));
    t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(-126.0f)), _mm256_set1_ps(126.0f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(0.001326472731307149f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.009671512991189957f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.05550733581185341f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.24022242426872253f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931470036506653f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

}  // namespace fm
#endif
