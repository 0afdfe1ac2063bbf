// CLIP-L text model (docs/MODEL.md §6.1), the equal of transformers' CLIPTextModel.pooler_output:
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
    Norm ln1, ln2;
    Linear q, k, v, o, fc1, fc2;
};
}  // namespace

struct ClipNet::Layers {
    ggml_tensor *tok_emb = nullptr, *pos_emb = nullptr;
    Norm final_norm;
    std::vector<ClipLayer> layers;
};

ClipNet::ClipNet(Backend &b, const ComponentWeights &w, const EngineOptions &options)
    : Network(b, w, options), cfg_(ClipConfig::infer(w)), layers_(new Layers) {
    Layers &P = *layers_;
    const int64_t h = cfg_.hidden, m = cfg_.mlp;
    const std::string p = "text_model.";
    P.tok_emb = params_.declare(p + "embeddings.token_embedding.weight", ParamKind::Embedding, {h, cfg_.vocab});
    P.pos_emb = declare_f32(p + "embeddings.position_embedding.weight", {h, cfg_.positions});
    for (int64_t i = 0; i < cfg_.layers; ++i) {
        const std::string q = p + "encoder.layers." + std::to_string(i) + ".";
        ClipLayer L;
        L.ln1 = declare_norm(q + "layer_norm1", h);
        L.q = declare_linear(q + "self_attn.q_proj", h, h);
        L.k = declare_linear(q + "self_attn.k_proj", h, h);
        L.v = declare_linear(q + "self_attn.v_proj", h, h);
        L.o = declare_linear(q + "self_attn.out_proj", h, h);
        L.ln2 = declare_norm(q + "layer_norm2", h);
        L.fc1 = declare_linear(q + "mlp.fc1", h, m);
        L.fc2 = declare_linear(q + "mlp.fc2", m, h);
        P.layers.push_back(L);
    }
    P.final_norm = declare_norm(p + "final_layer_norm", h);
}

ClipNet::~ClipNet() = default;

// Graph: ids [positions] -> final-LN hidden states [hidden, positions] ("hidden").
ggml_cgraph *ClipNet::build(ggml_context *ctx) const {
    const Layers &P = *layers_;
    Ops o = ops(ctx);
    // 77 tokens: the explicit softmax path is cheap and keeps K/V and the mask in F32.
    o.flash_attn = false;
    const int64_t n = cfg_.positions, d = 64, heads = cfg_.heads;
    ggml_tensor *ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_name(ids, "ids");
    ggml_set_input(ids);
    ggml_tensor *mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n, n);  // [Lk, Lq], causal
    ggml_set_name(mask, "mask");
    ggml_set_input(mask);

    ggml_tensor *x = ggml_add(ctx, ggml_get_rows(ctx, P.tok_emb, ids), P.pos_emb);  // [h, n]
    const float scale = 1.0f / std::sqrt(float(d));
    for (const ClipLayer &L : P.layers) {
        ggml_tensor *y = layer_norm(o, x, L.ln1, kClipEps);
        ggml_tensor *q = ggml_reshape_3d(ctx, linear(o, y, L.q), d, heads, n);
        ggml_tensor *k = ggml_reshape_3d(ctx, linear(o, y, L.k), d, heads, n);
        ggml_tensor *v = ggml_reshape_3d(ctx, linear(o, y, L.v), d, heads, n);
        ggml_tensor *a = attention(o, q, k, v, mask, scale);
        x = ggml_add(ctx, x, linear(o, a, L.o));
        y = layer_norm(o, x, L.ln2, kClipEps);
        y = linear(o, quick_gelu(o, linear(o, y, L.fc1)), L.fc2);
        x = ggml_add(ctx, x, y);
    }
    x = layer_norm(o, x, P.final_norm, kClipEps);
    ggml_set_name(x, "hidden");
    ggml_set_output(x);
    ggml_cgraph *g = ggml_new_graph_custom(ctx, graph_nodes(), false);
    ggml_build_forward_expand(g, x);
    return g;
}

std::vector<float> ClipNet::encode(const int32_t *ids, int64_t n, const CancelToken *cancel) {
    const ClipConfig &c = cfg_;
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
    runner_.prepare("clip", [&](ggml_context *ctx) { return build(ctx); });
    runner_.set_input("ids", ids, size_t(n) * sizeof(int32_t));
    runner_.set_input_f32("mask", mask);
    runner_.compute(cancel);
    std::vector<float> hidden = runner_.get_output("hidden");
    if (policy_.release_compute) runner_.release();  // CLIP runs once per prompt
    const int64_t h = c.hidden;
    std::vector<float> out(hidden.begin() + pooled * h, hidden.begin() + (pooled + 1) * h);
    for (float v : out)
        if (!std::isfinite(v)) fail_runtime("the CLIP-L text model produced non-finite values; the weights are damaged");
    return out;
}

}  // namespace fm
