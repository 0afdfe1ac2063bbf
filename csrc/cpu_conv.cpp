// F32 convolution for the CPU (see cpu_conv.h): a register-blocked GEMM in the style of BLIS over the
// im2col matrix, which is packed panel by panel from the image and never stored whole.
//
// The output is cut into tiles of kRows channels x 16 pixels held in 12 AVX registers. Each
// thread owns a range of 16-pixel panels; per block of kKc values of k it packs a chunk of its
// panels k-major (so one k step loads 16 pixels with two aligned loads), then sweeps the
// channels in groups of kRows, whose kKc weights stay in L1 while the packed chunk streams from
// L2. Sums are kept in the same order for every output (k blocks in order, k ascending inside),
// whatever the pixel range, so thread counts do not change results.
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
constexpr int64_t kChunk = 24;   // panels packed together: 24·16·kKc floats (384 KiB) in L2
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
    int64_t W, H, Cin, k, s, pad, OW, OH;
    int64_t per_row() const { return (OW + kCols - 1) / kCols; }
    int64_t count() const { return OH * per_row(); }
    int64_t width(int64_t q) const { return std::min<int64_t>(kCols, OW - (q % per_row()) * kCols); }
    int64_t first(int64_t q) const { return (q / per_row()) * OW + (q % per_row()) * kCols; }
    __attribute__((target("avx2,fma"))) void pack(int64_t q, int64_t k0, int64_t kc, float *dst) const {
        const int64_t oy = q / per_row(), ox0 = (q % per_row()) * kCols, n = width(q);
        int64_t kx = k0 % k, ky = (k0 / k) % k, ci = k0 / (k * k);
        for (int64_t kk = 0; kk < kc; ++kk, dst += kCols) {
            const int64_t iy = oy * s + ky - pad, ix0 = ox0 * s + kx - pad;
            if (iy < 0 || iy >= H) {
                std::memset(dst, 0, kCols * sizeof(float));
            } else {
                const float *row = x + (ci * H + iy) * W;
                if (s == 1 && n == kCols && ix0 >= 0 && ix0 + kCols <= W) {
                    _mm256_store_ps(dst, _mm256_loadu_ps(row + ix0));
                    _mm256_store_ps(dst + 8, _mm256_loadu_ps(row + ix0 + 8));
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

// out[c·ldo + first(q) + j] = bias[c] + Σ_k w[c·K + k] · panel_q[k][j]: this thread's panels.
// kZmm: the AVX-512 tile (16 channels), the weights first rearranged k-major per 16 channels.
template <bool kZmm, class Panels>
void gemm_driver(const Panels &src, const float *w, const float *bias, float *out, int64_t ldo, int64_t C, int64_t K,
                 int ith, int nth) {
    constexpr int R = kZmm ? kRowsZmm : kRows;
    const int64_t panels = src.count();
    const int64_t pa = panels * ith / nth, pb = panels * (ith + 1) / nth;
    if (pa >= pb) return;
    const int64_t nkb = (K + kKc - 1) / kKc;
    const int64_t kc_max = (K + nkb - 1) / nkb;  // equal k blocks
    thread_local std::vector<float> buf;
    const size_t need = size_t(kChunk * kCols * kc_max) + 16;
    if (buf.size() < need) buf.resize(need);
    float *packed = reinterpret_cast<float *>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    alignas(64) float tmp[R * kCols];
    std::vector<float> wpad(kZmm ? 0 : size_t(R * kc_max));
    float bpad[R];
    // kZmm: wt[(c / 16)·K·16 + k·16 + c % 16] = w[c·K + k], channels past C zero; bias padded too.
    std::vector<float> wt, bt;
    if (kZmm) {
        const int64_t cpad = (C + R - 1) / R * R;
        wt.assign(size_t(cpad * K), 0.0f);
        for (int64_t c = 0; c < C; ++c)
            for (int64_t k = 0; k < K; ++k) wt[size_t((c / R) * K * R + k * R + c % R)] = w[c * K + k];
        if (bias) {
            bt.assign(size_t(cpad), 0.0f);
            std::copy(bias, bias + C, bt.begin());
        }
    }

    for (int64_t q0 = pa; q0 < pb; q0 += kChunk) {
        const int64_t q1 = std::min(pb, q0 + kChunk);
        for (int64_t kb = 0; kb < nkb; ++kb) {
            const int64_t k0 = kb * kc_max, kc = std::min(kc_max, K - k0);
            for (int64_t q = q0; q < q1; ++q) src.pack(q, k0, kc, packed + (q - q0) * kCols * kc);
            const bool init = kb == 0;
            for (int64_t c0 = 0; c0 < C; c0 += R) {
                const int rows = int(std::min<int64_t>(R, C - c0));
                const float *wr = kZmm ? wt.data() + c0 * K + k0 * R : w + c0 * K + k0;
                int64_t ldw = K;
                const float *br = kZmm ? (bias ? bt.data() + c0 : nullptr) : bias ? bias + c0 : nullptr;
                if (!kZmm && rows < R) {  // the last channels: weights and bias padded with zero rows
                    std::fill(wpad.begin(), wpad.end(), 0.0f);
                    for (int r = 0; r < rows; ++r) std::memcpy(&wpad[size_t(r * kc)], wr + r * K, size_t(kc) * sizeof(float));
                    std::fill(bpad, bpad + R, 0.0f);
                    if (br) std::memcpy(bpad, br, size_t(rows) * sizeof(float));
                    wr = wpad.data();
                    ldw = kc;
                    br = br ? bpad : nullptr;
                }
                auto tile = [&](const float *xp, float *c, int64_t ldc) {
                    if constexpr (kZmm) tile_kernel_zmm(xp, wr, kc, c, ldc, init, br);
                    else tile_kernel(xp, wr, ldw, kc, c, ldc, init, br);
                };
                for (int64_t q = q0; q < q1; ++q) {
                    const int64_t n = src.width(q);
                    float *c = out + c0 * ldo + src.first(q);
                    const float *xp = packed + (q - q0) * kCols * kc;
                    if (n == kCols && rows == R) {
                        tile(xp, c, ldo);
                    } else {  // a partial tile goes through a full one
                        if (!init)
                            for (int r = 0; r < rows; ++r) std::memcpy(tmp + r * kCols, c + r * ldo, size_t(n) * sizeof(float));
                        tile(xp, tmp, kCols);
                        for (int r = 0; r < rows; ++r) std::memcpy(c + r * ldo, tmp + r * kCols, size_t(n) * sizeof(float));
                    }
                }
            }
        }
    }
}

template <bool kZmm>
void conv2d_simd(const float *kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H, int64_t Cin,
                 int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth) {
    const int64_t OW = (W + 2 * pad - k) / stride + 1, OH = (H + 2 * pad - k) / stride + 1;
    gemm_driver<kZmm>(ConvPanels{x, W, H, Cin, k, stride, pad, OW, OH}, kernel, bias, out, OW * OH, Cout, k * k * Cin,
                      ith, nth);
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
void conv2d_portable(const float *kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H,
                     int64_t Cin, int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth) {
    const int64_t OW = (W + 2 * pad - k) / stride + 1, OH = (H + 2 * pad - k) / stride + 1, K = k * k * Cin;
    for (int64_t p = OW * OH * ith / nth; p < OW * OH * (ith + 1) / nth; ++p)
        for (int64_t c = 0; c < Cout; ++c) {
            float sum = bias ? bias[c] : 0.0f;
            for (int64_t kk = 0; kk < K; ++kk) {
                const int64_t kx = kk % k, ky = (kk / k) % k, ci = kk / (k * k);
                const int64_t iy = (p / OW) * stride + ky - pad, ix = (p % OW) * stride + kx - pad;
                if (iy >= 0 && iy < H && ix >= 0 && ix < W) sum += kernel[c * K + kk] * x[(ci * H + iy) * W + ix];
            }
            out[c * OW * OH + p] = sum;
        }
}
}  // namespace

void conv2d_f32(const float *kernel, const float *x, const float *bias, float *out, int64_t W, int64_t H, int64_t Cin,
                int64_t Cout, int64_t k, int64_t stride, int64_t pad, int ith, int nth, ConvPath path) {
#ifdef FM_CONV_X86
    if (path == ConvPath::Avx512 && conv_path_supported(path))
        return conv2d_simd<true>(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
    if (path == ConvPath::Avx2 && conv_path_supported(path))
        return conv2d_simd<false>(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
#endif
    conv2d_portable(kernel, x, bias, out, W, H, Cin, Cout, k, stride, pad, ith, nth);
}

namespace {
// The custom op's own parameters hold its function; stride and padding travel in the userdata
// pointer's value (nothing to allocate or free).
void *conv_geometry(int64_t stride, int64_t pad) { return reinterpret_cast<void *>(uintptr_t(stride | (pad << 16))); }

void conv_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *x = dst->src[0], *kw = dst->src[1], *b = dst->src[2];
    const auto geometry = reinterpret_cast<uintptr_t>(userdata);
    const int64_t stride = int64_t(geometry & 0xffff), pad = int64_t(geometry >> 16);
    const float *kernel = static_cast<const float *>(kw->data);
    std::vector<float> widened;
    if (kw->type == GGML_TYPE_F16) {  // F16 kernels: each thread widens its own copy (≤ 9.4 MB, ~1 ms)
        widened.resize(size_t(ggml_nelements(kw)));
        ggml_fp16_to_fp32_row(static_cast<const ggml_fp16_t *>(kw->data), widened.data(), ggml_nelements(kw));
        kernel = widened.data();
    }
    conv2d_f32(kernel, static_cast<const float *>(x->data), b ? static_cast<const float *>(b->data) : nullptr,
               static_cast<float *>(dst->data), x->ne[0], x->ne[1], x->ne[2], kw->ne[3], kw->ne[0], stride, pad, ith,
               nth, conv_engine_path());
}

}  // namespace

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
    return ggml_custom_4d(ctx, GGML_TYPE_F32, OW, OH, kernel->ne[3], 1, args, bias ? 3 : 2, conv_node, GGML_N_TASKS_MAX,
                          conv_geometry(stride, pad));
}

}  // namespace fm
