// Int8 dot-product peak of one core: the clock (a chain of dependent imuls, 3 cycles each) and the
// throughput of vpdpbusd zmm / ymm and vpmaddubsw ymm per cycle (12 independent accumulators, more
// than latency x throughput, so only the ports limit them). Each figure is the best of many short
// runs (0.1-1 ms), which on a shared machine are the runs nobody interrupted.
// Build: gcc -O2 benchmarks/cpu_peak.c -o /tmp/cpu_peak (x86-64; lines for what the CPU lacks are
// skipped). Prints one "name value" per line; benchmarks/bench_qmatmul.py reads them.
#include <cpuid.h>
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define IMUL "imul %[one],%[x]\n\t"
static double seconds_per_cycle(long it) {
    long x = 1, one = 1;
    double t = now();
    for (long i = 0; i < it; i++) __asm__ volatile(IMUL IMUL IMUL : [x] "+r"(x) : [one] "r"(one));
    return (now() - t) / (it * 9.0);
}

#define BARRIER6(a, b, c, d, e, f) __asm__ volatile("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d), "+v"(e), "+v"(f))

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static double zmm_dpbusd(long it) {
    __m512i w = _mm512_set1_epi8(3), a = _mm512_set1_epi8(5);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
            c9 = c0, c10 = c0, c11 = c0;
    double t = now();
    for (long i = 0; i < it; i++) {
#define D(c) c = _mm512_dpbusd_epi32(c, w, a);
        D(c0) D(c1) D(c2) D(c3) D(c4) D(c5) D(c6) D(c7) D(c8) D(c9) D(c10) D(c11)
#undef D
        BARRIER6(c0, c1, c2, c3, c4, c5);
        BARRIER6(c6, c7, c8, c9, c10, c11);
    }
    return (now() - t) / (it * 12.0);
}

__attribute__((target("avx2,avxvnni"))) static double ymm_dpbusd(long it) {
    __m256i w = _mm256_set1_epi8(3), a = _mm256_set1_epi8(5);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
            c9 = c0, c10 = c0, c11 = c0;
    double t = now();
    for (long i = 0; i < it; i++) {
#define D(c) c = _mm256_dpbusd_avx_epi32(c, w, a);
        D(c0) D(c1) D(c2) D(c3) D(c4) D(c5) D(c6) D(c7) D(c8) D(c9) D(c10) D(c11)
#undef D
        BARRIER6(c0, c1, c2, c3, c4, c5);
        BARRIER6(c6, c7, c8, c9, c10, c11);
    }
    return (now() - t) / (it * 12.0);
}

// vpmaddubsw alone (what AVX2 has for u8 x s8; its int16 results still need adding up).
__attribute__((target("avx2"))) static double ymm_maddubs(long it) {
    __m256i w = _mm256_set1_epi8(3), a0 = _mm256_set1_epi8(5), a1 = _mm256_set1_epi8(6), a2 = _mm256_set1_epi8(7),
            a3 = _mm256_set1_epi8(8), a4 = _mm256_set1_epi8(9), a5 = _mm256_set1_epi8(10);
    __m256i r0, r1, r2, r3, r4, r5;
    double t = now();
    for (long i = 0; i < it; i++) {
        r0 = _mm256_maddubs_epi16(w, a0); r1 = _mm256_maddubs_epi16(w, a1); r2 = _mm256_maddubs_epi16(w, a2);
        r3 = _mm256_maddubs_epi16(w, a3); r4 = _mm256_maddubs_epi16(w, a4); r5 = _mm256_maddubs_epi16(w, a5);
        BARRIER6(r0, r1, r2, r3, r4, r5);
        r0 = _mm256_maddubs_epi16(w, r0); r1 = _mm256_maddubs_epi16(w, r1); r2 = _mm256_maddubs_epi16(w, r2);
        r3 = _mm256_maddubs_epi16(w, r3); r4 = _mm256_maddubs_epi16(w, r4); r5 = _mm256_maddubs_epi16(w, r5);
        BARRIER6(r0, r1, r2, r3, r4, r5);
        BARRIER6(a0, a1, a2, a3, a4, a5);
    }
    return (now() - t) / (it * 12.0);
}

int main(void) {
    unsigned a, b, c, d;
    __cpuid_count(7, 0, a, b, c, d);
    const int has_zmm = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && (c & (1u << 11));
    __cpuid_count(7, 1, a, b, c, d);
    const int has_avxvnni = (a >> 4) & 1;
    double cyc = 1e9, z = 1e9, y = 1e9, m = 1e9;
    for (int r = 0; r < 300; r++) {
        double v = seconds_per_cycle(100000);
        if (v < cyc) cyc = v;
        if (has_zmm && (v = zmm_dpbusd(20000)) < z) z = v;
        if (has_avxvnni && (v = ymm_dpbusd(20000)) < y) y = v;
        if ((v = ymm_maddubs(20000)) < m) m = v;
    }
    printf("clock_ghz %.3f\n", 1e-9 / cyc);
    // ops = 2 per byte product (multiply + add), as GEMM FLOP counts go
    if (has_zmm) printf("vpdpbusd_zmm_per_cycle %.3f\nvpdpbusd_zmm_gops %.1f\n", cyc / z, 128 / z * 1e-9);
    if (has_avxvnni) printf("vpdpbusd_ymm_per_cycle %.3f\nvpdpbusd_ymm_gops %.1f\n", cyc / y, 64 / y * 1e-9);
    printf("vpmaddubsw_ymm_per_cycle %.3f\nvpmaddubsw_ymm_gops %.1f\n", cyc / m, 64 / m * 1e-9);
    return 0;
}
