// The LoRA kernels (cpu_lora.h).
// Down: h[n][k] = Σ_i down[k][i] · x[n][i]. Register tiles of 4 tokens × 4 ranks (AVX-512) or
// 4 × 2 (AVX2), i innermost: each down vector is loaded (and widened from F16 / BF16) once per 4
// tokens, each x vector once per 4 (2) ranks; each (token, rank) keeps a vector of partial sums,
// whose lanes are summed once at the end.
// Up: out[n][j] += Σ_k (scale · h[n][k]) · upᵀ[k][j]. Register tiles of 4 tokens × 2 vectors of
// rows, k innermost: each upᵀ vector is loaded (and widened) once per 4 tokens, each c = scale·h
// once per 2 vectors.
#include "cpu_lora.h"

#include "cpu_qmatmul.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FM_LORA_X86 1
#include <immintrin.h>
#endif

namespace fm {

LoraPack::LoraPack() {
    for (int i = 0; i < 6; ++i) nodes[i] = {this, KernelChoice(i)};
}
LoraPack::LoraPack(const LoraPack &o)
    : down(o.down), up_t(o.up_t), on_output(o.on_output), merged(o.merged), parts(o.parts) {
    for (int i = 0; i < 6; ++i) nodes[i] = {this, KernelChoice(i)};
}
LoraPack &LoraPack::operator=(const LoraPack &o) {
    down = o.down;
    up_t = o.up_t;
    on_output = o.on_output;
    merged = o.merged;
    parts = o.parts;
    return *this;  // nodes keep pointing at this pack
}

namespace {

constexpr int kTok = 4;     // tokens per register tile
constexpr int kChunk = 64;  // ranks per pass over the outputs (the c values of a tile stay on the stack)

// c[t][k] = scale · h[t][k0 + k] for a tile's tokens and one chunk of ranks.
inline void tile_coefficients(const float *h, int64_t h_stride, float scale, int tokens, int64_t kc, float *c) {
    for (int t = 0; t < tokens; ++t)
        for (int64_t k = 0; k < kc; ++k) c[t * kChunk + k] = scale * h[t * h_stride + k];
}

inline float widen(ggml_type type, const void *p, int64_t i) {
    switch (type) {
    case GGML_TYPE_F16: return ggml_fp16_to_fp32(static_cast<const ggml_fp16_t *>(p)[i]);
    case GGML_TYPE_BF16: {
        const uint32_t bits = uint32_t(static_cast<const uint16_t *>(p)[i]) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    }
    default: return static_cast<const float *>(p)[i];
    }
}

// Rows j0 .. j1 of a tile, one element at a time (the portable path, and the vector paths' tails).
void tile_scalar(ggml_type type, const void *up_t, int64_t rows, const float *c, int tokens, int64_t kc, float *out,
                 int64_t out_stride, int64_t j0, int64_t j1) {
    for (int t = 0; t < tokens; ++t)
        for (int64_t j = j0; j < j1; ++j) {
            float acc = out[t * out_stride + j];
            for (int64_t k = 0; k < kc; ++k) acc += c[t * kChunk + k] * widen(type, up_t, k * rows + j);
            out[t * out_stride + j] = acc;
        }
}

#ifdef FM_LORA_X86
// ---- AVX-512 (16 lanes) ----
template <ggml_type T>
__attribute__((target("avx512f"))) inline __m512 load16(const void *p, int64_t i) {
    if constexpr (T == GGML_TYPE_F32) return _mm512_loadu_ps(static_cast<const float *>(p) + i);
    if constexpr (T == GGML_TYPE_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(static_cast<const uint16_t *>(p) + i))),
        16));
}

template <ggml_type T, int NT>
__attribute__((target("avx512f"))) int64_t tile_avx512(const void *up_t, int64_t rows, const float *c, int64_t kc,
                                                       float *out, int64_t os, int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + 32 <= j1; j += 32) {
        __m512 a[NT][2];
        for (int t = 0; t < NT; ++t) {
            a[t][0] = _mm512_loadu_ps(out + t * os + j);
            a[t][1] = _mm512_loadu_ps(out + t * os + j + 16);
        }
        for (int64_t k = 0; k < kc; ++k) {
            const __m512 u0 = load16<T>(up_t, k * rows + j), u1 = load16<T>(up_t, k * rows + j + 16);
            for (int t = 0; t < NT; ++t) {
                const __m512 ck = _mm512_set1_ps(c[t * kChunk + k]);
                a[t][0] = _mm512_fmadd_ps(ck, u0, a[t][0]);
                a[t][1] = _mm512_fmadd_ps(ck, u1, a[t][1]);
            }
        }
        for (int t = 0; t < NT; ++t) {
            _mm512_storeu_ps(out + t * os + j, a[t][0]);
            _mm512_storeu_ps(out + t * os + j + 16, a[t][1]);
        }
    }
    for (; j + 16 <= j1; j += 16) {
        __m512 a[NT];
        for (int t = 0; t < NT; ++t) a[t] = _mm512_loadu_ps(out + t * os + j);
        for (int64_t k = 0; k < kc; ++k) {
            const __m512 u = load16<T>(up_t, k * rows + j);
            for (int t = 0; t < NT; ++t) a[t] = _mm512_fmadd_ps(_mm512_set1_ps(c[t * kChunk + k]), u, a[t]);
        }
        for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * os + j, a[t]);
    }
    return j;  // the scalar tail starts here
}

// ---- AVX2 + FMA + F16C (8 lanes) ----
template <ggml_type T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void *p, int64_t i) {
    if constexpr (T == GGML_TYPE_F32) return _mm256_loadu_ps(static_cast<const float *>(p) + i);
    if constexpr (T == GGML_TYPE_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(static_cast<const uint16_t *>(p) + i))),
        16));
}

template <ggml_type T, int NT>
__attribute__((target("avx2,fma,f16c"))) int64_t tile_avx2(const void *up_t, int64_t rows, const float *c, int64_t kc,
                                                           float *out, int64_t os, int64_t j0, int64_t j1) {
    int64_t j = j0;
    for (; j + 16 <= j1; j += 16) {
        __m256 a[NT][2];
        for (int t = 0; t < NT; ++t) {
            a[t][0] = _mm256_loadu_ps(out + t * os + j);
            a[t][1] = _mm256_loadu_ps(out + t * os + j + 8);
        }
        for (int64_t k = 0; k < kc; ++k) {
            const __m256 u0 = load8<T>(up_t, k * rows + j), u1 = load8<T>(up_t, k * rows + j + 8);
            for (int t = 0; t < NT; ++t) {
                const __m256 ck = _mm256_broadcast_ss(c + t * kChunk + k);
                a[t][0] = _mm256_fmadd_ps(ck, u0, a[t][0]);
                a[t][1] = _mm256_fmadd_ps(ck, u1, a[t][1]);
            }
        }
        for (int t = 0; t < NT; ++t) {
            _mm256_storeu_ps(out + t * os + j, a[t][0]);
            _mm256_storeu_ps(out + t * os + j + 8, a[t][1]);
        }
    }
    for (; j + 8 <= j1; j += 8) {
        __m256 a[NT];
        for (int t = 0; t < NT; ++t) a[t] = _mm256_loadu_ps(out + t * os + j);
        for (int64_t k = 0; k < kc; ++k) {
            const __m256 u = load8<T>(up_t, k * rows + j);
            for (int t = 0; t < NT; ++t) a[t] = _mm256_fmadd_ps(_mm256_broadcast_ss(c + t * kChunk + k), u, a[t]);
        }
        for (int t = 0; t < NT; ++t) _mm256_storeu_ps(out + t * os + j, a[t]);
    }
    return j;
}

template <int NT>
int64_t tile_vector(KernelChoice path, ggml_type type, const void *up_t, int64_t rows, const float *c, int64_t kc,
                    float *out, int64_t os, int64_t j0, int64_t j1) {
    if (path == KernelChoice::Avx512Vnni) {
        switch (type) {
        case GGML_TYPE_F16: return tile_avx512<GGML_TYPE_F16, NT>(up_t, rows, c, kc, out, os, j0, j1);
        case GGML_TYPE_BF16: return tile_avx512<GGML_TYPE_BF16, NT>(up_t, rows, c, kc, out, os, j0, j1);
        default: return tile_avx512<GGML_TYPE_F32, NT>(up_t, rows, c, kc, out, os, j0, j1);
        }
    }
    switch (type) {
    case GGML_TYPE_F16: return tile_avx2<GGML_TYPE_F16, NT>(up_t, rows, c, kc, out, os, j0, j1);
    case GGML_TYPE_BF16: return tile_avx2<GGML_TYPE_BF16, NT>(up_t, rows, c, kc, out, os, j0, j1);
    default: return tile_avx2<GGML_TYPE_F32, NT>(up_t, rows, c, kc, out, os, j0, j1);
    }
}

// ---- the down product: one (token, rank) pair per accumulator vector, kept in `acc` between
// blocks of the width (acc[t·as + k·lanes ...]); the lanes are summed once at the end ----
template <ggml_type T, int NT, int NK>
__attribute__((target("avx512f"))) void down_tile_avx512(const void *down, int64_t in, int64_t i0, int64_t i1,
                                                        const float *x, int64_t xs, float *acc, int64_t as) {
    __m512 a[NT][NK];
    for (int t = 0; t < NT; ++t)
        for (int k = 0; k < NK; ++k) a[t][k] = _mm512_loadu_ps(acc + t * as + k * 16);
    for (int64_t i = i0; i < i1; i += 16) {
        __m512 d[NK];
        for (int k = 0; k < NK; ++k) d[k] = load16<T>(down, k * in + i);
        for (int t = 0; t < NT; ++t) {
            const __m512 xv = _mm512_loadu_ps(x + t * xs + i);
            for (int k = 0; k < NK; ++k) a[t][k] = _mm512_fmadd_ps(xv, d[k], a[t][k]);
        }
    }
    for (int t = 0; t < NT; ++t)
        for (int k = 0; k < NK; ++k) _mm512_storeu_ps(acc + t * as + k * 16, a[t][k]);
}

template <ggml_type T, int NT, int NK>
__attribute__((target("avx2,fma,f16c"))) void down_tile_avx2(const void *down, int64_t in, int64_t i0, int64_t i1,
                                                            const float *x, int64_t xs, float *acc, int64_t as) {
    __m256 a[NT][NK];
    for (int t = 0; t < NT; ++t)
        for (int k = 0; k < NK; ++k) a[t][k] = _mm256_loadu_ps(acc + t * as + k * 8);
    for (int64_t i = i0; i < i1; i += 8) {
        __m256 d[NK];
        for (int k = 0; k < NK; ++k) d[k] = load8<T>(down, k * in + i);
        for (int t = 0; t < NT; ++t) {
            const __m256 xv = _mm256_loadu_ps(x + t * xs + i);
            for (int k = 0; k < NK; ++k) a[t][k] = _mm256_fmadd_ps(xv, d[k], a[t][k]);
        }
    }
    for (int t = 0; t < NT; ++t)
        for (int k = 0; k < NK; ++k) _mm256_storeu_ps(acc + t * as + k * 8, a[t][k]);
}

using DownTile = void (*)(const void *, int64_t, int64_t, int64_t, const float *, int64_t, float *, int64_t);

// The tile function for `nt` ≤ 4 tokens and `nk` ranks, ≤ 4 (zmm) or 2 (ymm): the full tile or a tail.
template <ggml_type T, int NK>
DownTile down_tile_for(bool zmm, int nt) {
    switch (nt) {
    case 4: return zmm ? down_tile_avx512<T, 4, NK> : down_tile_avx2<T, 4, NK>;
    case 3: return zmm ? down_tile_avx512<T, 3, NK> : down_tile_avx2<T, 3, NK>;
    case 2: return zmm ? down_tile_avx512<T, 2, NK> : down_tile_avx2<T, 2, NK>;
    default: return zmm ? down_tile_avx512<T, 1, NK> : down_tile_avx2<T, 1, NK>;
    }
}

template <ggml_type T>
DownTile down_tile_for(bool zmm, int nt, int nk) {
    switch (nk) {
    case 4: return down_tile_for<T, 4>(zmm, nt);
    case 3: return down_tile_for<T, 3>(zmm, nt);
    case 2: return down_tile_for<T, 2>(zmm, nt);
    default: return down_tile_for<T, 1>(zmm, nt);
    }
}

DownTile down_tile_for(ggml_type type, bool zmm, int nt, int nk) {
    switch (type) {
    case GGML_TYPE_F16: return down_tile_for<GGML_TYPE_F16>(zmm, nt, nk);
    case GGML_TYPE_BF16: return down_tile_for<GGML_TYPE_BF16>(zmm, nt, nk);
    default: return down_tile_for<GGML_TYPE_F32>(zmm, nt, nk);
    }
}
#endif

}  // namespace

bool lora_path_ok(KernelChoice path) {
    // Avx512Vnni's CPUs have AVX-512 F (all the zmm kernel needs); AvxVnni's and Avx2's have
    // AVX2, FMA and F16C.
    return path == KernelChoice::Portable ||
           ((path == KernelChoice::Avx2 || path == KernelChoice::AvxVnni || path == KernelChoice::Avx512Vnni) &&
            qmatmul_path_supported(path));
}

void lora_up_rows(KernelChoice path, ggml_type type, const void *up_t, int64_t rank, int64_t rows, const float *h,
                  int64_t h_stride, float scale, float *out, int64_t out_stride, int64_t tokens, int64_t j0,
                  int64_t j1) {
#ifdef FM_LORA_X86
    const bool vec = path != KernelChoice::Portable && lora_path_ok(path);
#endif
    const size_t es = ggml_type_size(type);
    float c[kTok * kChunk];
    for (int64_t n0 = 0; n0 < tokens; n0 += kTok) {
        const int nt = int(std::min<int64_t>(kTok, tokens - n0));
        float *o = out + n0 * out_stride;
        for (int64_t k0 = 0; k0 < rank; k0 += kChunk) {
            const int64_t kc = std::min<int64_t>(kChunk, rank - k0);
            tile_coefficients(h + n0 * h_stride + k0, h_stride, scale, nt, kc, c);
            const void *u = static_cast<const char *>(up_t) + size_t(k0 * rows) * es;
            int64_t j = j0;
#ifdef FM_LORA_X86
            if (vec) {
                switch (nt) {
                case 4: j = tile_vector<4>(path, type, u, rows, c, kc, o, out_stride, j0, j1); break;
                case 3: j = tile_vector<3>(path, type, u, rows, c, kc, o, out_stride, j0, j1); break;
                case 2: j = tile_vector<2>(path, type, u, rows, c, kc, o, out_stride, j0, j1); break;
                default: j = tile_vector<1>(path, type, u, rows, c, kc, o, out_stride, j0, j1); break;
                }
            }
#endif
            tile_scalar(type, u, rows, c, nt, kc, o, out_stride, j, j1);
        }
    }
}

void lora_down_rows(KernelChoice path, ggml_type type, const void *down, int64_t in, int64_t ranks, const float *x,
                    int64_t x_stride, float *h, int64_t h_stride, int64_t tokens) {
    const size_t es = ggml_type_size(type);
    int64_t iv = 0;  // the vector paths' share of the width: 0 .. iv
#ifdef FM_LORA_X86
    std::vector<float> acc;
    int64_t lanes = 0;
    if (path != KernelChoice::Portable && lora_path_ok(path)) {
        const bool zmm = path == KernelChoice::Avx512Vnni;
        lanes = zmm ? 16 : 8;
        // 4 × 4 accumulators of 16 lanes (+ 4 down vectors + 1 x: 21 of 32 zmm registers), or
        // 4 × 2 of 8 lanes (+ 2 + 1: 11 of 16 ymm).
        const int64_t kr = zmm ? 4 : 2;
        // Blocks of the width whose 4 x rows (8 KiB) stay in L1 while every rank tile reads them,
        // and groups of tokens that read one block of `down` (R·512 values) from cache before the
        // next block: otherwise each tile of 4 tokens would stream all of `down` again (2 MiB for
        // the single blocks' linear2 at rank 64 in BF16).
        constexpr int64_t kBlock = 512, kGroup = 32;
        iv = in / lanes * lanes;
        acc.resize(size_t(kGroup * ranks * lanes));
        for (int64_t g0 = 0; g0 < tokens; g0 += kGroup) {
            const int64_t gn = std::min(kGroup, tokens - g0);
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t i0 = 0; i0 < iv; i0 += kBlock)
                for (int64_t t0 = 0; t0 < gn; t0 += 4) {
                    const int nt = int(std::min<int64_t>(4, gn - t0));
                    for (int64_t k0 = 0; k0 < ranks; k0 += kr)
                        down_tile_for(type, zmm, nt, int(std::min(kr, ranks - k0)))(
                            static_cast<const char *>(down) + size_t(k0 * in) * es, in, i0, std::min(iv, i0 + kBlock),
                            x + (g0 + t0) * x_stride, x_stride, acc.data() + (t0 * ranks + k0) * lanes, ranks * lanes);
                }
            for (int64_t t = 0; t < gn; ++t)
                for (int64_t k = 0; k < ranks; ++k) {
                    const float *a = acc.data() + (t * ranks + k) * lanes;
                    float sum = 0.0f;
                    for (int64_t l = 0; l < lanes; ++l) sum += a[l];
                    h[(g0 + t) * h_stride + k] = sum;
                }
        }
    }
#endif
    // The portable path, and the vector paths' tail of the width (fewer than `lanes` values).
    for (int64_t n = 0; n < tokens; ++n)
        for (int64_t k = 0; k < ranks; ++k) {
            float s = 0.0f;
            for (int64_t i = iv; i < in; ++i) s += x[n * x_stride + i] * widen(type, down, k * in + i);
            h[n * h_stride + k] = iv > 0 ? h[n * h_stride + k] + s : s;
        }
}

namespace {

// One pack's products for this thread's tokens (whole tiles of 4: R is small, so the threads split
// the tokens): h = down · x into a buffer of the thread's own, then y += scale · up · h in place.
// Each thread reads and writes only its own tokens of y, so an output adapter (x = y) is safe.
void lora_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const LoraPack::Node &node = *static_cast<const LoraPack::Node *>(userdata);
    const ggml_tensor *x = dst->src[1], *down = dst->src[2], *up_t = dst->src[3];
    const int64_t tokens = ggml_nrows(dst), out_rows = dst->ne[0], in = x->ne[0], r_all = down->ne[1];
    const int64_t tiles = (tokens + 3) / 4;
    const int64_t n0 = std::min(tokens, tiles * ith / nth * 4), n1 = std::min(tokens, tiles * (ith + 1) / nth * 4);
    if (n0 >= n1) return;
    thread_local std::vector<float> h;
    h.resize(size_t((n1 - n0) * r_all));
    const int64_t xs = int64_t(x->nb[1] / sizeof(float));  // rows evenly strided (lora_op)
    lora_down_rows(node.path, down->type, down->data, in, r_all, static_cast<const float *>(x->data) + n0 * xs, xs,
                   h.data(), r_all, n1 - n0);
    float *y = static_cast<float *>(dst->data) + n0 * out_rows;  // dst is y (in place)
    const size_t es = ggml_type_size(up_t->type);
    // Blocks of rows whose upᵀ (all parts) stays in cache while every token reads it: otherwise
    // each tile of 4 tokens would stream the whole upᵀ again (megabytes at rank 64). 256 KiB:
    // within the L2 of any x86 core of the last decade, which also holds the outputs. Within a
    // block, 8 tokens at a time, whose outputs stay in L1 between the parts.
    const int64_t row_block = std::max<int64_t>(32, (int64_t(256) << 10) / (r_all * int64_t(es)) / 32 * 32);
    constexpr int64_t kTokBlock = 8;
    for (int64_t jb = 0; jb < out_rows; jb += row_block) {
        const int64_t je = std::min(out_rows, jb + row_block);
        for (int64_t t0 = 0; t0 < n1 - n0; t0 += kTokBlock) {
            const int64_t nb = std::min(kTokBlock, n1 - n0 - t0);
            for (const LoraPack::Part &p : node.pack->parts) {
                const int64_t a = std::max(jb, p.row0), b = std::min(je, p.row0 + p.rows);
                if (a >= b) continue;
                lora_up_rows(node.path, up_t->type, static_cast<const char *>(up_t->data) + size_t(p.up_offset) * es,
                             p.rank, p.rows, h.data() + t0 * r_all + p.k0, r_all, p.scale,
                             y + t0 * out_rows + p.row0, out_rows, nb, a - p.row0, b - p.row0);
            }
        }
    }
}

}  // namespace

ggml_tensor *lora_op(ggml_context *ctx, ggml_tensor *y, ggml_tensor *x, const LoraPack &pack, KernelChoice path) {
    if (y->type != GGML_TYPE_F32 || x->type != GGML_TYPE_F32 || x->ne[0] != pack.down->ne[0] ||
        ggml_nrows(x) != ggml_nrows(y) || !lora_path_ok(path))
        fail_runtime("internal error: lora_op takes F32 y and x (of the factors' width) with the same tokens, and a "
                     "path this CPU runs");
    // x is read in place when its rows are evenly strided (one stride from token to token).
    if (x->nb[0] != sizeof(float) || x->nb[1] % sizeof(float) != 0 ||
        (x->ne[2] > 1 && x->nb[2] != x->nb[1] * size_t(x->ne[1])) ||
        (x->ne[3] > 1 && x->nb[3] != x->nb[1] * size_t(x->ne[1] * x->ne[2])))
        x = ggml_cont(ctx, x);
    if (!ggml_is_contiguous(y)) y = ggml_cont(ctx, y);
    // In place: the products add into y where it lies (a copy of y would cost as much memory
    // traffic as the products themselves: y has thousands of values per token, h only R).
    ggml_tensor *args[3] = {x, pack.down, pack.up_t};
    void *userdata = const_cast<LoraPack::Node *>(&pack.nodes[int(path)]);
    ggml_tensor *out = ggml_custom_inplace(ctx, y, args, 3, lora_node, GGML_N_TASKS_MAX, userdata);
    ggml_set_name(out, "fm.lora");  // for FLUXMINI_PROFILE's table
    return out;
}

}  // namespace fm
