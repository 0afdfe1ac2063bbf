// Q4_0 / Q4_1 / Q8_0 x Q8 GEMM with AVX-VNNI (see cpu_qmatmul.h).
//
// dpbusd multiplies unsigned by signed bytes, so weights enter with a zero point: Q4_0 nibbles
// are 0..15 for values q − 8, Q8_0 bytes are stored as q + 128; Σ(q_w − zp)·q_a is the unsigned
// product minus zp·Σq_a, the latter computed once per activation block. Q4_1 (d·q + m) adds
// m·d_a·Σq_a per block instead.
//
// Layout of the work: each thread owns a range of 8-column groups of the output. Per pass of
// kBlocksPerPass blocks (256 values of k) it unpacks the weights of up to kGroupsPerChunk
// groups into a "panel": for every block, 8 registers of 32 bytes, register g holding values
// 4g..4g+3 of each of the 8 columns (what dpbusd multiplies with 4 bytes of one activation
// row), then the 8 weight scales and (Q4_1) the 8 minimums. The register tile is 6 activation rows x 8
// columns: six dpbusd accumulators for a block's integer sums and six F32 accumulators they are
// scaled into. Activations are quantized once per matmul, by their own graph node.
#include "cpu_qmatmul.h"

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_QMM_X86 1
#include <immintrin.h>
#endif

namespace fm {

namespace {
constexpr int kTileRows = 6;
constexpr int64_t kBlocksPerPass = 8;    // blocks (of 32 values) per pass over k
constexpr int64_t kGroupsPerChunk = 8;   // 8-column groups unpacked together (64 columns)
// Per block and group: 8 registers, 8 scales, 8 minimums (Q4_1 only).
constexpr int64_t kPanelBlockBytes = 8 * 32 + 8 * 4 + 8 * 4;

// ggml's blocks: Q4_0 {F16 d; 16 bytes of nibbles} (value d·(q − 8)), Q4_1 {F16 d, m; 16 bytes of
// nibbles} (value d·q + m), Q8_0 {F16 d; 32 signed bytes} (value d·q).
size_t block_bytes(ggml_type t) { return t == GGML_TYPE_Q4_0 ? 18 : t == GGML_TYPE_Q4_1 ? 20 : 34; }
int32_t zero_point(ggml_type t) { return t == GGML_TYPE_Q4_0 ? 8 : t == GGML_TYPE_Q4_1 ? 0 : 128; }
size_t quants_offset(ggml_type t) { return t == GGML_TYPE_Q4_1 ? 4 : 2; }

// Weight value j (0..31) of a block as the unsigned byte dpbusd takes (value + zero point).
inline int32_t weight_u8(ggml_type t, const uint8_t *blk, int j) {
    const uint8_t *qs = blk + quants_offset(t);
    if (t != GGML_TYPE_Q8_0) return j < 16 ? (qs[j] & 15) : (qs[j - 16] >> 4);
    return int32_t(int8_t(qs[j])) + 128;
}

float fp16_to_f32(const uint8_t *p) {
    ggml_fp16_t h;
    std::memcpy(&h, p, 2);
    return ggml_fp16_to_fp32(h);
}

// Plain C++ versions: other CPUs (for tests of the same arithmetic; the engine uses ggml's
// matmul there) and the reference the vector code must agree with.
void quantize_rows_q8_portable(const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out) {
    const int64_t nb = k / 32;
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t b = 0; b < nb; ++b) {
            const float *xb = x + r * k + b * 32;
            QuantBlock &q = out[r * nb + b];
            float amax = 0;
            for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
            q.d = amax / 127.0f;
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

bool cpu_qmatmul_available() {
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("avxvnni") && kernel_choice() != KernelChoice::Portable;
    return ok;
}

namespace {
__attribute__((target("avx2,fma"))) void quantize_rows_q8_avx2(const float *x, int64_t k, int64_t r0, int64_t r1,
                                                              QuantBlock *out) {
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
            q->d = d;
            q->sum = _mm_cvtsi128_si32(s4);
            _mm256_storeu_si256(reinterpret_cast<__m256i *>(q->q), _mm256_permutevar8x32_epi32(p, order));
        }
    }
}

// Unpacks 8 columns (c0..c0+7) of blocks [b0, b0 + nblk) into the panel layout.
__attribute__((target("avx2,fma,f16c"))) void pack_group(ggml_type type, const uint8_t *w, size_t row_bytes,
                                                        int64_t c0, int64_t b0, int64_t nblk, uint8_t *dst) {
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m256i flip = _mm256_set1_epi8(char(0x80));
    const size_t bb = block_bytes(type);
    for (int64_t b = 0; b < nblk; ++b, dst += kPanelBlockBytes) {
        __m256 r[8];
        float *scales = reinterpret_cast<float *>(dst + 256), *mins = scales + 8;
        for (int c = 0; c < 8; ++c) {
            const uint8_t *blk = w + size_t(c0 + c) * row_bytes + size_t(b0 + b) * bb;
            uint16_t h[2];
            std::memcpy(h, blk, 4);  // d, and m for Q4_1 (the first quants otherwise, unused)
            scales[c] = _cvtsh_ss(h[0]);
            mins[c] = type == GGML_TYPE_Q4_1 ? _cvtsh_ss(h[1]) : 0.0f;
            if (type != GGML_TYPE_Q8_0) {
                const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i *>(blk + quants_offset(type)));
                const __m128i lo = _mm_and_si128(qs, low4), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), low4);
                r[c] = _mm256_castsi256_ps(_mm256_set_m128i(hi, lo));  // values 0..31 of column c
            } else {  // signed bytes + 128
                const __m256i qs = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk + quants_offset(type)));
                r[c] = _mm256_castsi256_ps(_mm256_xor_si256(qs, flip));
            }
        }
        // 8x8 transpose of 4-byte groups: register g gets group g of every column.
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        float *d = reinterpret_cast<float *>(dst);
        _mm256_store_ps(d + 0 * 8, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_store_ps(d + 1 * 8, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_store_ps(d + 2 * 8, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_store_ps(d + 3 * 8, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_store_ps(d + 4 * 8, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_store_ps(d + 5 * 8, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_store_ps(d + 6 * 8, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_store_ps(d + 7 * 8, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
}

inline int32_t load_i32(const int8_t *p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// Tile: rows a[0..nrows) (row stride lda blocks) x 8 columns, blocks [0, nblk) of the panel.
// Named accumulators: with arrays GCC spills them to the stack on every step. kMin: Q4_1's
// per-block minimum m, which adds m·d_a·Σq_a.
template <bool kMin>
__attribute__((target("avx2,fma,avxvnni"))) void tile(const uint8_t *panel, const QuantBlock *a, int64_t lda,
                                                     int nrows, int64_t nblk, int32_t zp, float *out, int64_t ldo,
                                                     bool init, const float *bias) {
    const QuantBlock *a0 = a, *a1 = a + (nrows > 1 ? 1 : 0) * lda, *a2 = a + (nrows > 2 ? 2 : 0) * lda;
    const QuantBlock *a3 = a + (nrows > 3 ? 3 : 0) * lda, *a4 = a + (nrows > 4 ? 4 : 0) * lda;
    const QuantBlock *a5 = a + (nrows > 5 ? 5 : 0) * lda;
    const __m256 b8 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    __m256 f0, f1, f2, f3, f4, f5;
#define FM_INIT(r) f##r = (r < nrows && !init) ? _mm256_loadu_ps(out + r * ldo) : b8;
    FM_INIT(0) FM_INIT(1) FM_INIT(2) FM_INIT(3) FM_INIT(4) FM_INIT(5)
#undef FM_INIT
    for (int64_t b = 0; b < nblk; ++b, panel += kPanelBlockBytes) {
        __m256i i0 = _mm256_setzero_si256(), i1 = i0, i2 = i0, i3 = i0, i4 = i0, i5 = i0;
        for (int g = 0; g < 8; ++g) {
            const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i *>(panel + 32 * g));
#define FM_DOT(r) i##r = _mm256_dpbusd_avx_epi32(i##r, wv, _mm256_set1_epi32(load_i32(a##r[b].q + 4 * g)));
            FM_DOT(0) FM_DOT(1) FM_DOT(2) FM_DOT(3) FM_DOT(4) FM_DOT(5)
#undef FM_DOT
        }
        const __m256 dw = _mm256_load_ps(reinterpret_cast<const float *>(panel + 256));
#define FM_SCALE(r)                                                                                              \
    f##r = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(i##r, _mm256_set1_epi32(zp * a##r[b].sum))),  \
                           _mm256_mul_ps(dw, _mm256_set1_ps(a##r[b].d)), f##r);
        FM_SCALE(0) FM_SCALE(1) FM_SCALE(2) FM_SCALE(3) FM_SCALE(4) FM_SCALE(5)
#undef FM_SCALE
        if (kMin) {
            const __m256 mw = _mm256_load_ps(reinterpret_cast<const float *>(panel + 288));
#define FM_MIN(r) f##r = _mm256_fmadd_ps(mw, _mm256_set1_ps(a##r[b].d * float(a##r[b].sum)), f##r);
            FM_MIN(0) FM_MIN(1) FM_MIN(2) FM_MIN(3) FM_MIN(4) FM_MIN(5)
#undef FM_MIN
        }
    }
#define FM_STORE(r) \
    if (r < nrows) _mm256_storeu_ps(out + r * ldo, f##r);
    FM_STORE(0) FM_STORE(1) FM_STORE(2) FM_STORE(3) FM_STORE(4) FM_STORE(5)
#undef FM_STORE
}

void gemm_vnni(ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x, const float *bias, float *out,
               int64_t rows, int64_t n, int64_t k, int ith, int nth) {
    const int64_t nb = k / 32, groups = n / 8;
    const int64_t ga = groups * ith / nth, gb = groups * (ith + 1) / nth;
    if (ga >= gb || rows <= 0) return;
    const int64_t passes = (nb + kBlocksPerPass - 1) / kBlocksPerPass;
    const int64_t per_pass = (nb + passes - 1) / passes;  // equal passes
    thread_local std::vector<uint8_t> buf;
    const size_t need = size_t(kGroupsPerChunk * per_pass * kPanelBlockBytes) + 32;
    if (buf.size() < need) buf.resize(need);
    uint8_t *panel = reinterpret_cast<uint8_t *>((reinterpret_cast<uintptr_t>(buf.data()) + 31) & ~uintptr_t(31));
    for (int64_t g0 = ga; g0 < gb; g0 += kGroupsPerChunk) {
        const int64_t ng = std::min(kGroupsPerChunk, gb - g0);
        for (int64_t p = 0; p < passes; ++p) {
            const int64_t b0 = p * per_pass, nblk = std::min(per_pass, nb - b0);
            for (int64_t j = 0; j < ng; ++j)
                pack_group(type, w, row_bytes, (g0 + j) * 8, b0, nblk, panel + j * nblk * kPanelBlockBytes);
            for (int64_t r0 = 0; r0 < rows; r0 += kTileRows) {
                const int nr = int(std::min<int64_t>(kTileRows, rows - r0));
                for (int64_t j = 0; j < ng; ++j) {
                    const int64_t c0 = (g0 + j) * 8;
                    (type == GGML_TYPE_Q4_1 ? tile<true> : tile<false>)(
                        panel + j * nblk * kPanelBlockBytes, x + r0 * nb + b0, nb, nr, nblk, zero_point(type),
                        out + r0 * n + c0, n, p == 0, bias ? bias + c0 : nullptr);
                }
            }
        }
    }
}

}  // namespace

#else

bool cpu_qmatmul_available() { return false; }

#endif

void quantize_rows_q8(const float *x, int64_t k, int64_t r0, int64_t r1, QuantBlock *out) {
#ifdef FM_QMM_X86
    if (cpu_qmatmul_available()) return quantize_rows_q8_avx2(x, k, r0, r1, out);
#endif
    quantize_rows_q8_portable(x, k, r0, r1, out);
}

void qmatmul(ggml_type type, const uint8_t *w, size_t row_bytes, const QuantBlock *x, const float *bias, float *out,
             int64_t rows, int64_t n, int64_t k, int ith, int nth) {
    if (type != GGML_TYPE_Q4_0 && type != GGML_TYPE_Q4_1 && type != GGML_TYPE_Q8_0)
        fail_runtime("internal error: qmatmul of %s", ggml_type_name(type));
#ifdef FM_QMM_X86
    if (cpu_qmatmul_available()) return gemm_vnni(type, w, row_bytes, x, bias, out, rows, n, k, ith, nth);
#endif
    gemm_portable(type, w, row_bytes, x, bias, out, rows, n, k, ith, nth);
}

namespace {
void quantize_node(ggml_tensor *dst, int ith, int nth, void *) {
    const ggml_tensor *x = dst->src[0];
    const int64_t k = x->ne[0], rows = ggml_nrows(x);
    quantize_rows_q8(static_cast<const float *>(x->data), k, rows * ith / nth, rows * (ith + 1) / nth,
                     static_cast<QuantBlock *>(dst->data));
}

void gemm_node(ggml_tensor *dst, int ith, int nth, void *) {
    const ggml_tensor *xq = dst->src[0], *w = dst->src[1], *b = dst->src[2];
    qmatmul(w->type, static_cast<const uint8_t *>(w->data), w->nb[1], static_cast<const QuantBlock *>(xq->data),
              b ? static_cast<const float *>(b->data) : nullptr, static_cast<float *>(dst->data), ggml_nrows(dst),
              w->ne[1], w->ne[0], ith, nth);
}
}  // namespace

ggml_tensor *qmatmul_op(ggml_context *ctx, ggml_tensor *w, ggml_tensor *x, ggml_tensor *bias) {
    if (!qmatmul_shape(w) || x->type != GGML_TYPE_F32 || x->ne[0] != w->ne[0] ||
        (bias && (bias->type != GGML_TYPE_F32 || ggml_nelements(bias) != w->ne[1])))
        fail_runtime("internal error: qmatmul_op takes Q4_0/Q4_1/Q8_0 [k, n] (n %% 8 == 0), F32 x [k, ...]");
    if (!ggml_is_contiguous(x)) x = ggml_cont(ctx, x);
    const int64_t rows = ggml_nrows(x);
    ggml_tensor *xq = ggml_custom_4d(ctx, GGML_TYPE_I8, int64_t(sizeof(QuantBlock)) * (x->ne[0] / 32), rows, 1, 1, &x, 1,
                                     quantize_node, GGML_N_TASKS_MAX, nullptr);
    ggml_tensor *args[3] = {xq, w, bias};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], x->ne[1], x->ne[2], x->ne[3], args, bias ? 3 : 2, gemm_node,
                          GGML_N_TASKS_MAX, nullptr);
}

}  // namespace fm
