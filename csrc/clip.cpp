// CLIP-L text model (MODEL.md §6.1), the equal of transformers' CLIPTextModel.pooler_output:
//   x = token_embedding[ids] + position_embedding
//   each layer (pre-LN): x += out_proj(attn(LN1(x))) with a causal mask, scale 1/sqrt(64);
//                        x += fc2(quick_gelu(fc1(LN2(x))))
//   pooled = final_layer_norm(x)[p], p = the FIRST position of the largest id.
// The pooled position follows transformers' legacy path, which CLIP-L's config selects
// (openai/clip-vit-large-patch14: eos_token_id 2, so CLIPTextModel takes argmax(input_ids) and
// torch.argmax returns the first of equal maxima). With the tokenizer's ids (EOS 49407 = the
// largest id, also the padding) this is the first EOS, as in sd.cpp's FluxCLIPEmbedder.
#include "clip.h"

#include "common.h"
#include "layers.h"
#include "params.h"

#include <cmath>
#include <limits>

namespace fm {

ClipConfig ClipConfig::infer(const ComponentWeights &w) {
    ClipConfig c;
    const TensorRef &tok = w.get("text_model.embeddings.token_embedding.weight");
    c.hidden = tok.ne[0];
    c.vocab = tok.ne[1];
    c.positions = w.get("text_model.embeddings.position_embedding.weight").ne[1];
    c.layers = w.count_indexed("text_model.encoder.layers.");
    if (c.layers == 0) fail_value("the CLIP-L weights have no encoder layers");
    c.mlp = w.get("text_model.encoder.layers.0.mlp.fc1.weight").ne[1];
    if (c.hidden % 64 != 0) fail_value("CLIP hidden size %lld is not a multiple of the head size 64", (long long)c.hidden);
    c.heads = c.hidden / 64;
    if (c.vocab <= 0 || c.positions <= 0) fail_value("the CLIP-L embedding tables are empty");
    return c;
}

std::vector<std::pair<std::string, int64_t>> ClipConfig::items() const {
    return {{"vocab", vocab}, {"positions", positions}, {"hidden", hidden},
            {"heads", heads}, {"layers", layers},       {"mlp", mlp}};
}

namespace {
constexpr float kClipEps = 1e-5f;  // layer_norm_eps of CLIP-L

struct ClipLayer {
    ggml_tensor *ln1_w, *ln1_b, *q_w, *q_b, *k_w, *k_b, *v_w, *v_b, *o_w, *o_b;
    ggml_tensor *ln2_w, *ln2_b, *fc1_w, *fc1_b, *fc2_w, *fc2_b;
};
}  // namespace

struct ClipNet::Impl {
    Backend &backend;
    ClipConfig cfg;
    ParamStore params;
    GraphRunner runner;
    ggml_tensor *tok_emb = nullptr, *pos_emb = nullptr, *final_w = nullptr, *final_b = nullptr;
    std::vector<ClipLayer> layers;

    Impl(Backend &b, const ComponentWeights &w) : backend(b), cfg(ClipConfig::infer(w)), params(b, w), runner(b) {
        const int64_t h = cfg.hidden, m = cfg.mlp;
        const std::string p = "text_model.";
        tok_emb = params.declare(p + "embeddings.token_embedding.weight", ParamKind::Embedding, {h, cfg.vocab});
        pos_emb = params.declare(p + "embeddings.position_embedding.weight", ParamKind::F32, {h, cfg.positions});
        for (int64_t i = 0; i < cfg.layers; ++i) {
            const std::string q = p + "encoder.layers." + std::to_string(i) + ".";
            auto mat = [&](const std::string &n, int64_t in, int64_t out) {
                return params.declare(q + n + ".weight", ParamKind::Matmul, {in, out});
            };
            auto vec = [&](const std::string &n, int64_t len) { return params.declare(q + n, ParamKind::F32, {len}); };
            ClipLayer L;
            L.ln1_w = vec("layer_norm1.weight", h);
            L.ln1_b = vec("layer_norm1.bias", h);
            L.q_w = mat("self_attn.q_proj", h, h);
            L.q_b = vec("self_attn.q_proj.bias", h);
            L.k_w = mat("self_attn.k_proj", h, h);
            L.k_b = vec("self_attn.k_proj.bias", h);
            L.v_w = mat("self_attn.v_proj", h, h);
            L.v_b = vec("self_attn.v_proj.bias", h);
            L.o_w = mat("self_attn.out_proj", h, h);
            L.o_b = vec("self_attn.out_proj.bias", h);
            L.ln2_w = vec("layer_norm2.weight", h);
            L.ln2_b = vec("layer_norm2.bias", h);
            L.fc1_w = mat("mlp.fc1", h, m);
            L.fc1_b = vec("mlp.fc1.bias", m);
            L.fc2_w = mat("mlp.fc2", m, h);
            L.fc2_b = vec("mlp.fc2.bias", h);
            layers.push_back(L);
        }
        final_w = params.declare(p + "final_layer_norm.weight", ParamKind::F32, {h});
        final_b = params.declare(p + "final_layer_norm.bias", ParamKind::F32, {h});
    }

    // Graph: ids [positions] -> final-LN hidden states [hidden, positions] ("hidden").
    ggml_cgraph *build(ggml_context *ctx) {
        Ops o{ctx, backend};
        o.exact = params.all_f32();
        // 77 tokens: the explicit softmax path is cheap and keeps K/V and the mask in F32.
        o.flash_attn = false;
        const int64_t n = cfg.positions, d = 64, heads = cfg.heads;
        ggml_tensor *ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
        ggml_set_name(ids, "ids");
        ggml_set_input(ids);
        ggml_tensor *mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);  // [Lk, Lq], causal
        ggml_set_name(mask, "mask");
        ggml_set_input(mask);

        ggml_tensor *x = ggml_add(ctx, ggml_get_rows(ctx, tok_emb, ids), pos_emb);  // [h, n]
        const float scale = 1.0f / std::sqrt(float(d));
        for (const ClipLayer &L : layers) {
            ggml_tensor *y = layer_norm(o, x, L.ln1_w, L.ln1_b, kClipEps);
            ggml_tensor *q = ggml_reshape_3d(ctx, linear(o, y, L.q_w, L.q_b), d, heads, n);
            ggml_tensor *k = ggml_reshape_3d(ctx, linear(o, y, L.k_w, L.k_b), d, heads, n);
            ggml_tensor *v = ggml_reshape_3d(ctx, linear(o, y, L.v_w, L.v_b), d, heads, n);
            ggml_tensor *a = attention(o, q, k, v, mask, scale);
            x = ggml_add(ctx, x, linear(o, a, L.o_w, L.o_b));
            y = layer_norm(o, x, L.ln2_w, L.ln2_b, kClipEps);
            y = linear(o, quick_gelu(o, linear(o, y, L.fc1_w, L.fc1_b)), L.fc2_w, L.fc2_b);
            x = ggml_add(ctx, x, y);
        }
        x = layer_norm(o, x, final_w, final_b, kClipEps);
        ggml_set_name(x, "hidden");
        ggml_set_output(x);
        ggml_cgraph *g = ggml_new_graph_custom(ctx, 8192, false);
        ggml_build_forward_expand(g, x);
        return g;
    }
};

ClipNet::ClipNet(Backend &backend, const ComponentWeights &weights) : impl_(new Impl(backend, weights)) {}
ClipNet::~ClipNet() = default;
const ClipConfig &ClipNet::config() const { return impl_->cfg; }
void ClipNet::load() { impl_->params.materialize(); }
void ClipNet::release() {
    impl_->runner.release();
    impl_->params.release();
}
bool ClipNet::loaded() const { return impl_->params.bytes() > 0; }
size_t ClipNet::weight_bytes() const { return impl_->params.bytes(); }

std::vector<float> ClipNet::encode(const int32_t *ids, int64_t n) {
    Impl &m = *impl_;
    const ClipConfig &c = m.cfg;
    if (n != c.positions)
        fail_value("CLIP-L takes exactly %lld token ids (BOS, text, EOS, padded with EOS; use tokenize_clip), got %lld",
                   (long long)c.positions, (long long)n);
    int64_t pooled = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (ids[i] < 0 || ids[i] >= c.vocab)
            fail_value("CLIP-L token id %lld at position %lld is outside the vocabulary [0, %lld)", (long long)ids[i],
                       (long long)i, (long long)c.vocab);
        if (ids[i] > ids[pooled]) pooled = i;  // first position of the largest id
    }
    load();
    std::vector<float> mask(size_t(n * n), 0.0f);
    for (int64_t q = 0; q < n; ++q)
        for (int64_t k = q + 1; k < n; ++k) mask[size_t(q * n + k)] = -std::numeric_limits<float>::infinity();
    m.runner.prepare("clip", [&](ggml_context *ctx) { return m.build(ctx); });
    m.runner.set_input("ids", ids, size_t(n) * sizeof(int32_t));
    m.runner.set_input_f32("mask", mask);
    m.runner.compute();
    std::vector<float> hidden = m.runner.get_output("hidden");
    const int64_t h = c.hidden;
    std::vector<float> out(hidden.begin() + pooled * h, hidden.begin() + (pooled + 1) * h);
    for (float v : out)
        if (!std::isfinite(v)) fail_runtime("the CLIP-L text model produced non-finite values; the weights are damaged");
    return out;
}

}  // namespace fm
