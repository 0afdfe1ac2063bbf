// The tanh GELU for the CPU (see cpu_gelu.h).
#include "cpu_gelu.h"

#include "cpu_exp.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fm {

namespace {
// 2u = x·(k1 + k2·x²) with k1 = 2·√(2/π), k2 = k1·0.044715.
constexpr float kK1 = 1.5957691216057308f, kK2 = 0.0713548162726009f;
constexpr float kZeroBelow = -10.0f;

void gelu_portable(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i];
        y[i] = v <= kZeroBelow ? 0.0f : v / (1.0f + std::exp(-(v * (kK1 + kK2 * (v * v)))));
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx2,fma"))) inline __m256 gelu8(__m256 v) {
    const __m256 u2 = _mm256_mul_ps(v, _mm256_fmadd_ps(_mm256_set1_ps(kK2), _mm256_mul_ps(v, v), _mm256_set1_ps(kK1)));
    const __m256 g = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_neg_avx2(u2)));
    return _mm256_andnot_ps(_mm256_cmp_ps(v, _mm256_set1_ps(kZeroBelow), _CMP_LE_OQ), g);  // NaN stays NaN
}

__attribute__((target("avx2,fma"))) void gelu_avx2(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(_mm256_loadu_ps(x + i)));
    if (i < n) {  // the tail through the same arithmetic, so a value's bits do not depend on its position
        alignas(32) float buf[8] = {};
        std::copy(x + i, x + n, buf);
        _mm256_store_ps(buf, gelu8(_mm256_load_ps(buf)));
        std::copy(buf, buf + (n - i), y + i);
    }
}
#define FM_GELU_X86 1
#endif
}  // namespace

void gelu_tanh_f32(const float *x, float *y, int64_t n, NormPath path) {
#ifdef FM_GELU_X86
    if (path == NormPath::Avx2 && norm_path_supported(path)) return gelu_avx2(x, y, n);
#endif
    gelu_portable(x, y, n);
}

namespace {
// Row r of a tensor with contiguous rows (dims 1-3 flattened).
const float *row_of(const ggml_tensor *t, int64_t r) {
    const int64_t i1 = r % t->ne[1], i2 = r / t->ne[1] % t->ne[2], i3 = r / (t->ne[1] * t->ne[2]);
    return reinterpret_cast<const float *>(static_cast<const char *>(t->data) + i1 * t->nb[1] + i2 * t->nb[2] +
                                           i3 * t->nb[3]);
}

// dst row r = [head row r (copied), GELU(x row r)]; head is src[1] or absent. Threads split the
// output's values evenly.
void gelu_node(ggml_tensor *dst, int ith, int nth, void *userdata) {
    const ggml_tensor *x = dst->src[0], *head = dst->src[1];
    const int64_t hc = head ? head->ne[0] : 0, cols = dst->ne[0], rows = ggml_nrows(dst), total = cols * rows;
    const int64_t e0 = total * ith / nth, e1 = total * (ith + 1) / nth;
    const NormPath path = NormPath(reinterpret_cast<uintptr_t>(userdata));  // the path travels in the pointer's value
    for (int64_t r = e0 / std::max<int64_t>(cols, 1); r < rows && r * cols < e1; ++r) {
        const int64_t c0 = std::max(e0 - r * cols, int64_t(0)), c1 = std::min(e1 - r * cols, cols);
        float *out = static_cast<float *>(dst->data) + r * cols;
        if (c0 < hc) {
            const float *h = row_of(head, r);
            std::copy(h + c0, h + std::min(c1, hc), out + c0);
        }
        const int64_t g0 = std::max(c0, hc);
        if (g0 < c1) gelu_tanh_f32(row_of(x, r) + (g0 - hc), out + g0, c1 - g0, path);
    }
}
}  // namespace

NormPath gelu_path_for(KernelChoice qmatmul) {
    return qmatmul != KernelChoice::Portable && norm_path_supported(NormPath::Avx2) ? NormPath::Avx2 : NormPath::Portable;
}

ggml_tensor *gelu_tanh_op(ggml_context *ctx, ggml_tensor *x, ggml_tensor *head, NormPath path) {
    const auto rows_ok = [&](const ggml_tensor *t) { return t->type == GGML_TYPE_F32 && t->nb[0] == sizeof(float); };
    if (!rows_ok(x) || (head && (!rows_ok(head) || head->ne[1] != x->ne[1] ||
                                 head->ne[2] != x->ne[2] || head->ne[3] != x->ne[3])))
        fail_runtime("internal error: gelu_tanh_op takes F32 x (and head) with contiguous rows, the same row counts");
    ggml_tensor *args[2] = {x, head};
    ggml_tensor *out = ggml_custom_4d(ctx, GGML_TYPE_F32, x->ne[0] + (head ? head->ne[0] : 0), x->ne[1], x->ne[2],
                                      x->ne[3], args, head ? 2 : 1, gelu_node, GGML_N_TASKS_MAX,
                                      reinterpret_cast<void *>(uintptr_t(path)));
    ggml_set_name(out, "fm.gelu");  // for FLUXMINI_PROFILE's table
    return out;
}

}  // namespace fm
