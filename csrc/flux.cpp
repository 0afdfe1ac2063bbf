// FLUX.1 MMDiT forward pass (docs/MODEL.md §2–3), the equal of diffusers' FluxTransformer2DModel on
// BFL-named weights:
//   tokens = patchify(latent) (2x2 patches, (channel, dy, dx) features, odd sizes zero-padded)
//   vec    = time_in(E(1000σ)) + guidance_in(E(1000g)) + vector_in(pooled)   (E: cos half first)
//   img    = img_in(tokens), txt = txt_in(t5)
//   double blocks on (img, txt), then single blocks on x = [txt; img], final layer on img
//   velocity = unpatchify(final_layer.linear(modulate(LN(img), shift, scale)))
// Patchify, unpatchify, the timestep embeddings and the RoPE frequencies are computed here on the
// host; the network is one ggml graph per (latent size, text length), reserved once and reused
// for every step.
#include "flux.h"

#include "common.h"
#include "layers.h"

#include <cmath>
#include <string>

namespace fm {

FluxConfig FluxConfig::infer(const ComponentWeights &w) {
    FluxConfig c;
    const TensorRef &img_in = w.get("img_in.weight");
    c.in_channels = img_in.ne[0];
    c.hidden = img_in.ne[1];
    c.depth = w.count_indexed("double_blocks.");
    c.depth_single = w.count_indexed("single_blocks.");
    if (c.depth == 0 && c.depth_single == 0)
        fail_value("the diffusion model has no double_blocks or single_blocks tensors; it is not a Flux model");
    const std::string qn = c.depth > 0 ? "double_blocks.0.img_attn.norm.query_norm.scale"
                                       : "single_blocks.0.norm.query_norm.scale";
    c.head_dim = w.get(qn).ne[0];
    if (c.head_dim != 128)
        fail_value("Flux head_dim is %lld (length of %s) but Flux's 3-axis RoPE (16/56/56) needs 128",
                   (long long)c.head_dim, qn.c_str());
    if (c.hidden % c.head_dim != 0)
        fail_value("Flux hidden size %lld is not a multiple of head_dim %lld", (long long)c.hidden,
                   (long long)c.head_dim);
    c.heads = c.hidden / c.head_dim;
    c.mlp_hidden = c.depth > 0 ? w.get("double_blocks.0.img_mlp.0.weight").ne[1]
                               : w.get("single_blocks.0.linear1.weight").ne[1] - 3 * c.hidden;
    c.context_dim = w.get("txt_in.weight").ne[0];
    c.vec_dim = w.get("vector_in.in_layer.weight").ne[0];
    c.guidance = w.has("guidance_in.in_layer.weight");
    if (c.in_channels % 4 != 0) fail_value("img_in takes %lld features, not 4 x latent channels", (long long)c.in_channels);
    if (c.mlp_hidden <= 0) fail_value("the Flux single blocks' linear1 is too narrow for q, k, v and an MLP");
    return c;
}

std::vector<std::pair<std::string, int64_t>> FluxConfig::items() const {
    return {{"hidden", hidden},           {"heads", heads},          {"head_dim", head_dim},
            {"double_blocks", depth},     {"single_blocks", depth_single}, {"mlp_hidden", mlp_hidden},
            {"latent_channels", in_channels / 4}, {"context_dim", context_dim}, {"vec_dim", vec_dim},
            {"guidance_embed", guidance ? 1 : 0}};
}

namespace {

constexpr float kEps = 1e-6f;               // every LayerNorm and QK-RMSNorm of Flux
constexpr double kRopeTheta = 10000.0;
constexpr int kAxes[3] = {16, 56, 56};      // RoPE axes_dim (sum = head_dim)
constexpr int64_t kMaxLatentSide = 512;     // 4096 px
constexpr int64_t kMaxText = 4096;

struct Mlp2 {  // MLPEmbedder: out_layer(SiLU(in_layer(v)))
    Linear in, out;
};
struct Stream {  // one stream of a double block
    Linear mod, qkv, proj, mlp0, mlp2;
    ggml_tensor *q_norm = nullptr, *k_norm = nullptr;
};
struct DoubleBlock {
    Stream img, txt;
};
struct SingleBlock {
    Linear mod, lin1, lin2;
    ggml_tensor *q_norm = nullptr, *k_norm = nullptr;
};

// diffusers' get_timestep_embedding(flip_sin_to_cos=True, shift 0, max_period 10000) in float32,
// op by op as torch computes it: [cos(t·f_j), sin(t·f_j)], f_j = exp(−ln(10000)·j / half).
void timestep_embedding(float t, int64_t dim, float *out) {
    const int64_t half = dim / 2;
    const float neg_log = float(-std::log(10000.0));
    for (int64_t j = 0; j < half; ++j) {
        const float e = (neg_log * float(j)) / float(half);
        const float arg = t * std::exp(e);
        out[j] = float(std::cos(double(arg)));
        out[half + j] = float(std::sin(double(arg)));
    }
    if (dim % 2) out[dim - 1] = 0.0f;
}

size_t max_nodes(const FluxConfig &c) { return size_t(512 + 160 * c.depth + 96 * c.depth_single); }

ggml_tensor *input(ggml_context *ctx, const char *name, ggml_type type, int64_t n0, int64_t n1 = 1) {
    ggml_tensor *t = ggml_new_tensor_2d(ctx, type, n0, n1);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

// Chunk i of a modulation vector [k·h].
ggml_tensor *chunk(ggml_context *ctx, ggml_tensor *mod, int64_t h, int i) {
    return ggml_view_1d(ctx, mod, h, size_t(i) * h * ggml_element_size(mod));
}

// LN(x)·(1 + scale) + shift, broadcast over tokens (diffusers' AdaLayerNorm* order of ops).
ggml_tensor *modulate(const Ops &o, ggml_tensor *x, ggml_tensor *shift, ggml_tensor *scale) {
    ggml_tensor *y = ggml_norm(o.ctx, x, kEps);
    y = ggml_mul(o.ctx, y, ggml_scale_bias(o.ctx, scale, 1.0f, 1.0f));
    return ggml_add(o.ctx, y, shift);
}

// Part `part` (0 = Q, 1 = K, 2 = V) of fused projections z [row, L] as heads [d, H, L].
ggml_tensor *heads_view(ggml_context *ctx, const FluxConfig &c, ggml_tensor *z, int part) {
    const size_t es = ggml_element_size(z);
    return ggml_view_3d(ctx, z, c.head_dim, c.heads, z->ne[1], c.head_dim * es, z->nb[1], size_t(part) * c.hidden * es);
}

// Per-head RMSNorm with learned scale.
ggml_tensor *qk_norm(const Ops &o, ggml_tensor *x, ggml_tensor *scale) { return rms_norm(o, x, scale, kEps); }

// The 3-axis RoPE on q/k [d, H, L]: axis 0 (ids always 0) is the identity; axes 1 and 2 are
// two adjacent-pair rotations over the whole head whose per-pair frequency factors select the
// axis' pairs (the others get an infinite factor, angle 0) and rescale ggml's head-wide
// frequencies to the per-axis ones.
ggml_tensor *rope(ggml_context *ctx, ggml_tensor *x, ggml_tensor *pos_row, ggml_tensor *pos_col, ggml_tensor *ff_row,
                  ggml_tensor *ff_col) {
    const int n_dims = int(x->ne[0]);
    x = ggml_rope_ext(ctx, x, pos_row, ff_row, n_dims, GGML_ROPE_TYPE_NORMAL, 0, float(kRopeTheta), 1.0f, 0.0f, 1.0f,
                      0.0f, 0.0f);
    return ggml_rope_ext(ctx, x, pos_col, ff_col, n_dims, GGML_ROPE_TYPE_NORMAL, 0, float(kRopeTheta), 1.0f, 0.0f,
                         1.0f, 0.0f, 0.0f);
}

}  // namespace

struct FluxNet::Layers {
    Linear img_in, txt_in, final_mod, final_lin;
    Mlp2 time_in, guidance_in, vector_in;
    std::vector<DoubleBlock> doubles;
    std::vector<SingleBlock> singles;
};

FluxNet::FluxNet(Backend &b, const ComponentWeights &w, const EngineOptions &options)
    : Network(b, w, options), cfg_(FluxConfig::infer(w)), layers_(new Layers) {
    set_graph_nodes(max_nodes(cfg_));
    Layers &L = *layers_;
    const int64_t h = cfg_.hidden, d = cfg_.head_dim, mlp = cfg_.mlp_hidden;
    auto scale = [&](const std::string &n) { return declare_f32(n, {d}); };
    temb_dim_ = w.get("time_in.in_layer.weight").ne[0];
    if (temb_dim_ < 2 || temb_dim_ % 2)
        fail_value("time_in takes %lld features; a sinusoidal embedding needs an even width", (long long)temb_dim_);
    L.img_in = declare_linear("img_in", cfg_.in_channels, h);
    L.txt_in = declare_linear("txt_in", cfg_.context_dim, h);
    L.time_in = {declare_linear("time_in.in_layer", temb_dim_, h), declare_linear("time_in.out_layer", h, h)};
    if (cfg_.guidance)
        L.guidance_in = {declare_linear("guidance_in.in_layer", temb_dim_, h),
                         declare_linear("guidance_in.out_layer", h, h)};
    L.vector_in = {declare_linear("vector_in.in_layer", cfg_.vec_dim, h), declare_linear("vector_in.out_layer", h, h)};
    for (int64_t i = 0; i < cfg_.depth; ++i) {
        const std::string p = "double_blocks." + std::to_string(i) + ".";
        DoubleBlock B;
        for (int s = 0; s < 2; ++s) {
            const std::string q = p + (s == 0 ? "img" : "txt");
            Stream &S = s == 0 ? B.img : B.txt;
            S.mod = declare_linear(q + "_mod.lin", h, 6 * h);
            S.qkv = declare_linear(q + "_attn.qkv", h, 3 * h);
            S.q_norm = scale(q + "_attn.norm.query_norm.scale");
            S.k_norm = scale(q + "_attn.norm.key_norm.scale");
            S.proj = declare_linear(q + "_attn.proj", h, h);
            S.mlp0 = declare_linear(q + "_mlp.0", h, mlp);
            S.mlp2 = declare_linear(q + "_mlp.2", mlp, h);
        }
        L.doubles.push_back(B);
    }
    for (int64_t i = 0; i < cfg_.depth_single; ++i) {
        const std::string p = "single_blocks." + std::to_string(i) + ".";
        SingleBlock B;
        B.mod = declare_linear(p + "modulation.lin", h, 3 * h);
        B.lin1 = declare_linear(p + "linear1", h, 3 * h + mlp);
        B.lin2 = declare_linear(p + "linear2", h + mlp, h);
        B.q_norm = scale(p + "norm.query_norm.scale");
        B.k_norm = scale(p + "norm.key_norm.scale");
        L.singles.push_back(B);
    }
    L.final_mod = declare_linear("final_layer.adaLN_modulation.1", h, 2 * h);
    L.final_lin = declare_linear("final_layer.linear", h, cfg_.in_channels);
}

FluxNet::~FluxNet() = default;

ggml_cgraph *FluxNet::build(ggml_context *ctx, int64_t l_img, int64_t l_txt, bool exact, bool flash,
                            bool kv_f32) const {
    const Layers &P = *layers_;
    const FluxConfig &c = cfg_;
    Ops o{ctx, backend_};
    o.exact = exact;
    o.flash_attn = flash;
    o.flash_kv_f32 = kv_f32;
    const int64_t h = c.hidden, d = c.head_dim, mlp = c.mlp_hidden;
    const int64_t L = l_txt + l_img;
    const float attn_scale = 1.0f / std::sqrt(float(d));

    ggml_tensor *x_img = input(ctx, "img", GGML_TYPE_F32, c.in_channels, l_img);
    ggml_tensor *x_txt = input(ctx, "txt", GGML_TYPE_F32, c.context_dim, l_txt);
    ggml_tensor *t_emb = input(ctx, "t_emb", GGML_TYPE_F32, temb_dim_);
    ggml_tensor *g_emb = c.guidance ? input(ctx, "g_emb", GGML_TYPE_F32, temb_dim_) : nullptr;
    ggml_tensor *pooled = input(ctx, "pooled", GGML_TYPE_F32, c.vec_dim);
    ggml_tensor *pos_row = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, L);
    ggml_set_name(pos_row, "pos_row");
    ggml_set_input(pos_row);
    ggml_tensor *pos_col = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, L);
    ggml_set_name(pos_col, "pos_col");
    ggml_set_input(pos_col);
    ggml_tensor *ff_row = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, d / 2);
    ggml_set_name(ff_row, "ff_row");
    ggml_set_input(ff_row);
    ggml_tensor *ff_col = ggml_new_tensor_1d(ctx, GGML_TYPE_F32, d / 2);
    ggml_set_name(ff_col, "ff_col");
    ggml_set_input(ff_col);

    auto mlp_embed = [&](const Mlp2 &m, ggml_tensor *v) { return linear(o, ggml_silu(ctx, linear(o, v, m.in)), m.out); };
    // vec = (time + guidance) + text, as diffusers adds them.
    ggml_tensor *vec = mlp_embed(P.time_in, t_emb);
    if (g_emb) vec = ggml_add(ctx, vec, mlp_embed(P.guidance_in, g_emb));
    vec = ggml_add(ctx, vec, mlp_embed(P.vector_in, pooled));
    // SiLU(vec) feeds every modulation; each block's modulation vector is one mat-vec per step.
    ggml_tensor *svec = ggml_silu(ctx, vec);

    ggml_tensor *img = linear(o, x_img, P.img_in);  // [h, L_img]
    ggml_tensor *txt = linear(o, x_txt, P.txt_in);  // [h, L_txt]

    for (const DoubleBlock &B : P.doubles) {
        ggml_tensor *mi = linear(o, svec, B.img.mod);  // [6h]
        ggml_tensor *mt = linear(o, svec, B.txt.mod);
        ggml_tensor *qkv_i = linear(o, modulate(o, img, chunk(ctx, mi, h, 0), chunk(ctx, mi, h, 1)), B.img.qkv);  // [3h, L_img]
        ggml_tensor *qkv_t = linear(o, modulate(o, txt, chunk(ctx, mt, h, 0), chunk(ctx, mt, h, 1)), B.txt.qkv);
        ggml_tensor *q = ggml_concat(ctx, qk_norm(o, heads_view(ctx, c, qkv_t, 0), B.txt.q_norm),
                                     qk_norm(o, heads_view(ctx, c, qkv_i, 0), B.img.q_norm), 2);
        ggml_tensor *k = ggml_concat(ctx, qk_norm(o, heads_view(ctx, c, qkv_t, 1), B.txt.k_norm),
                                     qk_norm(o, heads_view(ctx, c, qkv_i, 1), B.img.k_norm), 2);
        ggml_tensor *v = ggml_concat(ctx, heads_view(ctx, c, qkv_t, 2), heads_view(ctx, c, qkv_i, 2), 2);
        q = rope(ctx, q, pos_row, pos_col, ff_row, ff_col);
        k = rope(ctx, k, pos_row, pos_col, ff_row, ff_col);
        ggml_tensor *a = attention(o, q, k, v, nullptr, attn_scale);  // [h, L]
        ggml_tensor *a_txt = ggml_view_2d(ctx, a, h, l_txt, a->nb[1], 0);
        ggml_tensor *a_img = ggml_view_2d(ctx, a, h, l_img, a->nb[1], size_t(l_txt) * a->nb[1]);

        auto finish = [&](ggml_tensor *x, ggml_tensor *attn, const Stream &S, ggml_tensor *m) {
            x = ggml_add(ctx, x, ggml_mul(ctx, linear(o, attn, S.proj), chunk(ctx, m, h, 2)));
            ggml_tensor *u = modulate(o, x, chunk(ctx, m, h, 3), chunk(ctx, m, h, 4));
            u = linear(o, gelu_tanh(o, linear(o, u, S.mlp0)), S.mlp2);
            return ggml_add(ctx, x, ggml_mul(ctx, u, chunk(ctx, m, h, 5)));
        };
        img = finish(img, a_img, B.img, mi);
        txt = finish(txt, a_txt, B.txt, mt);
        mark_segment_end(img);  // streaming segments end with each stream of a block
        mark_segment_end(txt);
    }

    ggml_tensor *x = ggml_concat(ctx, txt, img, 1);  // [h, L], text first
    for (const SingleBlock &B : P.singles) {
        ggml_tensor *m = linear(o, svec, B.mod);  // [3h]
        ggml_tensor *z = linear(o, modulate(o, x, chunk(ctx, m, h, 0), chunk(ctx, m, h, 1)), B.lin1);  // [3h + mlp, L]
        ggml_tensor *q = rope(ctx, qk_norm(o, heads_view(ctx, c, z, 0), B.q_norm), pos_row, pos_col, ff_row, ff_col);
        ggml_tensor *k = rope(ctx, qk_norm(o, heads_view(ctx, c, z, 1), B.k_norm), pos_row, pos_col, ff_row, ff_col);
        ggml_tensor *v = heads_view(ctx, c, z, 2);
        ggml_tensor *a = attention(o, q, k, v, nullptr, attn_scale);  // [h, L]
        ggml_tensor *mz = ggml_view_2d(ctx, z, mlp, L, z->nb[1], size_t(3 * h) * ggml_element_size(z));
        ggml_tensor *y = linear(o, concat_gelu_tanh(o, a, mz), B.lin2);
        x = ggml_add(ctx, x, ggml_mul(ctx, y, chunk(ctx, m, h, 2)));
        mark_segment_end(x);
    }

    ggml_tensor *xi = ggml_view_2d(ctx, x, h, l_img, x->nb[1], size_t(l_txt) * x->nb[1]);
    ggml_tensor *fm_ = linear(o, svec, P.final_mod);  // [2h]: shift, scale (BFL order)
    ggml_tensor *out = linear(o, modulate(o, xi, chunk(ctx, fm_, h, 0), chunk(ctx, fm_, h, 1)), P.final_lin);  // [in_channels, L_img]
    ggml_set_name(out, "out");
    ggml_set_output(out);
    ggml_cgraph *g = ggml_new_graph_custom(ctx, graph_nodes(), false);
    ggml_build_forward_expand(g, out);
    return g;
}

std::vector<float> FluxNet::forward(const float *latent, int64_t h, int64_t w, float sigma, float guidance,
                                    const float *txt, int64_t n_txt, const float *pooled, const CancelToken *cancel) {
    const FluxConfig &c = cfg_;
    if (h < 1 || w < 1 || h > kMaxLatentSide || w > kMaxLatentSide)
        fail_value("latent is %lld x %lld; each side must be between 1 and %lld (8 to %lld pixels)", (long long)h,
                   (long long)w, (long long)kMaxLatentSide, (long long)(8 * kMaxLatentSide));
    if (n_txt < 1 || n_txt > kMaxText)
        fail_value("the T5 states have %lld tokens; between 1 and %lld are supported", (long long)n_txt,
                   (long long)kMaxText);
    if (!latent || !txt || !pooled) fail_value("the Flux inputs must not be empty");
    if (!std::isfinite(sigma) || !std::isfinite(guidance))
        fail_value("sigma (%g) and guidance (%g) must be finite numbers", double(sigma), double(guidance));

    load();
    const int64_t C = c.in_channels / 4;
    const int64_t hp = (h + 1) / 2, wp = (w + 1) / 2;  // patch grid (odd sides are zero-padded)
    const int64_t l_img = hp * wp, L = n_txt + l_img;
    // Attention: on the CPU, flash attention with F32 K/V (exact, and faster there than F16 K/V,
    // whose dot products ggml's CPU kernels compute slowly); elsewhere F16 K/V, or the explicit
    // F32 softmax for the exact path. The switch (set_flash_attn) selects the explicit path.
    const bool exact = params_.all_f32();
    const bool kv_f32 = backend_.is_cpu();
    const bool flash = options_.flash_attn && (!exact || kv_f32);

    const std::string key = strfmt("%lldx%lld/%lld/%d%d%d", (long long)hp, (long long)wp, (long long)n_txt,
                                   int(exact), int(flash), int(kv_f32));
    runner_.prepare(key, [&](ggml_context *ctx) { return build(ctx, l_img, n_txt, exact, flash, kv_f32); });

    // Patchify: token r·wp + cc holds latent[ch, 2r+dy, 2cc+dx] at feature ch·4 + dy·2 + dx.
    std::vector<float> tokens(size_t(l_img * c.in_channels), 0.0f);
    for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < h; ++y)
            for (int64_t x = 0; x < w; ++x) {
                const int64_t tok = (y / 2) * wp + x / 2, f = ch * 4 + (y % 2) * 2 + (x % 2);
                tokens[size_t(tok * c.in_channels + f)] = latent[(ch * h + y) * w + x];
            }
    runner_.set_input_f32("img", tokens);
    runner_.set_input("txt", txt, size_t(n_txt * c.context_dim) * sizeof(float));
    runner_.set_input("pooled", pooled, size_t(c.vec_dim) * sizeof(float));
    std::vector<float> emb(static_cast<size_t>(temb_dim_));
    timestep_embedding(sigma * 1000.0f, temb_dim_, emb.data());
    runner_.set_input_f32("t_emb", emb);
    if (c.guidance) {
        timestep_embedding(guidance * 1000.0f, temb_dim_, emb.data());
        runner_.set_input_f32("g_emb", emb);
    }

    // RoPE: text ids (0,0,0), image ids (0, row, col); text first.
    std::vector<int32_t> pos_row(size_t(L), 0), pos_col(size_t(L), 0);
    for (int64_t t = 0; t < l_img; ++t) {
        pos_row[size_t(n_txt + t)] = int32_t(t / wp);
        pos_col[size_t(n_txt + t)] = int32_t(t % wp);
    }
    runner_.set_input_i32("pos_row", pos_row);
    runner_.set_input_i32("pos_col", pos_col);
    // Frequency factors: ggml's rope turns pair i at position p into angle p·s^i / ff[i], with
    // s = θ^(−2/d) rounded to float (ggml multiplies by s once per pair; using the same float s
    // here cancels its rounding, which would otherwise grow with i); the axis-k frequency of pair
    // j (local index in the axis) is θ^(−2j/dim_k).
    const int64_t d = c.head_dim;
    const float s_ggml = std::pow(float(kRopeTheta), -2.0f / float(d));
    std::vector<float> ff_row(size_t(d / 2), INFINITY), ff_col(size_t(d / 2), INFINITY);
    int64_t pair = kAxes[0] / 2;
    for (int axis = 1; axis < 3; ++axis) {
        std::vector<float> &ff = axis == 1 ? ff_row : ff_col;
        for (int j = 0; j < kAxes[axis] / 2; ++j, ++pair) {
            const double ggml_freq = std::pow(double(s_ggml), double(pair));
            const double want = std::pow(kRopeTheta, -2.0 * double(j) / double(kAxes[axis]));
            ff[size_t(pair)] = float(ggml_freq / want);
        }
    }
    runner_.set_input_f32("ff_row", ff_row);
    runner_.set_input_f32("ff_col", ff_col);

    runner_.compute(cancel);
    const std::vector<float> res = runner_.get_output("out");  // [in_channels, L_img]

    // Unpatchify and crop the padding.
    std::vector<float> out(size_t(C * h * w));
    for (int64_t ch = 0; ch < C; ++ch)
        for (int64_t y = 0; y < h; ++y)
            for (int64_t x = 0; x < w; ++x) {
                const int64_t tok = (y / 2) * wp + x / 2, f = ch * 4 + (y % 2) * 2 + (x % 2);
                out[size_t((ch * h + y) * w + x)] = res[size_t(tok * c.in_channels + f)];
            }
    return out;
}

}  // namespace fm
