// Q4_0 / Q4_1 / Q8_0 x Q8 GEMM for the CPU, one path per x86-64 level (see cpu_qmatmul.h).
//
// The integer dot products multiply unsigned by signed bytes (vpdpbusd, vpmaddubsw), so weights
// enter with a zero point: Q4_0 nibbles are 0..15 for values q − 8, Q8_0 bytes are stored as
// q + 128; Σ(q_w − zp)·q_a is the unsigned product minus zp·Σq_a, the latter computed once per
// activation block. Q4_1 (d·q + m) adds m·d_a·Σq_a per block instead.
//
// Layout of the work: each thread owns a range of column units (8 columns for the ymm paths, 16
// for zmm). Per pass of kBlocksPerPass blocks (1024 values of k) it unpacks the weights of 64
// columns into a "panel": for every block and unit, 8 registers, register g holding values
// 4g..4g+3 of each of the unit's columns (what one dot-product instruction multiplies with 4
// bytes of one activation row, broadcast), then the unit's weight scales and (Q4_1) minimums.
// The weights are read in place from the file mapping: the panel is a per-thread buffer (80 KiB,
// in L2), refilled per pass. Each pass reloads and stores the F32 accumulators of every row tile:
// 32 blocks a pass ran the Q4_0 GEMM 1.1-1.2x faster than 8 (a 20 KiB panel in L1) on every
// path (benchmarks/bench_qmatmul.py, Sapphire Rapids). The register tiles are 6 activation rows x 8 columns
// (ymm) or 6 x 32 (two zmm units): integer accumulators for a block's sums, and F32 accumulators
// they are scaled into. Activations are quantized once per matmul, by their own graph node.
//
// vpmaddubsw (AVX2) adds pairs of products into saturating int16: Q4 nibbles (≤ 15) times
// activations (|q| ≤ 127) give pair sums ≤ 3810, so a whole block (8 such sums per lane) stays
// ≤ 30480 and is widened once per block with vpmaddwd. Q8_0's bytes would saturate, so the AVX2
// path splits them into their two nibbles (q + 128 = 16·hi + lo), two panels of the Q4 kind.
#include "cpu_qmatmul.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_QMM_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace fm {

namespace {
constexpr int64_t kBlocksPerPass = 32;  // blocks (of 32 values) per pass over k
constexpr int64_t kChunkColumns = 64;  // columns unpacked together

// ggml's blocks: Q4_0 {F16 d; 16 bytes of nibbles} (value d·(q − 8)), Q4_1 {F16 d, m; 16 bytes of
// nibbles} (value d·q + m), Q8_0 {F16 d; 32 signed bytes} (value d·q).
size_t block_bytes(ggml_type t) { return t == GGML_TYPE_Q4_0 ? 18 : t == GGML_TYPE_Q4_1 ? 20 : 34; }
int32_t zero_point(ggml_type t) { return t == GGML_TYPE_Q4_0 ? 8 : t == GGML_TYPE_Q4_1 ? 0 : 128; }
size_t quants_offset(ggml_type t) { return t == GGML_TYPE_Q4_1 ? 4 : 2; }

// Weight value j (0..31) of a block as the unsigned byte the dot products take (value + zero point).
inline int32_t weight_u8(ggml_type t, const uint8_t *blk, int j) {
    const uint8_t *qs = blk + quants_offset(t);
    if (t != GGML_TYPE_Q8_0) return j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
    return int32_t(int8_t(qs[j])) + 128;
}

struct CpuFeatures {
    bool avx2 = false;        // AVX2 + FMA + F16C, ymm state enabled by the OS
    bool avxvnni = false;     // and AVX-VNNI (VEX)
    bool avx512vnni = false;  // and AVX-512 F/BW/VL/VNNI, zmm state enabled by the OS
};

const CpuFeatures &cpu_features() {
    static const CpuFeatures features = [] {
        CpuFeatures f;
#ifdef FM_QMM_X86
        unsigned a = 0, b = 0, c = 0, d = 0;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
        const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
        if (!osxsave || !avx || __get_cpuid_max(0, nullptr) < 7) return f;
        unsigned xcr0_lo = 0, xcr0_hi = 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
        const bool ymm_state = (xcr0_lo & 0x6) == 0x6;     // SSE + AVX state
        const bool zmm_state = (xcr0_lo & 0xE6) == 0xE6;   // and opmask, ZMM0-15 upper halves, ZMM16-31
        __cpuid_count(7, 0, a, b, c, d);
        const unsigned max_subleaf = a;
        const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30),
                   avx512vl = b & (1u << 31), avx512vnni = c & (1u << 11);
        bool avxvnni = false;
        if (max_subleaf >= 1) {
            __cpuid_count(7, 1, a, b, c, d);
            avxvnni = a & (1u << 4);
        }
        f.avx2 = ymm_state && avx2 && fma && f16c;
        f.avxvnni = f.avx2 && avxvnni;
        f.avx512vnni = f.avx2 && zmm_state && avx512f && avx512bw && avx512vl && avx512vnni;
#endif
        return f;
    }();
    return features;
}

float fp16_to_f32(const uint8_t *p) {
    ggml_fp16_t h;
    std::memcpy(&h, p, 2);
    return ggml_fp16_to_fp32(h);
}

// Plain C++ versions: the portable path, and the reference the vector code must agree with.
void quantize_rows_q8_portable(const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out, bool f16_scales) {
    const int64_t nb = k / 32;
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            const float *xb = x + r * k + b * 32;
            QuantBlock &q = out[r * nb + b];
            float amax = 0;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
            q.d = f16_scales ? ggml_fp16_to_fp32(ggml_fp32_to_fp16(amax / 127.0f)) : amax / 127.0f;
            const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            int32_t sum = 0;
            for (int j = 0; j < 32; ++j) {
                q.q[j] = int8_t(std::nearbyint(xb[j] * id));
                sum += q.q[j];
            }
            q.sum = sum;
        }
}

void gemm_portable(ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x, const float *bias,
                   float *out, int64_t rows, int64_t n, int64_t k, int ith, int nth) {
    const int64_t nb = k / 32;
    const size_t bb = block_bytes(type);
    const int32_t zp = zero_point(type);
    for (int64_t c = n * ith / nth; c < n * (ith + 1) / nth; ++c)
        for (int64_t r = 0; r < rows; ++r) {
            float acc = bias ? bias[c] : 0.0f;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t *blk = w + size_t(c) * row_bytes + size_t(b) * bb;
                const QuantBlock &q = x[r * nb + b];
                int32_t dot = 0;
                for (int j = 0; j < 32; ++j) dot += weight_u8(type, blk, j) * q.q[j];
                acc += float(dot - zp * q.sum) * (fp16_to_f32(blk) * q.d);
                if (type == GGML_TYPE_Q4_1) acc += fp16_to_f32(blk + 2) * (q.d * float(q.sum));
            }
            out[r * n + c] = acc;
        }
}


}  // namespace

#ifdef FM_QMM_X86
namespace {

__attribute__((target("avx2,fma"))) void quantize_rows_q8_avx2(const float *x, int64_t k, int64_t r0, int64_t r1,
                                                              QuantBlock *out, bool f16_scales) {
    const int64_t nb = k / 32;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = r0; r < r1; ++r) {
        const float *xr = x + r * k;
        QuantBlock *q = out + r * nb;
        for (int64_t b = 0; b < nb; ++b, xr += 32, ++q) {
            __m256 v0 = _mm256_loadu_ps(xr), v1 = _mm256_loadu_ps(xr + 8);
            __m256 v2 = _mm256_loadu_ps(xr + 16), v3 = _mm256_loadu_ps(xr + 24);
            __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float amax = _mm_cvtss_f32(m4);
            const float d = amax / 127.0f;
            const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
            // Round to nearest even (the default rounding mode), as ggml does.
            const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, id)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, id));
            const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, id)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, id));
            __m256i sum = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
            q->d = f16_scales ? ggml_fp16_to_fp32(ggml_fp32_to_fp16(d)) : d;
            q->sum = _mm_cvtsi128_si32(s4);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(q->q), _mm256_permutevar8x32_epi32(p, order));
        }
    }
}

// Panel geometry of a path: units of 8·halves columns (1: ymm, 2: zmm); planes = 2 where Q8_0
// bytes are split into nibbles (AVX2). Per block and unit: planes x 8 registers of 32·halves
// bytes, then 8·halves scales and 8·halves minimums (F32).
struct Geometry {
    int halves = 1, planes = 1;
    int64_t unit() const { return 8 * halves; }
    int64_t reg_bytes() const { return 32 * halves; }
    int64_t scales_offset() const { return planes * 8 * reg_bytes(); }
    int64_t block_bytes() const { return scales_offset() + 2 * 4 * unit(); }
};

// Unpacks columns c0 .. c0 + ncols − 1 (ncols ≤ unit, a multiple of 8; missing columns become
// zeros) of blocks [b0, b0 + nblk) into the panel layout.
__attribute__((target("avx2,fma,f16c"))) void pack_unit(ggml_type type, const uint8_t *w, size_t row_bytes,
                                                       int64_t c0, int64_t ncols, int64_t b0, int64_t nblk,
                                                       const Geometry &geo, uint8_t *dst) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i low4x2 = _mm256_set1_epi8(0x0F);
    const __m256i flip = _mm256_set1_epi8(char(0x80));
    const size_t bb = block_bytes(type);
    const int64_t rb = geo.reg_bytes();
    for (int64_t b = 0; b < nblk; ++b, dst += geo.block_bytes()) {
        float *scales = reinterpret_cast<float *>(dst + geo.scales_offset()), *mins = scales + geo.unit();
        for (int h = 0; h < geo.halves; ++h) {
            if (8 * h >= ncols) {  // padding columns: zero weights and scales
                for (int p = 0; p < geo.planes; ++p)
                    for (int g = 0; g < 8; ++g)
                        _mm256_store_si256(reinterpret_cast<__m256i *>(dst + (p * 8 + g) * rb + 32 * h),
                                           _mm256_setzero_si256());
                for (int c = 0; c < 8; ++c) scales[8 * h + c] = mins[8 * h + c] = 0.0f;
                continue;
            }
            __m256 r[8];
            for (int c = 0; c < 8; ++c) {
                const uint8_t *blk = w + size_t(c0 + 8 * h + c) * row_bytes + size_t(b0 + b) * bb;
                uint16_t hd[2];
                std::memcpy(hd, blk, 4);  // d, and m for Q4_1 (the first quants otherwise, unused)
                scales[8 * h + c] = _cvtsh_ss(hd[0]);
                mins[8 * h + c] = type == GGML_TYPE_Q4_1 ? _cvtsh_ss(hd[1]) : 0.0f;
                if (type != GGML_TYPE_Q8_0) {
                    const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + quants_offset(type)));
                    const __m128i lo = _mm_and_si128(qs, low4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low4);
                    r[c] = _mm256_castsi256_ps(_mm256_set_m128i(hi, lo));  // values 0..31 of column c
                } else {  // signed bytes + 128
                    const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + quants_offset(type)));
                    r[c] = _mm256_castsi256_ps(_mm256_xor_si256(qs, flip));
                }
            }
            for (int p = 0; p < geo.planes; ++p) {
                __m256 v[8];
                for (int c = 0; c < 8; ++c) {
                    if (geo.planes == 1) v[c] = r[c];
                    else {  // nibble p of each byte
                        const __m256i bytes = _mm256_castps_si256(r[c]);
                        v[c] = _mm256_castsi256_ps(_mm256_and_si256(p ? _mm256_srli_epi16(bytes, 4) : bytes, low4x2));
                    }
                }
                // 8x8 transpose of 4-byte groups: register g gets group g of every column.
                const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
                const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
                const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
                const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
                const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
                const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
                const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
                const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
                auto reg = [&](int g) { return reinterpret_cast<float *>(dst + (p * 8 + g) * rb + 32 * h); };
                _mm256_store_ps(reg(0), _mm256_permute2f128_ps(u0, u4, 0x20));
                _mm256_store_ps(reg(1), _mm256_permute2f128_ps(u1, u5, 0x20));
                _mm256_store_ps(reg(2), _mm256_permute2f128_ps(u2, u6, 0x20));
                _mm256_store_ps(reg(3), _mm256_permute2f128_ps(u3, u7, 0x20));
                _mm256_store_ps(reg(4), _mm256_permute2f128_ps(u0, u4, 0x31));
                _mm256_store_ps(reg(5), _mm256_permute2f128_ps(u1, u5, 0x31));
                _mm256_store_ps(reg(6), _mm256_permute2f128_ps(u2, u6, 0x31));
                _mm256_store_ps(reg(7), _mm256_permute2f128_ps(u3, u7, 0x31));
            }
        }
    }
}

inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// The tiles: rows a[0..nrows) (row stride lda blocks; nrows ≤ 6, missing rows repeat row 0 and
// are not stored) x one panel unit, blocks [0, nblk) of the panel. Named accumulators: with
// arrays GCC spills them to the stack on every step. kMin: Q4_1's per-block minimum m, which adds
// m·d_a·Σq_a. The float steps are the same in every vector path (scale = d_w·d_a, then one fused
// multiply-add of the corrected integer sum), so their results are bit-identical.
#define FM_ROWS                                                                                            \
    const QuantBlock *a0 = a, *a1 = a + (nrows > 1 ? 1 : 0) * lda, *a2 = a + (nrows > 2 ? 2 : 0) * lda;   \
    const QuantBlock *a3 = a + (nrows > 3 ? 3 : 0) * lda, *a4 = a + (nrows > 4 ? 4 : 0) * lda;             \
    const QuantBlock *a5 = a + (nrows > 5 ? 5 : 0) * lda;
#define FM_EACH_ROW(M) M(0) M(1) M(2) M(3) M(4) M(5)

// AVX-VNNI: vpdpbusd ymm (VEX), 8 columns.
template <bool kMin>
__attribute__((target("avx2,fma,avxvnni"))) void tile_avxvnni(const uint8_t *panel, int64_t pbb, const QuantBlock *a,
                                                             int64_t lda, int nrows, int64_t nblk, int32_t zp,
                                                             float *out, int64_t ldo, bool init, const float *bias) {
    FM_ROWS
    const __m256 b8 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 f0, f1, f2, f3, f4, f5;
#define FM_INIT(r) f##r = (r < nrows && !init) ? _mm256_loadu_ps(out + r * ldo) : b8;
    FM_EACH_ROW(FM_INIT)
#undef FM_INIT
    for (int64_t b = 0; b < nblk; ++b, panel += pbb) {
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0, i4 = i0, i5 = i0;
        for (int g = 0; g < 8; ++g) {
            const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i *>(panel + 32 * g));
#define FM_DOT(r) i##r = _mm256_dpbusd_avx_epi32(i##r, wv, _mm256_set1_epi32(load_i32(a##r[b].q + 4 * g)));
            FM_EACH_ROW(FM_DOT)
#undef FM_DOT
        }
        const __m256 dw = _mm256_load_ps(reinterpret_cast<const float *>(panel + 256));
#define FM_SCALE(r)                                                                                              \
    f##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i##r, _mm256_set1_epi32(zp * a##r[b].sum))),  \
                           _mm256_mul_ps(dw, _mm256_set1_ps(a##r[b].d)), f##r);
        FM_EACH_ROW(FM_SCALE)
#undef FM_SCALE
        if (kMin) {
            const __m256 mw = _mm256_load_ps(reinterpret_cast<const float *>(panel + 288));
#define FM_MIN(r) f##r = _mm256_fmadd_ps(mw, _mm256_set1_ps(a##r[b].d * float(a##r[b].sum)), f##r);
            FM_EACH_ROW(FM_MIN)
#undef FM_MIN
        }
    }
#define FM_STORE(r) \
    if (r < nrows) _mm256_storeu_ps(out + r * ldo, f##r);
    FM_EACH_ROW(FM_STORE)
#undef FM_STORE
}

// AVX2: vpmaddubsw into int16 per block (exact, see the top of the file), vpmaddwd to int32.
// kSplit: Q8_0 as two nibble planes (q + 128 = 16·hi + lo), 4 rows (16 registers).
template <bool kMin, bool kSplit>
__attribute__((target("avx2,fma"))) void tile_avx2(const uint8_t *panel, int64_t pbb, const QuantBlock *a,
                                                  int64_t lda, int nrows, int64_t nblk, int32_t zp, float *out,
                                                  int64_t ldo, bool init, const float *bias) {
    FM_ROWS
    const __m256 b8 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1), sixteens = _mm256_set1_epi16(16);
    const int64_t scales = kSplit ? 512 : 256;
    __m256 f0, f1, f2, f3, f4 = b8, f5 = b8;
#define FM_INIT(r) f##r = (r < nrows && !init) ? _mm256_loadu_ps(out + r * ldo) : b8;
    FM_INIT(0) FM_INIT(1) FM_INIT(2) FM_INIT(3)
    if (!kSplit) { FM_INIT(4) FM_INIT(5) }
#undef FM_INIT
    for (int64_t b = 0; b < nblk; ++b, panel += pbb) {
        __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0;  // int16 sums
        __m256i h0 = s0, h1 = s0, h2 = s0, h3 = s0, h4 = s0, h5 = s0;                     // kSplit: high nibbles
        for (int g = 0; g < 8; ++g) {
            const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i *>(panel + 32 * g));
            if (kSplit) {
                const __m256i wh = _mm256_load_si256(reinterpret_cast<const __m256i *>(panel + 256 + 32 * g));
#define FM_DOT(r)                                                               \
    {                                                                           \
        const __m256i av = _mm256_set1_epi32(load_i32(a##r[b].q + 4 * g));      \
        s##r = _mm256_add_epi16(s##r, _mm256_maddubs_epi16(wv, av));            \
        h##r = _mm256_add_epi16(h##r, _mm256_maddubs_epi16(wh, av));            \
    }
                FM_DOT(0) FM_DOT(1) FM_DOT(2) FM_DOT(3)
#undef FM_DOT
            } else {
#define FM_DOT(r) s##r = _mm256_add_epi16(s##r, _mm256_maddubs_epi16(wv, _mm256_set1_epi32(load_i32(a##r[b].q + 4 * g))));
                FM_EACH_ROW(FM_DOT)
#undef FM_DOT
            }
            // Keep the sums in their registers step by step: left free, GCC regroups the additions
            // into a tree over all 8 steps and spills its 48 products to the stack.
            __asm__("" : "+x"(s0), "+x"(s1), "+x"(s2), "+x"(s3), "+x"(s4), "+x"(s5));
            if (kSplit) __asm__("" : "+x"(h0), "+x"(h1), "+x"(h2), "+x"(h3));
        }
        const __m256 dw = _mm256_load_ps(reinterpret_cast<const float *>(panel + scales));
#define FM_SCALE(r)                                                                                               \
    {                                                                                                             \
        __m256i i = _mm256_madd_epi16(s##r, ones);                                                                \
        if (kSplit) i = _mm256_add_epi32(i, _mm256_madd_epi16(h##r, sixteens));                                   \
        f##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i, _mm256_set1_epi32(zp * a##r[b].sum))),   \
                               _mm256_mul_ps(dw, _mm256_set1_ps(a##r[b].d)), f##r);                               \
    }
        FM_SCALE(0) FM_SCALE(1) FM_SCALE(2) FM_SCALE(3)
        if (!kSplit) { FM_SCALE(4) FM_SCALE(5) }
#undef FM_SCALE
        if (kMin) {
            const __m256 mw = _mm256_load_ps(reinterpret_cast<const float *>(panel + scales + 32));
#define FM_MIN(r) f##r = _mm256_fmadd_ps(mw, _mm256_set1_ps(a##r[b].d * float(a##r[b].sum)), f##r);
            FM_EACH_ROW(FM_MIN)
#undef FM_MIN
        }
    }
#define FM_STORE(r) \
    if (r < nrows) _mm256_storeu_ps(out + r * ldo, f##r);
    FM_STORE(0) FM_STORE(1) FM_STORE(2) FM_STORE(3)
    if (!kSplit) { FM_STORE(4) FM_STORE(5) }
#undef FM_STORE
}

// vpdpbusd zmm with the activations' 4 bytes as an embedded broadcast memory operand ({1to16}).
// GCC compiles _mm512_set1_epi32(load) into a separate vpbroadcastd zmm, m32, which costs a port-5
// uop on Sapphire Rapids (measured: 1.5 instead of 1.94 vpdpbusd per cycle in this tile's loop).
#define FM_DPBUSD_BCAST(acc, w, ptr) \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t *>(ptr)))
// The same for the activation scale: dst = w · broadcast(*ptr) (F32).
#define FM_MULPS_BCAST(dst, w, ptr) __asm__("vmulps %2%{1to16%}, %1, %0" : "=v"(dst) : "v"(w), "m"(*(ptr)))

// AVX-512 VNNI: vpdpbusd zmm, kUnits units of 16 columns (unit u at panel + u·ustride; masks for
// units of 8 columns).
template <int kUnits, bool kMin>
__attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni"))) void tile_avx512(
    const uint8_t *panel, int64_t pbb, int64_t ustride, const QuantBlock *a, int64_t lda, int nrows, int64_t nblk,
    int32_t zp, float *out, int64_t ldo, bool init, const float *bias, __mmask16 m0, __mmask16 m1) {
    FM_ROWS
    const uint8_t *panel1 = panel + (kUnits > 1 ? ustride : 0);
    const __m512 bv0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
    const __m512 bv1 = (bias && kUnits > 1) ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
    __m512 f00, f01, f10, f11, f20, f21, f30, f31, f40, f41, f50, f51;
#define FM_INIT(r)                                                                    \
    f##r##0 = (r < nrows && !init) ? _mm512_maskz_loadu_ps(m0, out + r * ldo) : bv0; \
    f##r##1 = (kUnits > 1 && r < nrows && !init) ? _mm512_maskz_loadu_ps(m1, out + r * ldo + 16) : bv1;
    FM_EACH_ROW(FM_INIT)
#undef FM_INIT
    for (int64_t b = 0; b < nblk; ++b, panel += pbb, panel1 += pbb) {
        // The integer sums start at −zp·Σq_a: the zero point's correction costs no extra step.
#define FM_ZERO(r) __m512i i##r##0 = _mm512_set1_epi32(-zp * a##r[b].sum), i##r##1 = i##r##0;
        FM_EACH_ROW(FM_ZERO)
#undef FM_ZERO
        for (int g = 0; g < 8; ++g) {
            const __m512i w0 = _mm512_load_si512(panel + 64 * g);
            const __m512i w1 = kUnits > 1 ? _mm512_load_si512(panel1 + 64 * g) : w0;
#define FM_DOT(r)                                                       \
    {                                                                   \
        FM_DPBUSD_BCAST(i##r##0, w0, a##r[b].q + 4 * g);                \
        if (kUnits > 1) FM_DPBUSD_BCAST(i##r##1, w1, a##r[b].q + 4 * g); \
    }
            FM_EACH_ROW(FM_DOT)
#undef FM_DOT
        }
        const __m512 dw0 = _mm512_load_ps(panel + 512);
        const __m512 dw1 = kUnits > 1 ? _mm512_load_ps(panel1 + 512) : dw0;
#define FM_SCALE(r)                                                                      \
    {                                                                                    \
        __m512 s0, s1;                                                                   \
        FM_MULPS_BCAST(s0, dw0, &a##r[b].d);                                             \
        f##r##0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i##r##0), s0, f##r##0);             \
        if (kUnits > 1) {                                                                \
            FM_MULPS_BCAST(s1, dw1, &a##r[b].d);                                         \
            f##r##1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i##r##1), s1, f##r##1);         \
        }                                                                                \
    }
        FM_EACH_ROW(FM_SCALE)
#undef FM_SCALE
        if (kMin) {
            const __m512 mw0 = _mm512_load_ps(panel + 576);
            const __m512 mw1 = kUnits > 1 ? _mm512_load_ps(panel1 + 576) : mw0;
#define FM_MIN(r)                                                              \
    {                                                                          \
        const __m512 s = _mm512_set1_ps(a##r[b].d * float(a##r[b].sum));       \
        f##r##0 = _mm512_fmadd_ps(mw0, s, f##r##0);                            \
        if (kUnits > 1) f##r##1 = _mm512_fmadd_ps(mw1, s, f##r##1);            \
    }
            FM_EACH_ROW(FM_MIN)
#undef FM_MIN
        }
    }
#define FM_STORE(r)                                                              \
    if (r < nrows) {                                                             \
        _mm512_mask_storeu_ps(out + r * ldo, m0, f##r##0);                       \
        if (kUnits > 1) _mm512_mask_storeu_ps(out + r * ldo + 16, m1, f##r##1);  \
    }
    FM_EACH_ROW(FM_STORE)
#undef FM_STORE
}
#undef FM_ROWS
#undef FM_EACH_ROW
#undef FM_DPBUSD_BCAST
#undef FM_MULPS_BCAST

void gemm_simd(KernelChoice path, ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x,
               const float *bias, float *out, int64_t rows, int64_t n, int64_t k, int ith, int nth) {
    Geometry geo;
    geo.halves = path == KernelChoice::Avx512Vnni ? 2 : 1;
    geo.planes = path == KernelChoice::Avx2 && type == GGML_TYPE_Q8_0 ? 2 : 1;
    const int tile_rows = geo.planes == 2 ? 4 : 6;
    const int64_t unit = geo.unit(), pbb = geo.block_bytes();
    const int64_t nb = k / 32, units = (n + unit - 1) / unit, chunk = kChunkColumns / unit;
    const int64_t ua = units * ith / nth, ub = units * (ith + 1) / nth;
    if (ua >= ub || rows <= 0) return;
    const int64_t passes = (nb + kBlocksPerPass - 1) / kBlocksPerPass;
    const int64_t per_pass = (nb + passes - 1) / passes;  // equal passes
    thread_local std::vector<uint8_t> buf;
    const size_t need = size_t(chunk * per_pass * pbb) + 64;
    if (buf.size() < need) buf.resize(need);
    uint8_t *panel = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    const bool q41 = type == GGML_TYPE_Q4_1;
    const int32_t zp = zero_point(type);
    for (int64_t u0 = ua; u0 < ub; u0 += chunk) {
        const int64_t nu = std::min(chunk, ub - u0);
        for (int64_t p = 0; p < passes; ++p) {
            const int64_t b0 = p * per_pass, nblk = std::min(per_pass, nb - b0), ustride = nblk * pbb;
            for (int64_t j = 0; j < nu; ++j) {
                const int64_t c0 = (u0 + j) * unit;
                pack_unit(type, w, row_bytes, c0, std::min(unit, n - c0), b0, nblk, geo, panel + j * ustride);
            }
            for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
                const int nr = int(std::min<int64_t>(tile_rows, rows - r0));
                const QuantBlock *xa = x + r0 * nb + b0;
                if (path == KernelChoice::Avx512Vnni) {
                    for (int64_t j = 0; j < nu; j += 2) {
                        const int64_t c0 = (u0 + j) * unit;
                        const bool two = j + 1 < nu;
                        const __mmask16 m0 = n - c0 >= 16 ? 0xFFFF : 0x00FF;
                        const __mmask16 m1 = two && n - c0 - 16 >= 16 ? 0xFFFF : 0x00FF;
                        const float *bc = bias ? bias + c0 : nullptr;
                        float *oc = out + r0 * n + c0;
                        const uint8_t *pu = panel + j * ustride;
                        if (two) (q41 ? tile_avx512<2, true> : tile_avx512<2, false>)(pu, pbb, ustride, xa, nb, nr, nblk, zp, oc, n, p == 0, bc, m0, m1);
                        else (q41 ? tile_avx512<1, true> : tile_avx512<1, false>)(pu, pbb, ustride, xa, nb, nr, nblk, zp, oc, n, p == 0, bc, m0, m1);
                    }
                    continue;
                }
                for (int64_t j = 0; j < nu; ++j) {
                    const int64_t c0 = (u0 + j) * unit;
                    const float *bc = bias ? bias + c0 : nullptr;
                    float *oc = out + r0 * n + c0;
                    const uint8_t *pu = panel + j * ustride;
                    if (path == KernelChoice::AvxVnni)
                        (q41 ? tile_avxvnni<true> : tile_avxvnni<false>)(pu, pbb, xa, nb, nr, nblk, zp, oc, n, p == 0, bc);
                    else if (geo.planes == 2)
                        tile_avx2<false, true>(pu, pbb, xa, nb, nr, nblk, zp, oc, n, p == 0, bc);
                    else
                        (q41 ? tile_avx2<true, false> : tile_avx2<false, false>)(pu, pbb, xa, nb, nr, nblk, zp, oc, n, p == 0, bc);
                }
            }
        }
    }
}

}  // namespace
#endif  // FM_QMM_X86

namespace {
// FLUXMINI_CPU_WITHOUT=avx512vnni,avxvnni,...: behave as on a CPU without these (tests of the
// choice and of weight placement for CPUs this machine is not; "avx2" removes every vector path).
bool pretend_lacking(KernelChoice path) {
    const char *e = std::getenv("FLUXMINI_CPU_WITHOUT");
    if (!e) return false;
    const std::string list = std::string(",") + e + ",";
    auto listed = [&](KernelChoice p) { return list.find(std::string(",") + kernel_choice_name(p) + ",") != std::string::npos; };
    return listed(path) || (path != KernelChoice::Portable && listed(KernelChoice::Avx2));
}
}  // namespace

bool qmatmul_path_supported(KernelChoice path) {
    bool hw = false;
    switch (path) {
    case KernelChoice::Portable: return true;
    case KernelChoice::Avx2: hw = cpu_features().avx2; break;
    case KernelChoice::AvxVnni: hw = cpu_features().avxvnni; break;
    case KernelChoice::Avx512Vnni: hw = cpu_features().avx512vnni; break;
    default: return false;
    }
    return hw && !pretend_lacking(path);
}

KernelChoice qmatmul_best_path() {
    // zmm first: twice the columns per instruction (1.6-1.8x the ymm kernel on a Xeon with both,
    // benchmarks/bench_qmatmul.py).
    for (KernelChoice p : {KernelChoice::Avx512Vnni, KernelChoice::AvxVnni, KernelChoice::Avx2})
        if (qmatmul_path_supported(p)) return p;
    return KernelChoice::Portable;
}

const char *qmatmul_path_description(KernelChoice path) {
    switch (path) {
    case KernelChoice::Portable: return "plain C++";
    case KernelChoice::Avx2: return "AVX2";
    case KernelChoice::AvxVnni: return "AVX-VNNI";
    case KernelChoice::Avx512Vnni: return "AVX-512 VNNI";
    default: return "ggml";
    }
}

KernelChoice qmatmul_engine_path(KernelChoice choice) {
    switch (choice) {
    case KernelChoice::Ggml: return KernelChoice::Ggml;
    case KernelChoice::Own: {
        const KernelChoice best = qmatmul_best_path();
        return best == KernelChoice::Portable ? KernelChoice::Ggml : best;  // ggml's SIMD beats plain C++
    }
    default:
        if (!qmatmul_path_supported(choice)) {
            std::string have;
            for (KernelChoice p : {KernelChoice::Avx512Vnni, KernelChoice::AvxVnni, KernelChoice::Avx2, KernelChoice::Portable})
                if (qmatmul_path_supported(p)) have += std::string(have.empty() ? "" : ", ") + kernel_choice_name(p);
            fail_value("FLUXMINI_KERNELS=%s: this CPU lacks %s; it runs %s, ggml or auto", kernel_choice_name(choice),
                       qmatmul_path_description(choice), have.c_str());
        }
        return choice;
    }
}

void quantize_rows_q8(KernelChoice path, const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out,
                      bool f16_scales) {
#ifdef FM_QMM_X86
    if (path != KernelChoice::Portable && qmatmul_path_supported(path))
        return quantize_rows_q8_avx2(x, k, r0, r1, out, f16_scales);
#endif
    quantize_rows_q8_portable(x, k, r0, r1, out, f16_scales);
}

void qmatmul(KernelChoice path, ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x,
             const float *bias, float *out, int64_t rows, int64_t n, int64_t k, int ith, int nth) {
    if (type != GGML_TYPE_Q4_0 && type != GGML_TYPE_Q4_1 && type != GGML_TYPE_Q8_0)
        fail_runtime("internal error: qmatmul of %s", ggml_type_name(type));
#ifdef FM_QMM_X86
    if (path != KernelChoice::Portable && qmatmul_path_supported(path))
        return gemm_simd(path, type, w, row_bytes, x, bias, out, rows, n, k, ith, nth);
#endif
    gemm_portable(type, w, row_bytes, x, bias, out, rows, n, k, ith, nth);
}

namespace {
// The path (low byte) and f16_scales (bit 8) travel in the custom ops' userdata pointer's value
// (nothing to allocate or free).
KernelChoice node_path(void *userdata) { return KernelChoice(reinterpret_cast<uintptr_t>(userdata) & 0xff); }
bool node_f16_scales(void *userdata) { return (reinterpret_cast<uintptr_t>(userdata) >> 8) & 1; }

void quantize_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *x = dst->src[0];
    const int64_t k = x->ne[0], rows = ggml_nrows(x);
    quantize_rows_q8(node_path(userdata), static_cast<const float *>(x->data), k, rows * ith / nth,
                     rows * (ith + 1) / nth, static_cast<QuantBlock *>(dst->data), node_f16_scales(userdata));
}

void gemm_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *xq = dst->src[0], *w = dst->src[1], *b = dst->src[2];
    qmatmul(node_path(userdata), w->type, static_cast<const uint8_t *>(w->data), w->nb[1],
            static_cast<const QuantBlock *>(xq->data), b ? static_cast<const float *>(b->data) : nullptr,
            static_cast<float *>(dst->data), ggml_nrows(dst), w->ne[1], w->ne[0], ith, nth);
}
}  // namespace

ggml_tensor *qmatmul_op(ggml_context *ctx, ggml_tensor *w, ggml_tensor *x, ggml_tensor *bias, KernelChoice path,
                        bool f16_scales) {
    if (!qmatmul_shape(w) || x->type != GGML_TYPE_F32 || x->ne[0] != w->ne[0] ||
        (bias && (bias->type != GGML_TYPE_F32 || ggml_nelements(bias) != w->ne[1])) ||
        !(path == KernelChoice::Portable || path == KernelChoice::Avx2 || path == KernelChoice::AvxVnni ||
          path == KernelChoice::Avx512Vnni))
        fail_runtime("internal error: qmatmul_op takes Q4_0/Q4_1/Q8_0 [k, n] (n %% 8 == 0), F32 x [k, ...], a path");
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    const int64_t rows = ggml_nrows(x);
    void *userdata = reinterpret_cast<void *>(uintptr_t(path) | (uintptr_t(f16_scales) << 8));
    ggml_tensor *xq = ggml_custom_4d(ctx, GGML_TYPE_I8, int64_t(sizeof(QuantBlock)) * (x->ne[0] / 32), rows, 1, 1, &x, 1,
                                     quantize_node, GGML_N_TASKS_MAX, userdata);
    ggml_tensor *args[3] = {xq, w, bias};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args, bias ? 3 : 2, gemm_node,
                          GGML_N_TASKS_MAX, userdata);
}

}  // namespace fm
