// F32 FMA throughput of one core: the register peak, and the inner loops of fluxmini's register
// tiles run with every operand in L1 (the most the tile can give in the kernel around it).
//   fma ymm / zmm          12 independent vfmadd231ps chains, registers only
//   attention AVX2 RxV     csrc/cpu_attention_impl.inc's score loop: per channel, V vector loads
//                          of Qᵀ and R broadcasts of K, R·V FMAs (ours: 4 x 3); d = 128, then stored
//   conv AVX-512 16x16     csrc/cpu_conv.cpp's zmm tile: one packed-panel load, 16 broadcast FMAs
// Build: gcc -O3 -funroll-all-loops benchmarks/tile_peak.c -o /tmp/tile_peak (x86-64; the zmm lines
// need AVX-512 F). Two figures each: the best of 300 short runs (~40 µs to ~1 ms: the core's rate in
// its fastest moments) and the mean over one second of back-to-back runs (what a kernel that runs
// for seconds can get). On a virtual machine the two differ: on the project's VM the sustained
// register peak was 0.78-0.83 of the short-run best (2026-12-02), whatever else ran.
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


static float *q, *k, *o, *xp, *wt;
static void run_fma_ymm(long n) { fma_ymm(n); }
static void run_fma_zmm(long n) { fma_zmm(n); }
#define RUN_ATT(R, V) \
    static void run_att##R##x##V(long n) { for (long i = 0; i < n; i++) att##R##x##V(q, k, 128, o); }
RUN_ATT(4, 3)
RUN_ATT(3, 4)
RUN_ATT(6, 2)
RUN_ATT(2, 6)
static void run_conv16(long n) { for (long i = 0; i < n; i++) conv16(xp, wt, 128, o); }

// GFLOP/s of fn(n) doing n units of `flops` each: best of 300 runs of `units`, and sustained (1 s).
static void measure(const char *name, void (*fn)(long), long units, double flops, double ref_best, double ref_sus,
                    double *best_out, double *sus_out) {
    double best = 1e9, t;
    for (int r = 0; r < 300; r++) {
        t = now(); fn(units); t = now() - t;
        if (t < best) best = t;
    }
    long done = 0;
    const double t0 = now();
    do { fn(units); done += units; } while (now() - t0 < 1.0);
    const double g_best = units * flops / best * 1e-9, g_sus = done * flops / (now() - t0) * 1e-9;
    printf("%-32s %7.1f %7.1f", name, g_best, g_sus);
    if (ref_best > 0) printf("   %3.0f%% %3.0f%%", 100 * g_best / ref_best, 100 * g_sus / ref_sus);
    printf("\n");
    if (best_out) *best_out = g_best, *sus_out = g_sus;
}

int main(void) {
    const int zmm = __builtin_cpu_supports("avx512f");
    q = aligned_alloc(64, 96 * 128 * 4), k = aligned_alloc(64, 8 * 128 * 4), o = aligned_alloc(64, 4096 * 4);
    xp = aligned_alloc(64, 128 * 16 * 4), wt = aligned_alloc(64, 128 * 16 * 4);
    for (int i = 0; i < 96 * 128; i++) q[i] = 1e-3f * (i % 7);
    for (int i = 0; i < 8 * 128; i++) k[i] = 1e-3f * (i % 5);
    for (int i = 0; i < 128 * 16; i++) xp[i] = 1e-3f * (i % 3), wt[i] = 1e-3f * (i % 11);
    for (int i = 0; i < 4096; i++) o[i] = 0;
    printf("%-32s %7s %7s   %s\n", "GFLOP/s, 1 thread", "best", "1 s", "(of the fma peak: best, 1 s)");
    double yb, ys, zb = 0, zs = 0;
    measure("fma ymm (registers)", run_fma_ymm, 20000, 12 * 16, 0, 0, &yb, &ys);
    if (zmm) measure("fma zmm (registers)", run_fma_zmm, 20000, 12 * 32, 0, 0, &zb, &zs);
    measure("attention AVX2 4x3 (L1; ours)", run_att4x3, 50, 128 * 4 * 3 * 16, yb, ys, 0, 0);
    measure("attention AVX2 3x4 (L1)", run_att3x4, 50, 128 * 3 * 4 * 16, yb, ys, 0, 0);
    measure("attention AVX2 6x2 (L1)", run_att6x2, 50, 128 * 6 * 2 * 16, yb, ys, 0, 0);
    measure("attention AVX2 2x6 (L1)", run_att2x6, 50, 128 * 2 * 6 * 16, yb, ys, 0, 0);
    if (zmm) measure("conv AVX-512 16x16 (L1, kc 128)", run_conv16, 50, 128 * 16 * 32, zb, zs, 0, 0);
    return o[5] == 12345.0f;
}
