#include "layers.h"

#include "backend.h"
#include "cpu_conv.h"
#include "cpu_gelu.h"
#include "cpu_qmatmul.h"

#include <cmath>
#include <cstring>

namespace fm {

Ops::Ops(ggml_context *c, const Backend &backend)
    : ctx(c), qmatmul_path(backend.qmatmul_path()), attn_path(backend.attention_path()) {}

// An F32 weight's product through our convolution kernel as a 1x1 convolution (cpu_conv.h), where our
// matmul kernels run: the tokens are the pixels of a 1-pixel-high image whose channels are the
// features. ggml's F32 mul_mat (the PyPI wheel has no llamafile sgemm) runs 20-70 GFLOP/s on 2
// cores at Flux's txt_in, img_in and the VAE attention's shapes, the convolution 70-180 with the two
// transposes (KiB to a few MiB each) around it. Worth it from a few dozen tokens and outputs.
static bool f32_gemm_via_conv(const Ops &o, const ggml_tensor *x, const ggml_tensor *w, const ggml_tensor *b) {
    return o.qmatmul_path != KernelChoice::Ggml && cpu_conv2d_available() && w->type == GGML_TYPE_F32 &&
           ggml_n_dims(w) == 2 && ggml_is_contiguous(w) && x->type == GGML_TYPE_F32 && x->ne[2] == 1 &&
           x->ne[3] == 1 && x->ne[1] >= 32 && w->ne[1] >= 128 && (!b || (b->type == GGML_TYPE_F32 && ggml_is_contiguous(b)));
}

static ggml_tensor *f32_gemm_conv(const Ops &o, ggml_tensor *x, ggml_tensor *w, ggml_tensor *b) {
    ggml_context *ctx = o.ctx;
    const int64_t in = x->ne[0], n = x->ne[1], out = w->ne[1];
    ggml_tensor *img = ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_transpose(ctx, x)), n, 1, in, 1);  // [W = n, H = 1, C = in]
    ggml_tensor *y = conv2d_f32_op(ctx, img, ggml_reshape_4d(ctx, w, 1, 1, in, out), b, 1, 0);    // [n, 1, out], bias fused
    return ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, y, n, out)));                   // [out, n]
}

ggml_tensor *linear(const Ops &o, ggml_tensor *x, const Linear &p) {
    ggml_tensor *w = p.w, *b = p.b;
    ggml_tensor *y;
    if (o.qmatmul_path != KernelChoice::Ggml && qmatmul_shape(w) && x->type == GGML_TYPE_F32 &&
        (!b || b->type == GGML_TYPE_F32)) {
        y = qmatmul_op(o.ctx, w, x, b, o.qmatmul_path, o.f16_act_scales);  // bias fused
    } else if (f32_gemm_via_conv(o, x, w, b)) {
        y = f32_gemm_conv(o, x, w, b);
    } else {
        y = ggml_mul_mat(o.ctx, w, x);
        if (o.f32_matmul) ggml_mul_mat_set_prec(y, GGML_PREC_F32);
        if (b) y = ggml_add(o.ctx, y, b);
    }
    if (!p.adapters || p.adapters->empty()) return y;
    // Our CPU kernels for both low-rank products wherever our matmul kernels run (cpu_lora.h:
    // ggml's mul_mat is slow at these shapes); ggml's route elsewhere.
    const bool own = o.qmatmul_path != KernelChoice::Ggml && lora_path_ok(o.qmatmul_path) && y->type == GGML_TYPE_F32;
    // Input adapters first; output adapters (on_output) then read the adapted output, so two
    // LoRAs stacked on one layer add up whatever their kind.
    for (int pass = 0; pass < 2; ++pass) {
        for (const LoraPack &pk : *p.adapters) {
            if (pk.on_output != (pass == 1) || pk.merged) continue;
            ggml_tensor *src = pass == 0 ? x : y;
            if (own) {  // every adapter's down at once, then each up-product added into its rows, one node
                y = lora_op(o.ctx, y, src, pk, o.qmatmul_path);
                continue;
            }
            const size_t de = ggml_element_size(pk.down);
            for (const LoraPack::Part &a : pk.parts) {
                ggml_tensor *down = ggml_view_2d(o.ctx, pk.down, pk.down->ne[0], a.rank, pk.down->nb[1], size_t(a.k0) * pk.down->nb[1]);
                ggml_tensor *up_t = ggml_view_2d(o.ctx, pk.up_t, a.rows, a.rank, size_t(a.rows) * de, size_t(a.up_offset) * de);
                ggml_tensor *up = ggml_cont(o.ctx, ggml_transpose(o.ctx, up_t));  // [rank, rows]
                ggml_tensor *d = ggml_mul_mat(o.ctx, up, ggml_mul_mat(o.ctx, down, src));
                if (a.scale != 1.0f) d = ggml_scale(o.ctx, d, a.scale);
                if (d->ne[0] == y->ne[0]) {
                    y = ggml_add(o.ctx, y, d);
                } else {  // a row range of a fused weight: add into that slice of every column
                    const size_t es = ggml_element_size(y);
                    y = ggml_acc(o.ctx, y, d, y->nb[1], y->nb[2], y->nb[3], size_t(a.row0) * es);
                }
            }
        }
    }
    return y;
}

std::vector<LoraPack> pack_adapters(ggml_context *ctx, const std::vector<AdapterFactors> &adapters,
                                    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> &uploads) {
    std::vector<LoraPack> packs;
    std::vector<std::vector<const AdapterFactors *>> members;
    std::vector<ggml_type> types;
    for (const AdapterFactors &a : adapters) {
        size_t i = 0;
        while (i < packs.size() && !(packs[i].on_output == a.on_output && types[i] == a.type)) ++i;
        if (i == packs.size()) {
            packs.emplace_back();
            packs.back().on_output = a.on_output;
            members.emplace_back();
            types.push_back(a.type);
        }
        members[i].push_back(&a);
    }
    for (size_t i = 0; i < packs.size(); ++i) {
        LoraPack &pk = packs[i];
        const size_t es = ggml_type_size(types[i]);
        const int64_t in = members[i].front()->in;
        int64_t r_all = 0, up_all = 0;
        for (const AdapterFactors *a : members[i]) {
            if (a->in != in) fail_runtime("internal error: adapters of one layer read different widths");
            LoraPack::Part part;
            part.k0 = r_all;
            part.rank = a->rank;
            part.row0 = a->row0;
            part.rows = a->rows;
            part.up_offset = up_all;
            part.scale = a->scale;
            pk.parts.push_back(part);
            r_all += a->rank;
            up_all += a->rank * a->rows;
        }
        pk.down = ggml_new_tensor_2d(ctx, types[i], in, r_all);
        pk.up_t = ggml_new_tensor_1d(ctx, types[i], up_all);
        std::vector<uint8_t> down(size_t(in * r_all) * es), up_t(size_t(up_all) * es);
        for (size_t m = 0; m < members[i].size(); ++m) {
            const AdapterFactors &a = *members[i][m];
            const LoraPack::Part &part = pk.parts[m];
            std::memcpy(down.data() + size_t(part.k0 * in) * es, a.down, size_t(a.rank * in) * es);
            // up [rows][rank] -> upᵀ [rank][rows]
            const uint8_t *u = static_cast<const uint8_t *>(a.up);
            uint8_t *ut = up_t.data() + size_t(part.up_offset) * es;
            for (int64_t j = 0; j < a.rows; ++j)
                for (int64_t k = 0; k < a.rank; ++k)
                    std::memcpy(ut + size_t(k * a.rows + j) * es, u + size_t(j * a.rank + k) * es, es);
        }
        uploads.emplace_back(pk.down, std::move(down));
        uploads.emplace_back(pk.up_t, std::move(up_t));
    }
    return packs;
}

ggml_tensor *layer_norm(const Ops &o, ggml_tensor *x, const Norm &p, float eps) {
    ggml_tensor *y = ggml_norm(o.ctx, x, eps);
    if (p.w) y = ggml_mul(o.ctx, y, p.w);
    if (p.b) y = ggml_add(o.ctx, y, p.b);
    return y;
}

ggml_tensor *rms_norm(const Ops &o, ggml_tensor *x, ggml_tensor *w, float eps) {
    ggml_tensor *y = ggml_rms_norm(o.ctx, x, eps);
    if (w) y = ggml_mul(o.ctx, y, w);
    return y;
}

ggml_tensor *group_norm(const Ops &o, ggml_tensor *x, const Norm &p, int groups, float eps) {
    ggml_tensor *y = ggml_group_norm(o.ctx, x, groups, eps);
    const int64_t c = x->ne[2];
    if (p.w) y = ggml_mul(o.ctx, y, ggml_reshape_4d(o.ctx, p.w, 1, 1, c, 1));
    if (p.b) y = ggml_add(o.ctx, y, ggml_reshape_4d(o.ctx, p.b, 1, 1, c, 1));
    return y;
}

// GPU backends (CUDA) implement unary ops on contiguous tensors only; views such as the MLP
// half of a single block's linear1 output are made contiguous first.
static ggml_tensor *contiguous(const Ops &o, ggml_tensor *x) {
    return ggml_is_contiguous(x) ? x : ggml_cont(o.ctx, x);
}

// Our F32 GELU op wherever our matmul kernels run (the CPU backend): faster than ggml's, and exact
// to a few ulps, so it serves the exact path too. It reads views with contiguous rows in place.
static bool own_gelu(const Ops &o, const ggml_tensor *x) {
    return o.qmatmul_path != KernelChoice::Ggml && !o.ggml_gelu && x->type == GGML_TYPE_F32 &&
           x->nb[0] == sizeof(float);
}

ggml_tensor *gelu_tanh(const Ops &o, ggml_tensor *x) {
    if (own_gelu(o, x)) return gelu_tanh_op(o.ctx, x, nullptr, gelu_path_for(o.qmatmul_path));
    x = contiguous(o, x);
    if (!o.exact) return ggml_gelu(o.ctx, x);
    // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) from exact F32 ops (ggml_gelu uses an F16 table).
    const float c = std::sqrt(2.0f / float(M_PI));
    ggml_tensor *x3 = ggml_mul(o.ctx, ggml_sqr(o.ctx, x), x);
    ggml_tensor *inner = ggml_scale(o.ctx, ggml_add(o.ctx, x, ggml_scale(o.ctx, x3, 0.044715f)), c);
    ggml_tensor *t = ggml_scale_bias(o.ctx, ggml_tanh(o.ctx, inner), 0.5f, 0.5f);
    return ggml_mul(o.ctx, x, t);
}

ggml_tensor *concat_gelu_tanh(const Ops &o, ggml_tensor *head, ggml_tensor *x) {
    if (own_gelu(o, x) && head->type == GGML_TYPE_F32 && head->nb[0] == sizeof(float))
        return gelu_tanh_op(o.ctx, x, head, gelu_path_for(o.qmatmul_path));
    return ggml_concat(o.ctx, head, gelu_tanh(o, x), 0);
}

ggml_tensor *quick_gelu(const Ops &o, ggml_tensor *x) {
    x = contiguous(o, x);
    if (!o.exact) return ggml_gelu_quick(o.ctx, x);
    return ggml_mul(o.ctx, x, ggml_sigmoid(o.ctx, ggml_scale(o.ctx, x, 1.702f)));
}

ggml_tensor *silu(const Ops &o, ggml_tensor *x) { return ggml_silu(o.ctx, contiguous(o, x)); }

ggml_tensor *attention(const Ops &o, ggml_tensor *q, ggml_tensor *k, ggml_tensor *v, ggml_tensor *mask,
                       float scale) {
    ggml_context *ctx = o.ctx;
    const int64_t d = q->ne[0], heads = q->ne[1], lq = q->ne[2];
    if (o.flash_attn && o.attn_path != AttnPath::Ggml) {
        // Our fused kernel: F32 Q, K, V read in place (views included), no score matrix.
        auto rows = [&](ggml_tensor *t) { return t->nb[0] == sizeof(float) ? t : ggml_cont(ctx, t); };
        q = rows(q), k = rows(k), v = rows(v);
        if (attention_op_supports(q, k, v, mask))
            return ggml_reshape_2d(ctx, attention_op(ctx, q, k, v, mask, scale, o.attn_path), d * heads, lq);
    }
    // [d, H, L] -> [d, L, H]
    q = ggml_permute(ctx, q, 0, 2, 1, 3);
    k = ggml_permute(ctx, k, 0, 2, 1, 3);
    if (o.flash_attn && (!o.exact || o.flash_kv_f32)) {
        // K/V in F16 halve the memory traffic (or F32, see Ops); the softmax and accumulation stay F32.
        const ggml_type kv = o.flash_kv_f32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
        k = ggml_cast(ctx, k, kv);
        ggml_tensor *vv = ggml_cast(ctx, ggml_permute(ctx, v, 0, 2, 1, 3), kv);
        ggml_tensor *m = mask ? ggml_cast(ctx, mask, GGML_TYPE_F16) : nullptr;
        ggml_tensor *out = ggml_flash_attn_ext(ctx, q, k, vv, m, scale, 0.0f, 0.0f);
        ggml_flash_attn_ext_set_prec(out, GGML_PREC_F32);
        return ggml_reshape_2d(ctx, out, d * heads, lq);  // result is [d, H, L]
    }
    ggml_tensor *kq = ggml_mul_mat(ctx, k, q);  // [Lk, Lq, H]
    ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
    kq = ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
    ggml_tensor *vt = ggml_cont(ctx, ggml_permute(ctx, v, 1, 2, 0, 3));  // [Lk, d, H]
    ggml_tensor *out = ggml_mul_mat(ctx, vt, kq);                         // [d, Lq, H]
    out = ggml_cont(ctx, ggml_permute(ctx, out, 0, 2, 1, 3));            // [d, H, Lq]
    return ggml_reshape_2d(ctx, out, d * heads, lq);
}

}  // namespace fm
