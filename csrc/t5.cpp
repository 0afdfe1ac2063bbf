// T5 v1.1 encoder (docs/MODEL.md §7.1), the equal of transformers' T5EncoderModel.last_hidden_state
// without an attention mask:
//   x = shared[ids]
//   each block: x += o(attn(RMS(x))), scores = Q·Kᵀ (no 1/sqrt(d)) + bias[h, i, j];
//               x += wo(gelu_tanh(wi_0(RMS(x))) · wi_1(RMS(x)))
//   out = RMS_final(x)
// The position bias comes from block 0's table and is shared by every block. Activations stay
// F32 end to end (T5-XXL overflows F16); the attention uses the explicit softmax path so the
// bias is added in F32.
#include "t5.h"

#include "common.h"
#include "layers.h"

#include <cmath>
#include <string>

namespace fm {

T5Config T5Config::infer(const ComponentWeights &w) {
    T5Config c;
    const TensorRef &shared = w.get("shared.weight");
    c.d_model = shared.ne[0];
    c.vocab = shared.ne[1];
    c.layers = w.count_indexed("encoder.block.");
    if (c.layers == 0) fail_value("the T5 weights have no encoder blocks");
    const TensorRef &rel = w.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight");
    c.heads = rel.ne[0];
    c.buckets = rel.ne[1];
    const int64_t inner = w.get("encoder.block.0.layer.0.SelfAttention.q.weight").ne[1];
    if (c.heads <= 0 || inner % c.heads != 0)
        fail_value("T5 attention width %lld is not a multiple of the %lld heads", (long long)inner, (long long)c.heads);
    c.d_kv = inner / c.heads;
    c.d_ff = w.get("encoder.block.0.layer.1.DenseReluDense.wi_0.weight").ne[1];
    if (c.buckets < 4 || c.buckets % 2 != 0)
        fail_value("the T5 relative-position table has %lld buckets; an even number of at least 4 is needed",
                   (long long)c.buckets);
    return c;
}

std::vector<std::pair<std::string, int64_t>> T5Config::items() const {
    return {{"vocab", vocab}, {"d_model", d_model}, {"heads", heads}, {"d_kv", d_kv},
            {"d_ff", d_ff},   {"layers", layers},   {"buckets", buckets}};
}

namespace {
constexpr float kT5Eps = 1e-6f;          // layer_norm_epsilon
constexpr int kT5MaxDistance = 128;      // relative_attention_max_distance (T5 v1.1, all sizes)
constexpr int64_t kT5MaxTokens = 2048;   // explicit attention holds [L, L, heads] F32 twice

// transformers' T5Attention._relative_position_bucket (bidirectional) for rel = key − query,
// in float32 as torch computes it (the truncation of the log term must agree exactly).
int32_t relative_bucket(int64_t rel, int64_t num_buckets, int max_distance) {
    const int64_t half = num_buckets / 2;
    int64_t bucket = rel > 0 ? half : 0;
    const int64_t n = rel < 0 ? -rel : rel;
    const int64_t max_exact = half / 2;
    if (n < max_exact) return int32_t(bucket + n);
    const float ratio = float(n) / float(max_exact);
    const float span = float(std::log(double(max_distance) / double(max_exact)));
    int64_t large = max_exact + int64_t(std::log(ratio) / span * float(half - max_exact));
    if (large > half - 1) large = half - 1;
    return int32_t(bucket + large);
}

struct T5Block {
    ggml_tensor *ln0 = nullptr, *ln1 = nullptr;  // RMSNorm weights
    Linear q, k, v, o, wi0, wi1, wo;
};
}  // namespace

struct T5Net::Layers {
    ggml_tensor *shared = nullptr, *rel_bias = nullptr, *final_ln = nullptr;
    std::vector<T5Block> blocks;
};

T5Net::T5Net(Backend &b, const ComponentWeights &w, const EngineOptions &options)
    : Network(b, w, options), cfg_(T5Config::infer(w)), layers_(new Layers) {
    Layers &P = *layers_;
    const int64_t dm = cfg_.d_model, inner = cfg_.heads * cfg_.d_kv, ff = cfg_.d_ff;
    P.shared = params_.declare("shared.weight", ParamKind::Embedding, {dm, cfg_.vocab});
    // Small table read per (query, key) pair; stored quantized in gpustack's Q files.
    P.rel_bias = declare_f32("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                             {cfg_.heads, cfg_.buckets});
    for (int64_t i = 0; i < cfg_.layers; ++i) {
        const std::string p = "encoder.block." + std::to_string(i) + ".layer.";
        auto mat = [&](const std::string &n, int64_t in, int64_t out) { return declare_linear(p + n, in, out, false); };
        T5Block B;
        B.ln0 = declare_f32(p + "0.layer_norm.weight", {dm});
        B.q = mat("0.SelfAttention.q", dm, inner);
        B.k = mat("0.SelfAttention.k", dm, inner);
        B.v = mat("0.SelfAttention.v", dm, inner);
        B.o = mat("0.SelfAttention.o", inner, dm);
        B.ln1 = declare_f32(p + "1.layer_norm.weight", {dm});
        B.wi0 = mat("1.DenseReluDense.wi_0", dm, ff);
        B.wi1 = mat("1.DenseReluDense.wi_1", dm, ff);
        B.wo = mat("1.DenseReluDense.wo", ff, dm);
        P.blocks.push_back(B);
    }
    P.final_ln = declare_f32("encoder.final_layer_norm.weight", {dm});
}

T5Net::~T5Net() = default;

// Graph for n tokens: ids [n], buckets [n·n] -> last hidden state [d_model, n] ("hidden").
ggml_cgraph *T5Net::build(ggml_context *ctx, int64_t n, bool sdcpp) const {
    const Layers &P = *layers_;
    Ops o = ops(ctx);
    o.flash_attn = false;  // the bias must be added in F32 (flash attention takes an F16 mask)
    o.f32_matmul = true;   // T5-XXL activations exceed the F16 range
    // stable-diffusion.cpp's T5 (compat="sd.cpp", docs/MODEL.md §4.7): ggml's F16 activation scales,
    // and wo's input scaled by 1/32 and its output by 32 (t5.hpp T5DenseGatedActDense), which makes
    // the F16 scale of small blocks subnormal. The random full-size T5 amplifies either difference.
    o.f16_act_scales = sdcpp;
    o.ggml_gelu = sdcpp;  // and ggml's F16-table GELU
    const float wo_in = sdcpp ? 1.0f / 32.0f : 1.0f;
    const int64_t heads = cfg_.heads, dkv = cfg_.d_kv;
    ggml_tensor *ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n);
    ggml_set_name(ids, "ids");
    ggml_set_input(ids);
    ggml_tensor *bidx = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n * n);
    ggml_set_name(bidx, "buckets");
    ggml_set_input(bidx);

    // bias [Lk, Lq, H]: rows of the table [H, buckets] picked per (query, key).
    ggml_tensor *bias = ggml_get_rows(ctx, P.rel_bias, bidx);          // [H, n·n], key fastest
    bias = ggml_reshape_3d(ctx, bias, heads, n, n);                    // [H, Lk, Lq]
    bias = ggml_cont(ctx, ggml_permute(ctx, bias, 2, 0, 1, 3));        // [Lk, Lq, H]

    ggml_tensor *x = ggml_get_rows(ctx, P.shared, ids);  // [d_model, n]
    for (const T5Block &B : P.blocks) {
        ggml_tensor *y = rms_norm(o, x, B.ln0, kT5Eps);
        ggml_tensor *q = ggml_reshape_3d(ctx, linear(o, y, B.q), dkv, heads, n);
        ggml_tensor *k = ggml_reshape_3d(ctx, linear(o, y, B.k), dkv, heads, n);
        ggml_tensor *v = ggml_reshape_3d(ctx, linear(o, y, B.v), dkv, heads, n);
        x = ggml_add(ctx, x, linear(o, attention(o, q, k, v, bias, 1.0f), B.o));
        y = rms_norm(o, x, B.ln1, kT5Eps);
        ggml_tensor *g = gelu_tanh(o, linear(o, y, B.wi0));
        ggml_tensor *u = linear(o, y, B.wi1);
        ggml_tensor *h = ggml_mul(ctx, g, u);
        if (wo_in != 1.0f) h = ggml_scale(ctx, h, wo_in);
        ggml_tensor *ff = linear(o, h, B.wo);
        if (wo_in != 1.0f) ff = ggml_scale(ctx, ff, 1.0f / wo_in);
        x = ggml_add(ctx, x, ff);
        mark_segment_end(x);  // one streaming segment per block
    }
    x = rms_norm(o, x, P.final_ln, kT5Eps);
    ggml_set_name(x, "hidden");
    ggml_set_output(x);
    ggml_cgraph *g = ggml_new_graph_custom(ctx, graph_nodes(), false);
    ggml_build_forward_expand(g, x);
    return g;
}

const std::vector<int32_t> &T5Net::bucket_indices(int64_t n) {
    if (buckets_len_ != n) {
        buckets_.resize(size_t(n * n));
        for (int64_t i = 0; i < n; ++i)      // query
            for (int64_t j = 0; j < n; ++j)  // key
                buckets_[size_t(i * n + j)] = relative_bucket(j - i, cfg_.buckets, kT5MaxDistance);
        buckets_len_ = n;
    }
    return buckets_;
}

std::vector<float> T5Net::encode(const int32_t *ids, int64_t n, const CancelToken *cancel, bool sdcpp) {
    const T5Config &c = cfg_;
    if (n <= 0) fail_value("T5 needs at least one token id (tokenize_t5 gives them), got none");
    if (n > kT5MaxTokens)
        fail_value("T5 input has %lld token ids; at most %lld are encoded at once (Flux uses 256 or 512)",
                   (long long)n, (long long)kT5MaxTokens);
    for (int64_t i = 0; i < n; ++i)
        if (ids[i] < 0 || ids[i] >= c.vocab)
            fail_value("T5 token id %lld at position %lld is outside the vocabulary [0, %lld)", (long long)ids[i],
                       (long long)i, (long long)c.vocab);
    load();
    runner_.prepare("t5-" + std::to_string(n) + (sdcpp ? "-sdcpp" : ""),
                    [&](ggml_context *ctx) { return build(ctx, n, sdcpp); });
    runner_.set_input("ids", ids, size_t(n) * sizeof(int32_t));
    runner_.set_input_i32("buckets", bucket_indices(n));
    runner_.compute(cancel);
    std::vector<float> out = runner_.get_output("hidden");
    if (policy_.release_compute) runner_.release();  // T5 runs once per prompt
    for (float v : out)
        if (!std::isfinite(v))
            fail_runtime("the T5 encoder produced non-finite values (an activation outside the F16 range with F16 "
                         "weights?); use a Q8_0 or F32 T5 file");
    return out;
}

}  // namespace fm
