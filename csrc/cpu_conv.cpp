// F32 convolution for the CPU (see cpu_conv.h): a register-blocked GEMM in the style of BLIS over the
// im2col matrix, which is packed panel by panel from the image and never stored whole.
//
// The output is cut into tiles of kRows channels x 16 pixels held in 12 AVX registers (16 x 16 in
// 16 zmm registers with AVX-512). Each thread owns a range of 16-pixel panels; per block of kKc
// values of k it packs a chunk of its panels k-major (so one k step loads 16 pixels with aligned
// loads), then sweeps the channels in groups of kRows, whose kKc weights (packed per group and
// block, widened from F16 there) stay in L1 while the packed chunk streams from L2. The tiles
// accumulate in a contiguous buffer per chunk, copied out once all k blocks are done: written in
// place, a tile's 16 rows lie OW·OH floats apart, share one L1 set and miss the caches on every
// k block (measured: a third of the kernel's time at 64² x 512 channels). Sums are kept in the
// same order for every output (k blocks in order, k ascending inside), whatever the pixel range,
// so thread counts do not change results.
#include "cpu_conv.h"

#include "common.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_CONV_X86 1
#include <immintrin.h>
#endif

namespace fm {

namespace {
constexpr int kRows = 6;         // output channels per register tile (AVX2: 12 ymm accumulators)
constexpr int kRowsZmm = 16;     // output channels per register tile (AVX-512: 16 zmm accumulators)
constexpr int kCols = 16;        // output columns per register tile (two 8-float registers, one zmm)
constexpr int64_t kKc = 256;     // k per block: kRows·kKc weights (6 KiB) stay in L1
constexpr int64_t kChunk = 24;   // panels packed together: 24·16·kKc floats (384 KiB) in L2, with their
                                 // accumulators (24·16 per channel: 768 KiB at 512 channels)
}  // namespace

namespace {
// A 3x3 convolution (padding 1) of the 2x nearest-neighbour upsampling of x equals, for each
// output parity (a, b) — outputs (2i + a, 2j + b) — a 2x2 convolution of x itself: output row
// 2i + a reads upsampled rows 2i + a − 1 .. 2i + a + 1, which are x's rows i − 1, i, i (a = 0) or
// i, i, i + 1 (a = 1), so kernel rows that meet the same row of x add up. Taps: row ty ∈ {0, 1} of
// the 2x2 kernel is x's row i + ty − 1 + a and sums the 3x3 kernel's rows kTaps[a][ty]; columns
// alike. 4·Cin products an output instead of 9·Cin.
constexpr int kTaps[2][2][2] = {{{0, 0}, {1, 2}}, {{0, 1}, {2, 2}}};  // [parity][tap]: first, last 3x3 row

// wc [Cout][Cin][2][2] (F32) for parity (a, b) from the 3x3 kernel [Cout][Cin][3][3].
void upsample_kernel(ConvKernel kernel, int64_t Cin, int64_t Cout, int a, int b, std::vector<float> *wc) {
    wc->resize(size_t(Cout * Cin * 4));
    for (int64_t oc = 0; oc < Cout * Cin; ++oc) {
        float k9[9];
        if (kernel.f32) std::memcpy(k9, kernel.f32 + oc * 9, sizeof(k9));
        else ggml_fp16_to_fp32_row(kernel.f16 + oc * 9, k9, 9);
        for (int ty = 0; ty < 2; ++ty)
            for (int tx = 0; tx < 2; ++tx) {
                float sum = 0.0f;
                for (int ky = kTaps[a][ty][0]; ky <= kTaps[a][ty][1]; ++ky)
                    for (int kx = kTaps[b][tx][0]; kx <= kTaps[b][tx][1]; ++kx) sum += k9[ky * 3 + kx];
                (*wc)[size_t(oc * 4 + ty * 2 + tx)] = sum;
            }
    }
}
}  // namespace

#ifdef FM_CONV_X86

bool conv_path_supported(ConvPath path) {
    switch (path) {
    case ConvPath::Portable: return true;
    case ConvPath::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case ConvPath::Avx512: return conv_path_supported(ConvPath::Avx2) && __builtin_cpu_supports("avx512f");
    }
    return false;
}

ConvPath conv_engine_path() {
    static const ConvPath path = [] {
        switch (kernel_choice()) {
        case KernelChoice::Portable: return ConvPath::Portable;
        case KernelChoice::Avx2:
        case KernelChoice::AvxVnni: return conv_path_supported(ConvPath::Avx2) ? ConvPath::Avx2 : ConvPath::Portable;
        default:
            for (ConvPath p : {ConvPath::Avx512, ConvPath::Avx2})
                if (conv_path_supported(p)) return p;
            return ConvPath::Portable;
        }
    }();
    return path;
}

bool cpu_conv2d_available() { return conv_engine_path() != ConvPath::Portable; }

namespace {

// 6 x 16 tile: c[r·ldc + j] (+)= Σ_k w[r·ldw + k] · xp[k·16 + j], for k < kc. Twelve named
// accumulators (with an array of them GCC spills to the stack on every step).
__attribute__((target("avx2,fma"))) void tile_kernel(const float *xp, const float *w, int64_t ldw, int64_t kc,
                                                     float *c, int64_t ldc, bool init, const float *bias) {
    __m256 a00, a01, a10, a11, a20, a21, a30, a31, a40, a41, a50, a51;
    if (init) {
#define FM_INIT(r) a##r##0 = a##r##1 = _mm256_set1_ps(bias ? bias[r] : 0.0f);
        FM_INIT(0) FM_INIT(1) FM_INIT(2) FM_INIT(3) FM_INIT(4) FM_INIT(5)
#undef FM_INIT
    } else {
#define FM_LOAD(r) a##r##0 = _mm256_loadu_ps(c + r * ldc); a##r##1 = _mm256_loadu_ps(c + r * ldc + 8);
        FM_LOAD(0) FM_LOAD(1) FM_LOAD(2) FM_LOAD(3) FM_LOAD(4) FM_LOAD(5)
#undef FM_LOAD
    }
    const float *w0 = w, *w1 = w + ldw, *w2 = w + 2 * ldw, *w3 = w + 3 * ldw, *w4 = w + 4 * ldw, *w5 = w + 5 * ldw;
    for (int64_t k = 0; k < kc; ++k) {
        const __m256 x0 = _mm256_load_ps(xp + k * kCols), x1 = _mm256_load_ps(xp + k * kCols + 8);
        __m256 b;
#define FM_STEP(r) b = _mm256_broadcast_ss(w##r + k); a##r##0 = _mm256_fmadd_ps(b, x0, a##r##0); \
                   a##r##1 = _mm256_fmadd_ps(b, x1, a##r##1);
        FM_STEP(0) FM_STEP(1) FM_STEP(2) FM_STEP(3) FM_STEP(4) FM_STEP(5)
#undef FM_STEP
    }
#define FM_STORE(r) _mm256_storeu_ps(c + r * ldc, a##r##0); _mm256_storeu_ps(c + r * ldc + 8, a##r##1);
    FM_STORE(0) FM_STORE(1) FM_STORE(2) FM_STORE(3) FM_STORE(4) FM_STORE(5)
#undef FM_STORE
}

// AVX-512: 16 x 16 tile, one zmm per channel row: c[r·ldc + j] (+)= Σ_k wt[k·16 + r] · xp[k·16 + j].
// The weights come k-major (wt: 16 channels per k), so every broadcast is one pointer plus a
// constant. The products and their order are the AVX2 tile's: the same bits.
__attribute__((target("avx2,fma,avx512f"))) void tile_kernel_zmm(const float *xp, const float *wt, int64_t kc,
                                                                 float *c, int64_t ldc, bool init, const float *bias) {
#define FM_EACH16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)
#define FM_DECL(r) __m512 a##r = init ? _mm512_set1_ps(bias ? bias[r] : 0.0f) : _mm512_loadu_ps(c + r * ldc);
    FM_EACH16(FM_DECL)
#undef FM_DECL
    for (int64_t k = 0; k < kc; ++k, wt += kRowsZmm) {
        const __m512 x = _mm512_load_ps(xp + k * kCols);
#define FM_STEP(r) a##r = _mm512_fmadd_ps(_mm512_set1_ps(wt[r]), x, a##r);
        FM_EACH16(FM_STEP)
#undef FM_STEP
    }
#define FM_STORE(r) _mm512_storeu_ps(c + r * ldc, a##r);
    FM_EACH16(FM_STORE)
#undef FM_STORE
#undef FM_EACH16
}

// The im2col matrix of a convolution, never stored: panels are 16 output pixels of one output
// row, packed straight from the image x [W, H, Cin]. k runs as in ggml's im2col (kx fastest, then
// ky, then the input channel), so results equal im2col + gemm bit for bit.
struct ConvPanels {
    const float *x;
    int64_t W, H, Cin, k, s, pad_x, pad_y, OW, OH;  // left / top padding (right / bottom: implied by OW, OH)
    int64_t up_a = -1, up_b = 0;  // ≥ 0: output (i, j) lands at (2i + up_a, 2j + up_b) of a 2OW x 2OH map
    int64_t per_row() const { return (OW + kCols - 1) / kCols; }
    int64_t count() const { return OH * per_row(); }
    int64_t width(int64_t q) const { return std::min<int64_t>(kCols, OW - (q % per_row()) * kCols); }
    // Panel q's n outputs of one channel from src to that channel's output plane.
    void copy_out(int64_t q, const float *src, float *plane) const {
        const int64_t oy = q / per_row(), ox0 = (q % per_row()) * kCols, n = width(q);
        if (up_a < 0) return (void)std::memcpy(plane + oy * OW + ox0, src, size_t(n) * sizeof(float));
        float *dst = plane + (2 * oy + up_a) * (2 * OW) + 2 * ox0 + up_b;
        for (int64_t j = 0; j < n; ++j) dst[2 * j] = src[j];
    }
    __attribute__((target("avx2,fma"))) void pack(int64_t q, int64_t k0, int64_t kc, float *dst) const {
        const int64_t oy = q / per_row(), ox0 = (q % per_row()) * kCols, n = width(q);
        int64_t kx = k0 % k, ky = (k0 / k) % k, ci = k0 / (k * k);
        const __m256i iota0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), iota1 = _mm256_add_epi32(iota0, _mm256_set1_epi32(8));
        for (int64_t kk = 0; kk < kc; ++kk, dst += kCols) {
            const int64_t iy = oy * s + ky - pad_y, ix0 = ox0 * s + kx - pad_x;
            if (iy < 0 || iy >= H) {
                std::memset(dst, 0, kCols * sizeof(float));
            } else {
                const float *row = x + (ci * H + iy) * W;
                if (s == 1 && n == kCols && ix0 >= 0 && ix0 + kCols <= W) {
                    _mm256_store_ps(dst, _mm256_loadu_ps(row + ix0));
                    _mm256_store_ps(dst + 8, _mm256_loadu_ps(row + ix0 + 8));
                } else if (s == 1) {  // a row's edge: columns j with 0 <= ix0 + j < W and j < n, masked loads
                    const __m256i lo = _mm256_set1_epi32(int(std::max<int64_t>(0, -ix0)) - 1),
                                  hi = _mm256_set1_epi32(int(std::min<int64_t>(n, W - ix0)));
                    const __m256i m0 = _mm256_and_si256(_mm256_cmpgt_epi32(iota0, lo), _mm256_cmpgt_epi32(hi, iota0)),
                                  m1 = _mm256_and_si256(_mm256_cmpgt_epi32(iota1, lo), _mm256_cmpgt_epi32(hi, iota1));
                    // masked lanes are never read, so the address may point before the row
                    const float *base = reinterpret_cast<const float *>(reinterpret_cast<uintptr_t>(row) + ix0 * 4);
                    _mm256_store_ps(dst, _mm256_maskload_ps(base, m0));
                    _mm256_store_ps(dst + 8, _mm256_maskload_ps(base + 8, m1));
                } else {
                    for (int64_t j = 0; j < kCols; ++j) {
                        const int64_t ix = ix0 + j * s;
                        dst[j] = (j < n && ix >= 0 && ix < W) ? row[ix] : 0.0f;
                    }
                }
            }
            if (++kx == k) {
                kx = 0;
                if (++ky == k) ky = 0, ++ci;
            }
        }
    }
};

// 16 x 16 floats transposed in registers: r[i] holds row i on entry, column i on return.
__attribute__((target("avx2,fma,avx512f"))) inline void transpose16(__m512 r[16]) {
    __m512 t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {
        r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 4; ++j) {
            t[8 * i + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
            t[8 * i + 4 + j] = _mm512_shuffle_f32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
        }
    for (int j = 0; j < 8; ++j) {
        r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
    }
}

// The kernel's weights, one block (a group of output channels x kc values of k) at a time, as the
// tiles read them; channels past C are zero rows, F16 values are widened exactly. Packed per
// chunk of panels, so the packing must cost little next to the chunk's products (each weight
// meets 24 panels: 384 FMAs).
struct WeightBlocks {
    ConvKernel w;
    int64_t C, K;
    float at(int64_t c, int64_t k) const { return w.f32 ? w.f32[c * K + k] : ggml_fp16_to_fp32(w.f16[c * K + k]); }

    // AVX2 tile: kRows rows of kc weights, *ldw apart; F32 rows are read in place.
    const float *rows(int64_t c0, int64_t k0, int64_t kc, float *buf, int64_t *ldw) const {
        if (w.f32 && c0 + kRows <= C) {
            *ldw = K;
            return w.f32 + c0 * K + k0;
        }
        for (int r = 0; r < kRows; ++r) {
            float *dst = buf + r * kc;
            const int64_t c = c0 + r;
            if (c >= C) std::fill(dst, dst + kc, 0.0f);
            else if (w.f16) ggml_fp16_to_fp32_row(w.f16 + c * K + k0, dst, kc);
            else std::memcpy(dst, w.f32 + c * K + k0, size_t(kc) * sizeof(float));
        }
        *ldw = kc;
        return buf;
    }

    // AVX-512 tile: dst[k·16 + r] = w[c0 + r][k0 + k], 16 values of k per register transpose.
    __attribute__((target("avx2,fma,avx512f"))) void k_major16(int64_t c0, int64_t k0, int64_t kc, float *dst) const {
        const int rows = int(std::min<int64_t>(kRowsZmm, C - c0));
        int64_t k = 0;
        for (; k + 16 <= kc; k += 16) {
            __m512 r[16];
            for (int i = 0; i < 16; ++i) {
                const int64_t off = (c0 + i) * K + k0 + k;
                r[i] = i >= rows ? _mm512_setzero_ps()
                       : w.f32   ? _mm512_loadu_ps(w.f32 + off)
                                 : _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(w.f16 + off)));
            }
            transpose16(r);
            for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + (k + i) * kRowsZmm, r[i]);
        }
        for (; k < kc; ++k)
            for (int i = 0; i < kRowsZmm; ++i) dst[k * kRowsZmm + i] = i < rows ? at(c0 + i, k0 + k) : 0.0f;
    }
};

// out[c·ldo + first(q) + j] = bias[c] + Σ_k w[c·K + k] · panel_q[k][j]: this thread's panels.
// kZmm: the AVX-512 tile (16 channels).
template <bool kZmm, class Panels>
void gemm_driver(const Panels &src, const WeightBlocks &w, const float *bias, float *out, int64_t ldo, int ith,
                 int nth) {
    constexpr int R = kZmm ? kRowsZmm : kRows;
    const int64_t C = w.C, K = w.K;
    const int64_t panels = src.count();
    const int64_t pa = panels * ith / nth, pb = panels * (ith + 1) / nth;
    if (pa >= pb) return;
    const int64_t nkb = (K + kKc - 1) / kKc;
    const int64_t kc_max = ((K + nkb - 1) / nkb + 15) / 16 * 16;  // about equal k blocks, whole transposes
    const int64_t groups = (C + R - 1) / R, cpad = groups * R;
    // One buffer per thread: the chunk's packed panels, its accumulators (per panel cpad rows of
    // 16 pixels) and one weight block; each part a multiple of 16 floats, so all stay 64-byte
    // aligned.
    const int64_t n_pack = kChunk * kCols * kc_max, n_acc = kChunk * cpad * kCols, n_w = R * kc_max;
    thread_local std::vector<float> buf;
    const size_t need = size_t(n_pack + n_acc + n_w) + 16;
    if (buf.size() < need) buf.resize(need);
    float *packed = reinterpret_cast<float *>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    float *acc = packed + n_pack, *wblock = acc + n_acc;
    float bpad[R];  // the last group's bias, padded with zeros
    if (bias) {
        std::fill(bpad, bpad + R, 0.0f);
        std::copy(bias + (groups - 1) * R, bias + C, bpad);
    }

    for (int64_t q0 = pa; q0 < pb; q0 += kChunk) {
        const int64_t q1 = std::min(pb, q0 + kChunk);
        for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
            const int64_t kc = std::min(kc_max, K - k0);
            for (int64_t q = q0; q < q1; ++q) src.pack(q, k0, kc, packed + (q - q0) * kCols * kc);
            const bool init = k0 == 0;
            for (int64_t c0 = 0; c0 < C; c0 += R) {
                const float *br = !bias ? nullptr : c0 + R <= C ? bias + c0 : bpad;
                const float *wr = wblock;
                int64_t ldw = kc;
                if constexpr (kZmm) w.k_major16(c0, k0, kc, wblock);
                else wr = w.rows(c0, k0, kc, wblock, &ldw);
                for (int64_t q = q0; q < q1; ++q) {  // pixels past a row's end: zero columns, never copied out
                    float *c = acc + ((q - q0) * cpad + c0) * kCols;
                    const float *xp = packed + (q - q0) * kCols * kc;
                    if constexpr (kZmm) tile_kernel_zmm(xp, wr, kc, c, kCols, init, br);
                    else tile_kernel(xp, wr, ldw, kc, c, kCols, init, br);
                }
            }
        }
        for (int64_t q = q0; q < q1; ++q) {
            const float *a = acc + (q - q0) * cpad * kCols;
            for (int64_t c = 0; c < C; ++c) src.copy_out(q, a + c * kCols, out + c * ldo);
        }
    }
}

template <bool kZmm>
void conv2d_simd(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H, int64_t Cin,
                 int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth) {
    const int64_t OW = (W + 2 * pad - k) / stride + 1, OH = (H + 2 * pad - k) / stride + 1;
    gemm_driver<kZmm>(ConvPanels{x, W, H, Cin, k, stride, pad, pad, OW, OH}, WeightBlocks{kernel, Cout, k * k * Cin},
                      bias, out, OW * OH, ith, nth);
}

template <bool kZmm>
void upsample_conv_simd(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H,
                        int64_t Cin, int64_t Cout, int ith, int nth) {
    thread_local std::vector<float> wc;
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
            upsample_kernel(kernel, Cin, Cout, a, b, &wc);
            ConvPanels panels{x, W, H, Cin, 2, 1, 1 - b, 1 - a, W, H};
            panels.up_a = a, panels.up_b = b;
            gemm_driver<kZmm>(panels, WeightBlocks{ConvKernel{wc.data(), nullptr}, Cout, 4 * Cin}, bias, out,
                              4 * W * H, ith, nth);
        }
}

}  // namespace

#else

bool conv_path_supported(ConvPath path) { return path == ConvPath::Portable; }
ConvPath conv_engine_path() { return ConvPath::Portable; }
bool cpu_conv2d_available() { return false; }

#endif

const char *conv_path_name(ConvPath path) {
    return path == ConvPath::Avx512 ? "avx512" : path == ConvPath::Avx2 ? "avx2" : "portable";
}

namespace {
// Plain C++ (CPUs without AVX2; tests): the same sums, one output at a time.
void conv2d_portable(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H,
                     int64_t Cin, int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth) {
    const int64_t OW = (W + 2 * pad - k) / stride + 1, OH = (H + 2 * pad - k) / stride + 1, K = k * k * Cin;
    std::vector<float> wrow(kernel.f16 ? static_cast<size_t>(K) : 0);  // one widened F16 row
    for (int64_t p = OW * OH * ith / nth; p < OW * OH * (ith + 1) / nth; ++p)
        for (int64_t c = 0; c < Cout; ++c) {
            const float *wc = kernel.f32 ? kernel.f32 + c * K : wrow.data();
            if (kernel.f16) ggml_fp16_to_fp32_row(kernel.f16 + c * K, wrow.data(), K);
            float sum = bias ? bias[c] : 0.0f;
            for (int64_t kk = 0; kk < K; ++kk) {
                const int64_t kx = kk % k, ky = (kk / k) % k, ci = kk / (k * k);
                const int64_t iy = (p / OW) * stride + ky - pad, ix = (p % OW) * stride + kx - pad;
                if (iy >= 0 && iy < H && ix >= 0 && ix < W) sum += wc[kk] * x[(ci * H + iy) * W + ix];
            }
            out[c * OW * OH + p] = sum;
        }
}
}  // namespace

void conv2d_f32(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H, int64_t Cin,
                int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth, ConvPath path) {
#ifdef FM_CONV_X86
    if (path == ConvPath::Avx512 && conv_path_supported(path))
        return conv2d_simd<true>(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
    if (path == ConvPath::Avx2 && conv_path_supported(path))
        return conv2d_simd<false>(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
#endif
    conv2d_portable(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
}

void upsample_conv2d_f32(ConvKernel kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H,
                         int64_t Cin, int64_t Cout, int ith, int nth, ConvPath path) {
#ifdef FM_CONV_X86
    if (path == ConvPath::Avx512 && conv_path_supported(path))
        return upsample_conv_simd<true>(kernel, x, bias, out, W, H, Cin, Cout, ith, nth);
    if (path == ConvPath::Avx2 && conv_path_supported(path))
        return upsample_conv_simd<false>(kernel, x, bias, out, W, H, Cin, Cout, ith, nth);
#endif
    // Plain C++: the same parities and combined kernels, one output at a time.
    std::vector<float> wc;
    for (int a = 0; a < 2; ++a)
        for (int b = 0; b < 2; ++b) {
            upsample_kernel(kernel, Cin, Cout, a, b, &wc);
            for (int64_t p = W * H * ith / nth; p < W * H * (ith + 1) / nth; ++p) {
                const int64_t i = p / W, j = p % W;
                for (int64_t c = 0; c < Cout; ++c) {
                    float sum = bias ? bias[c] : 0.0f;
                    for (int64_t kk = 0; kk < 4 * Cin; ++kk) {
                        const int64_t tx = kk % 2, ty = (kk / 2) % 2, ci = kk / 4;
                        const int64_t iy = i + ty - 1 + a, ix = j + tx - 1 + b;
                        if (iy >= 0 && iy < H && ix >= 0 && ix < W) sum += wc[size_t(c * 4 * Cin + kk)] * x[(ci * H + iy) * W + ix];
                    }
                    out[c * 4 * W * H + (2 * i + a) * 2 * W + 2 * j + b] = sum;
                }
            }
        }
}

namespace {
// The custom op's own parameters hold its function; stride and padding travel in the userdata
// pointer's value (nothing to allocate or free).
void *conv_geometry(int64_t stride, int64_t pad) { return reinterpret_cast<void *>(uintptr_t(stride | (pad << 16))); }

ConvKernel kernel_of(const ggml_tensor *kw) {
    return kw->type == GGML_TYPE_F16 ? ConvKernel{nullptr, static_cast<const ggml_fp16_t *>(kw->data)}
                                     : ConvKernel{static_cast<const float *>(kw->data), nullptr};
}

void conv_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *x = dst->src[0], *kw = dst->src[1], *b = dst->src[2];
    const auto geometry = reinterpret_cast<uintptr_t>(userdata);
    const int64_t stride = int64_t(geometry & 0xffff), pad = int64_t(geometry >> 16);
    const ConvKernel kernel = kernel_of(kw);
    conv2d_f32(kernel, static_cast<const float *>(x->data), b ? static_cast<const float *>(b->data) : nullptr,
               static_cast<float *>(dst->data), x->ne[0], x->ne[1], x->ne[2], kw->ne[3], kw->ne[0], stride, pad, ith,
               nth, conv_engine_path());
}

void upsample_conv_node(ggml_tensor *dst, int ith, int nth, void *) {
    const ggml_tensor *x = dst->src[0], *kw = dst->src[1], *b = dst->src[2];
    const ConvKernel kernel = kernel_of(kw);
    upsample_conv2d_f32(kernel, static_cast<const float *>(x->data), b ? static_cast<const float *>(b->data) : nullptr,
                        static_cast<float *>(dst->data), x->ne[0], x->ne[1], x->ne[2], kw->ne[3], ith, nth,
                        conv_engine_path());
}

}  // namespace

ggml_tensor *upsample_conv2d_f32_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *kernel, ggml_tensor *bias) {
    if ((kernel->type != GGML_TYPE_F32 && kernel->type != GGML_TYPE_F16) || x->type != GGML_TYPE_F32 ||
        !ggml_is_contiguous(x) || !ggml_is_contiguous(kernel) || kernel->ne[0] != 3 || kernel->ne[1] != 3 ||
        kernel->ne[2] != x->ne[2] || x->ne[3] != 1 || (bias && (bias->type != GGML_TYPE_F32 || bias->ne[0] != kernel->ne[3])))
        fail_runtime("internal error: upsample_conv2d_f32_op takes contiguous F32 x [W, H, Cin, 1], F32/F16 kernel "
                     "[3, 3, Cin, Cout], F32 bias [Cout]");
    ggml_tensor *args[3] = {x, kernel, bias};
    ggml_tensor *out = ggml_custom_4d(ctx, GGML_TYPE_F32, 2 * x->ne[0], 2 * x->ne[1], kernel->ne[3], 1, args, bias ? 3 : 2,
                                      upsample_conv_node, GGML_N_TASKS_MAX, nullptr);
    ggml_set_name(out, "fm.upconv");  // for FLUXMINI_PROFILE's table
    return out;
}

ggml_tensor *conv2d_f32_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *kernel, ggml_tensor *bias, int stride,
                           int pad) {
    if (stride < 1 || stride > 0xffff || pad < 0 || pad > 0xffff)
        fail_value("convolution stride %d / padding %d out of range", stride, pad);
    if ((kernel->type != GGML_TYPE_F32 && kernel->type != GGML_TYPE_F16) || x->type != GGML_TYPE_F32 ||
        !ggml_is_contiguous(x) || !ggml_is_contiguous(kernel) || kernel->ne[0] != kernel->ne[1] ||
        kernel->ne[2] != x->ne[2] || x->ne[3] != 1 || (bias && (bias->type != GGML_TYPE_F32 || bias->ne[0] != kernel->ne[3])))
        fail_runtime("internal error: conv2d_f32_op takes contiguous F32 x [W, H, Cin, 1], F32/F16 kernel "
                     "[k, k, Cin, Cout], F32 bias [Cout]");
    const int64_t k = kernel->ne[0];
    const int64_t OW = (x->ne[0] + 2 * pad - k) / stride + 1, OH = (x->ne[1] + 2 * pad - k) / stride + 1;
    ggml_tensor *args[3] = {x, kernel, bias};
    ggml_tensor *out = ggml_custom_4d(ctx, GGML_TYPE_F32, OW, OH, kernel->ne[3], 1, args, bias ? 3 : 2, conv_node,
                                      GGML_N_TASKS_MAX, conv_geometry(stride, pad));
    ggml_set_name(out, "fm.conv");  // for FLUXMINI_PROFILE's table
    return out;
}

}  // namespace fm
