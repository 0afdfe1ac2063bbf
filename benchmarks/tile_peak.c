// F32 FMA throughput of one core: the register peak, and the inner loops of fluxmini's register
// tiles run with every operand in L1 (the most the tile can give in the kernel around it).
//   fma ymm / zmm          12 independent vfmadd231ps chains, registers only
//   attention AVX2 RxV     csrc/cpu_attention_impl.inc's score loop: per channel, V vector loads
//                          of Qᵀ and R broadcasts of K, R·V FMAs (ours: 4 x 3); d = 128, then stored
//   conv AVX-512 16x16     csrc/cpu_conv.cpp's zmm tile: one packed-panel load, 16 broadcast FMAs
// Build: gcc -O3 -funroll-all-loops benchmarks/tile_peak.c -o /tmp/tile_peak (x86-64; the zmm lines
// need AVX-512 F). Best of many short runs, so time the machine spent elsewhere does not count.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define FMA12(reg)                                                                                            \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "3\n\t"                                                      \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "4\n\tvfmadd231ps %%" reg "1, %%" reg "2, %%" reg "5\n\t"    \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "6\n\tvfmadd231ps %%" reg "1, %%" reg "2, %%" reg "7\n\t"    \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "8\n\tvfmadd231ps %%" reg "1, %%" reg "2, %%" reg "9\n\t"    \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "10\n\tvfmadd231ps %%" reg "1, %%" reg "2, %%" reg "11\n\t"  \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "12\n\tvfmadd231ps %%" reg "1, %%" reg "2, %%" reg "13\n\t"  \
    "vfmadd231ps %%" reg "1, %%" reg "2, %%" reg "14\n\t"

__attribute__((noinline, target("avx2,fma"))) static void fma_ymm(long n) {
    for (long i = 0; i < n; i++)
        __asm__ volatile(FMA12("ymm") ::: "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
                         "xmm12", "xmm13", "xmm14");
}

__attribute__((noinline, target("avx512f"))) static void fma_zmm(long n) {
    for (long i = 0; i < n; i++)
        __asm__ volatile(FMA12("zmm") ::: "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",
                         "xmm12", "xmm13", "xmm14");
}

#define ATT_TILE(R, V)                                                                                         \
    __attribute__((noinline, target("avx2,fma"))) static void att##R##x##V(const float *qt, const float *k,   \
                                                                           long d, float *out) {               \
        __m256 a[R][V];                                                                                        \
        for (int r = 0; r < R; r++)                                                                            \
            for (int v = 0; v < V; v++) a[r][v] = _mm256_setzero_ps();                                         \
        for (long c = 0; c < d; c++, qt += 96) {                                                               \
            __m256 q[V];                                                                                       \
            for (int v = 0; v < V; v++) q[v] = _mm256_loadu_ps(qt + 8 * v);                                    \
            for (int r = 0; r < R; r++) {                                                                      \
                const __m256 b = _mm256_set1_ps(k[r * 128 + c]);                                               \
                for (int v = 0; v < V; v++) a[r][v] = _mm256_fmadd_ps(b, q[v], a[r][v]);                       \
            }                                                                                                  \
        }                                                                                                      \
        for (int r = 0; r < R; r++)                                                                            \
            for (int v = 0; v < V; v++) _mm256_storeu_ps(out + 8 * (r * V + v), a[r][v]);                      \
    }
ATT_TILE(4, 3)
ATT_TILE(3, 4)
ATT_TILE(6, 2)
ATT_TILE(2, 6)

__attribute__((noinline, target("avx512f"))) static void conv16(const float *xp, const float *wt, long kc, float *c) {
    __m512 a[16];
    for (int r = 0; r < 16; r++) a[r] = _mm512_loadu_ps(c + 16 * r);
    for (long k = 0; k < kc; k++, wt += 16) {
        const __m512 x = _mm512_load_ps(xp + 16 * k);
        for (int r = 0; r < 16; r++) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(wt[r]), x, a[r]);
    }
    for (int r = 0; r < 16; r++) _mm512_storeu_ps(c + 16 * r, a[r]);
}

typedef void (*att_fn)(const float *, const float *, long, float *);

int main(void) {
    const int zmm = __builtin_cpu_supports("avx512f");
    float *q = aligned_alloc(64, 96 * 128 * 4), *k = aligned_alloc(64, 8 * 128 * 4), *o = aligned_alloc(64, 4096 * 4);
    float *xp = aligned_alloc(64, 128 * 16 * 4), *wt = aligned_alloc(64, 128 * 16 * 4);
    for (int i = 0; i < 96 * 128; i++) q[i] = 1e-3f * (i % 7);
    for (int i = 0; i < 8 * 128; i++) k[i] = 1e-3f * (i % 5);
    for (int i = 0; i < 128 * 16; i++) xp[i] = 1e-3f * (i % 3), wt[i] = 1e-3f * (i % 11);
    for (int i = 0; i < 4096; i++) o[i] = 0;
    double best, t;
    best = 1e9;
    for (int r = 0; r < 300; r++) {
        t = now(); fma_ymm(20000); t = now() - t;
        if (t < best) best = t;
    }
    const double peak_ymm = 20000.0 * 12 * 16 / best * 1e-9;
    printf("fma ymm (registers): %.1f GFLOP/s\n", peak_ymm);
    if (zmm) {
        best = 1e9;
        for (int r = 0; r < 300; r++) {
            t = now(); fma_zmm(20000); t = now() - t;
            if (t < best) best = t;
        }
        printf("fma zmm (registers): %.1f GFLOP/s\n", 20000.0 * 12 * 32 / best * 1e-9);
    }
    const att_fn fns[] = {att4x3, att3x4, att6x2, att2x6};
    const int R[] = {4, 3, 6, 2}, V[] = {3, 4, 2, 6};
    for (int i = 0; i < 4; i++) {
        best = 1e9;
        for (int r = 0; r < 300; r++) {
            t = now();
            for (int j = 0; j < 50; j++) fns[i](q, k, 128, o);
            t = now() - t;
            if (t < best) best = t;
        }
        const double g = 50.0 * 128 * R[i] * V[i] * 16 / best * 1e-9;
        printf("attention AVX2 %dx%d (L1): %.1f GFLOP/s = %.0f%% of fma ymm%s\n", R[i], V[i], g, 100 * g / peak_ymm,
               i == 0 ? " (ours)" : "");
    }
    if (zmm) {
        best = 1e9;
        for (int r = 0; r < 300; r++) {
            t = now();
            for (int j = 0; j < 50; j++) conv16(xp, wt, 128, o);
            t = now() - t;
            if (t < best) best = t;
        }
        printf("conv AVX-512 16x16 (L1, kc 128): %.1f GFLOP/s\n", 50.0 * 128 * 16 * 32 / best * 1e-9);
    }
    return o[5] == 12345.0f;
}
