// FLUX autoencoder (docs/MODEL.md §5): decoder and encoder graphs, and tiled decode/encode.
//
// Images are ggml tensors [W, H, C, 1], which is the memory order of a row-major [C, H, W]
// array, so numpy inputs and outputs are used as they are.
//
// Tiling: the latent (decode) or the image (encode) is cut into tiles of one size that overlap
// by at least `overlap` latent pixels: per axis the fewest tiles of at most `tile` pixels, shrunk
// to one common size and spaced evenly from the first border to the last (the last tile ends at
// the border), so every tile has the same shape and one graph serves all of them. Each tile's
// result is accumulated with a weight that ramps smoothly (smootherstep) across the overlap with
// each neighbour, and the sum is divided by the accumulated weight, so the weights of every
// output pixel sum to exactly 1 wherever the tiles fall. Only the output image and the weight
// sums are image-sized; the compute memory depends on the tile size.
//
// Memory: convolutions never hold a whole im2col matrix (9·Cin × H·W, 2.4 GB for one 256-channel
// conv at 512²): ours packs it panel by panel, ggml's runs in bands of output rows; the mid
// attention is evaluated in query chunks. The compute memory is a few activation maps (plus up
// to 64 MiB of patches on the ggml path).
#include "vae.h"

#include "common.h"
#include "cpu_conv.h"
#include "cpu_norm.h"
#include "layers.h"

#include <ggml-alloc.h>
#include <ggml-backend.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace fm {

VaeConfig VaeConfig::infer(const ComponentWeights &w) {
    VaeConfig c;
    const TensorRef &conv_in = w.get("decoder.conv_in.weight");  // ne [3, 3, z, top]
    c.z_channels = conv_in.ne[2];
    c.top_channels = conv_in.ne[3];
    const TensorRef &conv_out = w.get("decoder.conv_out.weight");  // ne [3, 3, ch, out]
    c.ch = conv_out.ne[2];
    c.out_channels = conv_out.ne[3];
    c.levels = w.count_indexed("decoder.up.");
    if (c.levels == 0 && w.has("decoder.up_blocks.0.resnets.0.conv1.weight"))
        fail_value("this VAE file uses diffusers' tensor names (decoder.up_blocks.*); use a file with the BFL / "
                   "CompVis names (encoder.down.*, decoder.up.*), such as BFL's ae.safetensors");
    if (c.levels == 0) fail_value("the VAE decoder has no up levels (no decoder.up.N.* tensors)");
    if (c.levels > 8) fail_value("the VAE decoder has %lld up levels; at most 8 are supported", (long long)c.levels);
    c.num_res_blocks = w.count_indexed("decoder.up.0.block.") - 1;
    if (c.num_res_blocks < 1) fail_value("the VAE decoder's up.0 level has no resnet blocks");
    // Channels per level from the first conv of each level's first resnet.
    for (int64_t i = 0; i < c.levels; ++i) {
        const std::string name = strfmt("decoder.up.%lld.block.0.conv1.weight", (long long)i);
        c.level_channels.push_back(w.get(name).ne[3]);
    }
    if (c.level_channels[0] != c.ch)
        fail_value("the VAE decoder's level 0 has %lld channels but conv_out reads %lld", (long long)c.level_channels[0],
                   (long long)c.ch);
    if (c.level_channels.back() != c.top_channels)
        fail_value("the VAE decoder's top level has %lld channels but conv_in makes %lld",
                   (long long)c.level_channels.back(), (long long)c.top_channels);
    c.has_encoder = w.has("encoder.conv_in.weight");
    c.in_channels = c.has_encoder ? w.get("encoder.conv_in.weight").ne[2] : 3;
    if (c.has_encoder) {
        const int64_t down = w.count_indexed("encoder.down.");
        if (down != c.levels)
            fail_value("the VAE encoder has %lld down levels but the decoder %lld up levels", (long long)down,
                       (long long)c.levels);
        const int64_t blocks = w.count_indexed("encoder.down.0.block.");
        if (blocks != c.num_res_blocks)
            fail_value("the VAE encoder has %lld resnets per level but the decoder %lld (+1)", (long long)blocks,
                       (long long)c.num_res_blocks);
    }
    for (int64_t ch : c.level_channels)
        if (ch % 32 != 0)
            fail_value("VAE channel count %lld is not a multiple of 32 (GroupNorm uses 32 groups)", (long long)ch);
    return c;
}

std::vector<std::pair<std::string, int64_t>> VaeConfig::items() const {
    std::vector<std::pair<std::string, int64_t>> out = {
        {"z_channels", z_channels}, {"base_channels", ch},          {"top_channels", top_channels},
        {"levels", levels},         {"res_blocks", num_res_blocks}, {"has_encoder", has_encoder ? 1 : 0}};
    return out;
}

namespace {

constexpr int kGroups = 32;
constexpr float kEps = 1e-6f;

struct ConvP {
    ggml_tensor *w = nullptr, *b = nullptr;
};
struct ResnetP {
    Norm norm1, norm2;
    ConvP conv1, conv2, skip;  // skip.w null when cin == cout
};
struct AttnP {
    Norm norm;
    ConvP q, k, v, proj;
};
struct LevelP {
    std::vector<ResnetP> blocks;
    ConvP resample;  // decoder: upsample conv (not level 0); encoder: downsample conv (not the top)
};
struct DecoderP {
    ConvP conv_in, conv_out;
    ResnetP mid1, mid2;
    AttnP attn;
    std::vector<LevelP> up;  // indexed by level (up[levels-1] runs first)
    Norm norm_out;
};
struct EncoderP {
    ConvP conv_in, conv_out;
    std::vector<LevelP> down;
    ResnetP mid1, mid2;
    AttnP attn;
    Norm norm_out;
};

// smootherstep on [0, 1]: u³(u(6u − 15) + 10); s(u) + s(1 − u) = 1.
double smootherstep(double u) {
    u = std::min(1.0, std::max(0.0, u));
    return u * u * u * (u * (u * 6.0 - 15.0) + 10.0);
}

// Tiles along one axis of n latent pixels, at most t wide and overlapping by at least o: the
// fewest tiles that can cover n, all of one size (shrunk below t so they cover n evenly), spaced
// evenly from 0 to n − size. A single tile of size n when n <= t.
struct AxisTiles {
    int64_t size = 0;
    std::vector<int64_t> starts;
};
AxisTiles axis_tiles(int64_t n, int64_t t, int64_t o) {
    if (n <= t) return {n, {0}};
    const int64_t count = (n - o + (t - o) - 1) / (t - o);          // ceil((n − o) / (t − o)) >= 2
    const int64_t size = (n + (count - 1) * o + count - 1) / count;  // ceil((n + (count − 1)·o) / count) <= t
    AxisTiles a{size, {}};
    for (int64_t k = 0; k < count; ++k)  // round(k·(n − size)/(count − 1)); steps <= size − o
        a.starts.push_back((2 * k * (n - size) + (count - 1)) / (2 * (count - 1)));
    return a;
}

// Blend weights of every tile along one axis, at output scale f: weights[k][i] for the i-th
// output pixel of tile k (size t·f). Ramps over the overlap with each neighbour.
std::vector<std::vector<float>> axis_weights(const std::vector<int64_t> &starts, int64_t t, int64_t f) {
    std::vector<std::vector<float>> out;
    const int64_t len = t * f;
    for (size_t k = 0; k < starts.size(); ++k) {
        std::vector<float> w(size_t(len), 1.0f);
        if (k > 0) {
            const int64_t ov = (starts[k - 1] + t - starts[k]) * f;  // overlap with the previous tile
            for (int64_t i = 0; i < std::min(ov, len); ++i) w[size_t(i)] *= float(smootherstep((i + 0.5) / double(ov)));
        }
        if (k + 1 < starts.size()) {
            const int64_t ov = (starts[k] + t - starts[k + 1]) * f;  // overlap with the next tile
            for (int64_t i = std::max<int64_t>(0, len - ov); i < len; ++i)
                w[size_t(i)] *= float(smootherstep((len - i - 0.5) / double(ov)));
        }
        out.push_back(std::move(w));
    }
    return out;
}

}  // namespace

// The VAE's own state and math; the parameter store, the graph runner and the options are the
// Network base's.
struct VaeNet::Impl {
    Backend &backend;
    const ComponentWeights &weights;
    const EngineOptions &options;
    const MemoryPolicy &policy;  // the network's, set by the model (vae_budget_bytes)
    VaeConfig cfg;
    ParamStore &params;
    GraphRunner &runner;
    DecoderP dec;
    EncoderP enc;
    // Convolution. On an AVX2 CPU: our own (cpu_conv.h; 2.5x ggml's im2col + F32 matmul in the
    // PyPI wheel, measured on the full VAE), F16 kernels widened to F32 exactly (ggml's F16 path
    // would round every activation to F16 too). Otherwise ggml's im2col + matmul in
    // bands of output rows, or ggml_conv_2d_direct. Both ggml forms bound memory; on one thread
    // they run at the same speed, but conv_2d_direct synchronises its threads twice per batch of
    // ~16 MiB of patches, hundreds of times per convolution, which costs up to 2x on a loaded
    // machine (measured here). EngineOptions::vae_conv (FLUXMINI_VAE_CONV=im2col|direct) picks a
    // ggml form (tests, benchmarks).
    const bool conv_direct;
    const bool conv_own;
    const size_t band_bytes;
    int last_tiles = 0;
    int64_t last_tile = 0, last_tile_w = 0;  // the tile limits the last pass used (0: untiled)
    size_t last_compute = 0;

    Impl(VaeNet &net, const ComponentWeights &w)
        : backend(net.backend_), weights(w), options(net.options_), policy(net.policy_), cfg(VaeConfig::infer(w)),
          params(net.params_),
          runner(net.runner_), conv_direct(options.vae_conv == VaeConv::Direct),
          conv_own(options.vae_conv == VaeConv::Own), band_bytes(options.vae_band_bytes) {
        runner.set_max_nodes(kMaxNodes);
        declare_decoder();
        if (cfg.has_encoder) declare_encoder();
    }

    // ------------------------------------------------------------------ parameters
    ConvP conv_p(const std::string &p, int64_t cin, int64_t cout, int64_t k) {
        ConvP c;
        c.w = params.declare(p + ".weight", ParamKind::Conv, {k, k, cin, cout});
        c.b = params.declare(p + ".bias", ParamKind::F32, {cout});
        return c;
    }
    Norm norm_p(const std::string &p, int64_t c) {
        Norm n;
        n.w = params.declare(p + ".weight", ParamKind::F32, {c});
        n.b = params.declare(p + ".bias", ParamKind::F32, {c});
        return n;
    }
    ResnetP resnet_p(const std::string &p, int64_t cin, int64_t cout) {
        ResnetP r;
        r.norm1 = norm_p(p + ".norm1", cin);
        r.conv1 = conv_p(p + ".conv1", cin, cout, 3);
        r.norm2 = norm_p(p + ".norm2", cout);
        r.conv2 = conv_p(p + ".conv2", cout, cout, 3);
        if (cin != cout) r.skip = conv_p(p + ".nin_shortcut", cin, cout, 1);
        return r;
    }
    AttnP attn_p(const std::string &p, int64_t c) {
        AttnP a;
        a.norm = norm_p(p + ".norm", c);
        a.q = conv_p(p + ".q", c, c, 1);
        a.k = conv_p(p + ".k", c, c, 1);
        a.v = conv_p(p + ".v", c, c, 1);
        a.proj = conv_p(p + ".proj_out", c, c, 1);
        return a;
    }
    void declare_decoder() {
        const int64_t top = cfg.top_channels;
        dec.conv_in = conv_p("decoder.conv_in", cfg.z_channels, top, 3);
        dec.mid1 = resnet_p("decoder.mid.block_1", top, top);
        dec.attn = attn_p("decoder.mid.attn_1", top);
        dec.mid2 = resnet_p("decoder.mid.block_2", top, top);
        dec.up.resize(size_t(cfg.levels));
        int64_t cin = top;
        for (int64_t i = cfg.levels - 1; i >= 0; --i) {
            const int64_t c = cfg.level_channels[size_t(i)];
            const std::string p = strfmt("decoder.up.%lld", (long long)i);
            if (weights.count_indexed(p + ".block.") != cfg.num_res_blocks + 1)
                fail_value("the VAE decoder's level %lld has %d resnets; level 0 has %lld", (long long)i,
                           weights.count_indexed(p + ".block."), (long long)cfg.num_res_blocks + 1);
            for (int64_t j = 0; j <= cfg.num_res_blocks; ++j) {
                dec.up[size_t(i)].blocks.push_back(resnet_p(strfmt("%s.block.%lld", p.c_str(), (long long)j), cin, c));
                cin = c;
            }
            if (i != 0) dec.up[size_t(i)].resample = conv_p(p + ".upsample.conv", c, c, 3);
        }
        dec.norm_out = norm_p("decoder.norm_out", cin);
        dec.conv_out = conv_p("decoder.conv_out", cin, cfg.out_channels, 3);
    }
    void declare_encoder() {
        const int64_t ch0 = cfg.level_channels[0];
        enc.conv_in = conv_p("encoder.conv_in", cfg.in_channels, ch0, 3);
        enc.down.resize(size_t(cfg.levels));
        int64_t cin = ch0;
        for (int64_t i = 0; i < cfg.levels; ++i) {
            const int64_t c = cfg.level_channels[size_t(i)];
            const std::string p = strfmt("encoder.down.%lld", (long long)i);
            if (weights.count_indexed(p + ".block.") != cfg.num_res_blocks)
                fail_value("the VAE encoder's level %lld has %d resnets; expected %lld", (long long)i,
                           weights.count_indexed(p + ".block."), (long long)cfg.num_res_blocks);
            for (int64_t j = 0; j < cfg.num_res_blocks; ++j) {
                enc.down[size_t(i)].blocks.push_back(resnet_p(strfmt("%s.block.%lld", p.c_str(), (long long)j), cin, c));
                cin = c;
            }
            if (i != cfg.levels - 1) enc.down[size_t(i)].resample = conv_p(p + ".downsample.conv", c, c, 3);
        }
        const int64_t top = cin;
        enc.mid1 = resnet_p("encoder.mid.block_1", top, top);
        enc.attn = attn_p("encoder.mid.attn_1", top);
        enc.mid2 = resnet_p("encoder.mid.block_2", top, top);
        enc.norm_out = norm_p("encoder.norm_out", top);
        enc.conv_out = conv_p("encoder.conv_out", top, 2 * cfg.z_channels, 3);
    }

    // ------------------------------------------------------------------ graph pieces
    // Activations are F32 everywhere: the VAE has no table-based activation, and its attention
    // takes our fused F32 kernel on the CPU (cpu_attention.h), else the explicit F32 softmax
    // (chunked, so memory stays bounded) — F16 K/V in ggml's flash attention would cost ~5e-4
    // relative error for no useful speed (attention is ~2% of the decoder's work). Conv kernels run in the type ParamKind::Conv gives them: F32 when stored
    // F32 (gpustack's quantized files and F32 files: exact), F16 otherwise.
    Ops ops(ggml_context *ctx) const {
        Ops o{ctx, backend};
        o.exact = true;
        o.flash_attn = false;
        return o;
    }

    ggml_tensor *conv(const Ops &o, ggml_tensor *x, const ConvP &c, int stride, int pad) const {
        if (use_own_conv(c.w)) {  // bias fused, no patch matrix
            if (!ggml_is_contiguous(x)) x = ggml_cont(o.ctx, x);
            return conv2d_f32_op(o.ctx, x, c.w, c.b, stride, pad);
        }
        ggml_tensor *y = conv_direct ? ggml_conv_2d_direct(o.ctx, c.w, x, stride, stride, pad, pad, 1, 1)
                                     : conv_banded(o.ctx, x, c.w, stride, pad);
        return ggml_add(o.ctx, y, ggml_reshape_4d(o.ctx, c.b, 1, 1, c.b->ne[0], 1));
    }

    // Upsample2D: 2x nearest-neighbour upsampling, then a 3x3 convolution; one op of ours where our
    // convolution runs (2x2 kernels per output parity, no upsampled map: cpu_conv.h).
    ggml_tensor *upsample_conv(const Ops &o, ggml_tensor *x, const ConvP &c) const {
        if (use_own_conv(c.w) && c.w->ne[0] == 3 && c.w->ne[1] == 3) {
            if (!ggml_is_contiguous(x)) x = ggml_cont(o.ctx, x);
            return upsample_conv2d_f32_op(o.ctx, x, c.w, c.b);
        }
        return conv(o, ggml_upscale(o.ctx, x, 2, GGML_SCALE_MODE_NEAREST), c, 1, 1);
    }

    bool own_conv() const { return conv_own && backend.is_cpu() && cpu_conv2d_available(); }
    bool use_own_conv(const ggml_tensor *kernel) const {
        return own_conv() && (kernel->type == GGML_TYPE_F32 || kernel->type == GGML_TYPE_F16);
    }

    // im2col + one matmul per band of output rows, each band's patch matrix at most band_bytes
    // (64 MiB; FLUXMINI_VAE_BAND_KB overrides, for tests) or 1/kMaxBands of the whole, written
    // into the output in place. The bands run one after the other, so their patch matrices share
    // memory: an unbanded 3x3 conv of 256 channels at 576² would need a 3 GB patch matrix.
    // x [W, H, Cin, 1], kernel [k, k, Cin, Cout]; patches in the kernel's type (F32: exact).
    static constexpr int64_t kMaxBands = 64;
    ggml_tensor *conv_banded(ggml_context *ctx, ggml_tensor *x, ggml_tensor *kernel, int s, int p) const {
        const int64_t k = kernel->ne[0], cin = x->ne[2], cout = kernel->ne[3];
        const int64_t W = x->ne[0], H = x->ne[1];
        const int64_t OW = (W + 2 * p - k) / s + 1, OH = (H + 2 * p - k) / s + 1, K = k * k * cin;
        ggml_tensor *w2 = ggml_reshape_2d(ctx, kernel, K, cout);
        const size_t row_bytes = size_t(K * OW) * ggml_type_size(kernel->type);
        int64_t nb = std::max<int64_t>(1, int64_t(band_bytes / row_bytes));
        nb = std::max(nb, (OH + kMaxBands - 1) / kMaxBands);
        auto band = [&](int64_t oy0, int64_t n) {  // output rows [oy0, oy0 + n) -> [OW, n, Cout]
            const int64_t lo = oy0 * s - p, hi = (oy0 + n - 1) * s - p + k - 1;  // input rows needed
            const int64_t r0 = std::max<int64_t>(0, lo), r1 = std::min<int64_t>(H - 1, hi);
            const bool padded = lo < 0 || hi > H - 1;  // touches the top or bottom border
            ggml_tensor *xv = (r0 == 0 && r1 == H - 1)
                                  ? x
                                  : ggml_view_3d(ctx, x, W, r1 - r0 + 1, cin, x->nb[1], x->nb[2], size_t(r0) * x->nb[1]);
            // The CPU reads the band in place; GPU im2col kernels take contiguous inputs only (the
            // scheduler would otherwise run every convolution on the CPU).
            if (!backend.is_cpu() && !ggml_is_contiguous(xv)) xv = ggml_cont(ctx, xv);
            ggml_tensor *cols = ggml_im2col(ctx, kernel, xv, s, s, p, padded ? p : 0, 1, 1, true, kernel->type);
            // cols [K, OW, rows]: row j starts at input row r0 − (padded ? p : 0) + j·s
            const int64_t j0 = (oy0 * s - p - (r0 - (padded ? p : 0))) / s;
            if (j0 < 0 || j0 + n > cols->ne[2] || cols->ne[1] != OW)
                fail_runtime("internal error: VAE conv band %lld+%lld of %lld rows", (long long)oy0, (long long)n,
                             (long long)OH);
            if (j0 != 0 || n != cols->ne[2])
                cols = ggml_view_3d(ctx, cols, K, OW, n, cols->nb[1], cols->nb[2], size_t(j0) * cols->nb[2]);
            ggml_tensor *y = ggml_mul_mat(ctx, ggml_reshape_2d(ctx, cols, K, OW * n), w2);  // [OW·n, Cout]
            return ggml_reshape_3d(ctx, y, OW, n, cout);
        };
        if (nb >= OH) return ggml_reshape_4d(ctx, band(0, OH), OW, OH, cout, 1);
        ggml_tensor *y = ggml_pad(ctx, band(0, nb), 0, int(OH - nb), 0, 0);  // [OW, OH, Cout], rows ≥ nb zero
        for (int64_t oy0 = nb; oy0 < OH; oy0 += nb) {
            const int64_t n = std::min(nb, OH - oy0);
            y = ggml_set_inplace(ctx, y, band(oy0, n), y->nb[1], y->nb[2], y->nb[3], size_t(oy0) * y->nb[1]);
        }
        return ggml_reshape_4d(ctx, y, OW, OH, cout, 1);
    }

    // GroupNorm with its scale and shift, then SiLU where `act`: one op of ours (cpu_norm.h) where
    // our convolution runs (the CPU backend), else ggml's four.
    ggml_tensor *norm(const Ops &o, ggml_tensor *x, const Norm &n, bool act) const {
        if (own_conv() && n.w && n.b && n.w->type == GGML_TYPE_F32 && n.b->type == GGML_TYPE_F32) {
            if (!ggml_is_contiguous(x)) x = ggml_cont(o.ctx, x);
            return group_norm_op(o.ctx, x, n.w, n.b, kGroups, kEps, act);
        }
        ggml_tensor *y = group_norm(o, x, n, kGroups, kEps);
        return act ? silu(o, y) : y;
    }

    ggml_tensor *resnet(const Ops &o, ggml_tensor *x, const ResnetP &r) const {
        ggml_tensor *h = conv(o, norm(o, x, r.norm1, true), r.conv1, 1, 1);
        h = conv(o, norm(o, h, r.norm2, true), r.conv2, 1, 1);
        ggml_tensor *skip = r.skip.w ? conv(o, x, r.skip, 1, 0) : x;
        return ggml_add(o.ctx, skip, h);
    }

    // Single-head attention over all W·H positions, C channels (docs/MODEL.md §5.1 AttnBlock).
    ggml_tensor *attn(const Ops &o, ggml_tensor *x, const AttnP &a) const {
        ggml_context *ctx = o.ctx;
        const int64_t W = x->ne[0], H = x->ne[1], C = x->ne[2], L = W * H;
        ggml_tensor *h = norm(o, x, a.norm, false);
        auto tokens = [&](ggml_tensor *planes) {  // [W, H, C] -> [C, L]
            return ggml_cont(ctx, ggml_transpose(ctx, ggml_reshape_2d(ctx, planes, L, C)));
        };
        // The four 1x1 convolutions: ours on the channel planes where it runs (only q, k, v and the
        // attention's output then change layout), else linears on the tokens.
        const bool on_planes = use_own_conv(a.q.w) && use_own_conv(a.k.w) && use_own_conv(a.v.w) && use_own_conv(a.proj.w);
        auto linear_of = [&](const ConvP &c, ggml_tensor *in) {  // 1x1 conv on tokens = linear
            Linear l;
            l.w = ggml_reshape_2d(ctx, c.w, C, C);
            l.b = c.b;
            return linear(o, in, l);
        };
        ggml_tensor *t = on_planes ? nullptr : tokens(h);
        auto project = [&](const ConvP &c) { return on_planes ? tokens(conv(o, h, c, 1, 0)) : linear_of(c, t); };
        ggml_tensor *q = project(a.q), *k = project(a.k), *v = project(a.v);  // [C, L] each
        const float scale = 1.0f / std::sqrt(float(C));
        auto finish = [&](ggml_tensor *out) {  // out [C, L]: projection, residual
            auto planes = [&](ggml_tensor *y) { return ggml_reshape_4d(ctx, ggml_cont(ctx, ggml_transpose(ctx, y)), W, H, C, 1); };
            return ggml_add(ctx, x, on_planes ? conv(o, planes(out), a.proj, 1, 0) : planes(linear_of(a.proj, out)));
        };
        if (o.attn_path != AttnPath::Ggml) {  // our fused CPU kernel (cpu_attention.h): no score block at all
            Ops fused = o;
            fused.flash_attn = true;
            auto one_head = [&](ggml_tensor *t3) { return ggml_reshape_3d(ctx, t3, C, 1, L); };
            return finish(attention(fused, one_head(q), one_head(k), one_head(v), nullptr, scale));
        }
        // Else explicit F32 softmax in query chunks, so that no score block exceeds 4 Mi floats
        // (16 MiB): an untiled 128×128 latent would otherwise need one 1 GiB matrix. Chunks are
        // computed one after the other, so their score blocks share memory.
        const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(L, (int64_t(4) << 20) / L));
        ggml_tensor *vt = ggml_cont(ctx, ggml_transpose(ctx, v));  // [L, C]
        std::vector<ggml_tensor *> parts;
        for (int64_t s0 = 0; s0 < L; s0 += chunk) {
            const int64_t n = std::min(chunk, L - s0);
            ggml_tensor *qc = n == L ? q : ggml_view_2d(ctx, q, C, n, q->nb[1], size_t(s0) * q->nb[1]);
            ggml_tensor *kq = ggml_mul_mat(ctx, k, qc);  // [L, n]
            ggml_mul_mat_set_prec(kq, GGML_PREC_F32);
            kq = ggml_soft_max_ext(ctx, kq, nullptr, scale, 0.0f);
            parts.push_back(ggml_mul_mat(ctx, vt, kq));  // [C, n]
        }
        while (parts.size() > 1) {  // balanced concatenation along the tokens
            std::vector<ggml_tensor *> next;
            for (size_t i = 0; i + 1 < parts.size(); i += 2) next.push_back(ggml_concat(ctx, parts[i], parts[i + 1], 1));
            if (parts.size() % 2) next.push_back(parts.back());
            parts.swap(next);
        }
        return finish(parts[0]);
    }

    ggml_cgraph *build_decoder(ggml_context *ctx, int64_t w, int64_t h) const {
        Ops o = ops(ctx);
        ggml_tensor *z = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, w, h, cfg.z_channels, 1);
        ggml_set_name(z, "z");
        ggml_set_input(z);
        ggml_tensor *x = conv(o, z, dec.conv_in, 1, 1);
        x = resnet(o, x, dec.mid1);
        x = attn(o, x, dec.attn);
        x = resnet(o, x, dec.mid2);
        for (int64_t i = cfg.levels - 1; i >= 0; --i) {
            const LevelP &lv = dec.up[size_t(i)];
            for (const ResnetP &r : lv.blocks) x = resnet(o, x, r);
            if (i != 0) x = upsample_conv(o, x, lv.resample);
        }
        x = conv(o, norm(o, x, dec.norm_out, true), dec.conv_out, 1, 1);
        ggml_set_name(x, "out");
        ggml_set_output(x);
        ggml_cgraph *g = ggml_new_graph_custom(ctx, kMaxNodes, false);
        ggml_build_forward_expand(g, x);
        return g;
    }

    ggml_cgraph *build_encoder(ggml_context *ctx, int64_t w, int64_t h) const {
        Ops o = ops(ctx);
        ggml_tensor *img = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, w, h, cfg.in_channels, 1);
        ggml_set_name(img, "image");
        ggml_set_input(img);
        ggml_tensor *x = conv(o, img, enc.conv_in, 1, 1);
        for (int64_t i = 0; i < cfg.levels; ++i) {
            const LevelP &lv = enc.down[size_t(i)];
            for (const ResnetP &r : lv.blocks) x = resnet(o, x, r);
            if (i != cfg.levels - 1) {
                // Zero pad right and bottom by one, then a 3x3 stride-2 conv without padding.
                x = ggml_pad_ext(ctx, x, 0, 1, 0, 1, 0, 0, 0, 0);
                x = conv(o, x, lv.resample, 2, 0);
            }
        }
        x = resnet(o, x, enc.mid1);
        x = attn(o, x, enc.attn);
        x = resnet(o, x, enc.mid2);
        x = conv(o, norm(o, x, enc.norm_out, true), enc.conv_out, 1, 1);  // mean ‖ logvar
        ggml_set_name(x, "moments");
        ggml_set_output(x);
        ggml_cgraph *g = ggml_new_graph_custom(ctx, kMaxNodes, false);
        ggml_build_forward_expand(g, x);
        return g;
    }

    static constexpr size_t kMaxNodes = 32768;  // banded convs of an untiled 1024² decode: ~15k nodes

    // Compute memory an untiled pass would need, measured by planning its graph (nothing allocated).
    size_t measure(bool decoder, int64_t w, int64_t h) const {
        GgmlAbortGuard guard;
        ggml_init_params ip{ggml_tensor_overhead() * kMaxNodes + ggml_graph_overhead_custom(kMaxNodes, false), nullptr,
                            true};
        ggml_context *ctx = ggml_init(ip);
        if (!ctx) fail_runtime("out of memory while building a graph");
        size_t size = 0;
        ggml_gallocr_t ga = nullptr;
        try {
            ggml_cgraph *g = decoder ? build_decoder(ctx, w, h) : build_encoder(ctx, w, h);
            ga = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend.main()));
            ggml_gallocr_reserve_n_size(ga, g, nullptr, nullptr, &size);
        } catch (...) {
            if (ga) ggml_gallocr_free(ga);
            ggml_free(ctx);
            throw;
        }
        ggml_gallocr_free(ga);
        ggml_free(ctx);
        return size;
    }

    // ------------------------------------------------------------------ tiled driver
    // Runs the decoder (in_ch = z channels, f = scale) or the encoder (f = 1/scale, expressed by
    // passing image-space input and latent-space tiles) over tiles and blends the results.
    //
    // in: [in_c, in_h, in_w]; out: [out_c, out_h, out_w] with in = lat·fin, out = lat·fout where
    // lat is the latent grid (h, w) the tiles are laid on.
    std::vector<float> run_tiled(bool decoder, const float *in, int64_t lat_h, int64_t lat_w, const VaeTiling &tiling,
                                 const CancelToken *cancel) {
        const int64_t S = cfg.scale();
        const int64_t fin = decoder ? 1 : S, fout = decoder ? S : 1;
        const int64_t in_c = decoder ? cfg.z_channels : cfg.in_channels;
        const int64_t out_c_graph = decoder ? cfg.out_channels : 2 * cfg.z_channels;
        const int64_t out_c = decoder ? cfg.out_channels : cfg.z_channels;  // encode keeps the mean
        const int64_t in_h = lat_h * fin, in_w = lat_w * fin, out_h = lat_h * fout, out_w = lat_w * fout;

        if (tiling.mode < -1 || tiling.mode > 1) fail_value("tiling mode must be -1 (auto), 0 (off) or 1 (on)");
        // Tile limits per axis (height, width) and the overlap each one implies.
        int64_t Th = tiling.tile, Tw = tiling.tile_w > 0 ? tiling.tile_w : tiling.tile;
        auto overlap_for = [&](int64_t T) {
            const int64_t o = tiling.overlap >= 0 ? int64_t(tiling.overlap) : std::min<int64_t>(16, T / 4);
            return o < T ? o : T / 4;  // (a given overlap, once the automatic choice shrinks T below it)
        };
        if (tiling.mode != 0) {
            for (int64_t T : {Th, Tw}) {
                if (T < kVaeMinTile || T > kVaeMaxLatentSide)
                    fail_value("VAE tile size %lld is out of range; use %lld to %lld latent pixels (default 72)",
                               (long long)T, (long long)kVaeMinTile, (long long)kVaeMaxLatentSide);
                if (tiling.overlap >= T)
                    fail_value("VAE tile overlap %d must be smaller than the tile size %lld", tiling.overlap,
                               (long long)T);
            }
        }

        load();
        bool tiled = tiling.mode == 1;
        // Automatic: tile when an untiled pass needs more compute memory than the budget (the
        // memory policy's: EngineOptions::vae_budget_mb, less under a tight memory budget). Then
        // each axis's limit runs from the given one down by quarters to kVaeMinTile, and of the
        // pairs whose pass fits, the one that computes the fewest latent pixels in all wins
        // (overlaps are computed twice): a 64x64 latent under half its untiled memory runs as
        // two strips of 64x37 (1.16x the pixels), not four tiles of 39x39 (1.49x). Tiles more
        // than twice as long as wide are taken only when no other shape fits: thin tiles cost far
        // more than their pixels (a 1024² decode in 36 tiles of 9x72 took 1.72x the time of 4
        // tiles of 72x72 for 1.13x the pixels; their overlap also shrinks with the short side).
        // Planning a graph allocates nothing and takes milliseconds next to the pass; a pair at
        // least as large as one that did not fit is not planned.
        const uint64_t budget = policy.vae_budget_bytes ? policy.vae_budget_bytes : uint64_t(options.vae_budget_mb) << 20;
        if (tiling.mode == -1) {
            const size_t need = measure(decoder, in_w, in_h);
            tiled = need > budget;
            log_info("VAE %s %lldx%lld: an untiled pass needs %.0f MiB (budget %.0f MiB): %s",
                     decoder ? "decode" : "encode", (long long)out_w, (long long)out_h, need / 1048576.0,
                     budget / 1048576.0, tiled ? "tiled" : "untiled");
            if (tiled) {
                auto limits = [](int64_t T) {
                    std::vector<int64_t> v{T};
                    while (v.back() > kVaeMinTile) v.push_back(std::max<int64_t>(kVaeMinTile, v.back() * 3 / 4));
                    return v;
                };
                struct Choice {
                    int64_t th, tw, h, w, work;  // limits, tile shape, latent pixels computed
                    bool thin;                   // more than 2:1
                };
                std::vector<Choice> choices;
                for (int64_t a : limits(Th))
                    for (int64_t b : limits(Tw)) {
                        const AxisTiles ty = axis_tiles(lat_h, a, overlap_for(a)), tx = axis_tiles(lat_w, b, overlap_for(b));
                        if (ty.starts.size() == 1 && tx.starts.size() == 1) continue;  // the untiled pass
                        choices.push_back({a, b, ty.size, tx.size,
                                           int64_t(ty.starts.size() * tx.starts.size()) * ty.size * tx.size,
                                           std::max(ty.size, tx.size) > 2 * std::min(ty.size, tx.size)});
                    }
                // tiles at most 2:1 first; then fewest pixels, then fewest passes (larger tiles),
                // then the larger limits
                std::stable_sort(choices.begin(), choices.end(), [](const Choice &x, const Choice &y) {
                    if (x.thin != y.thin) return y.thin;
                    if (x.work != y.work) return x.work < y.work;
                    return x.h * x.w > y.h * y.w;
                });
                std::vector<std::pair<int64_t, int64_t>> too_big;  // tile shapes (h, w) that did not fit
                bool found = false;
                for (const Choice &c : choices) {
                    bool dominated = false;
                    for (auto &f : too_big) dominated |= c.h >= f.first && c.w >= f.second;
                    if (dominated) continue;
                    if (measure(decoder, c.w * fin, c.h * fin) <= budget) {
                        Th = c.th, Tw = c.tw, found = true;
                        break;
                    }
                    too_big.emplace_back(c.h, c.w);
                }
                if (!found) Th = Tw = kVaeMinTile;  // nothing fits: the smallest tiles
            }
        }
        last_tile = tiled ? Th : 0;
        last_tile_w = tiled ? Tw : 0;
        const AxisTiles ay = tiled ? axis_tiles(lat_h, Th, overlap_for(Th)) : AxisTiles{lat_h, {0}};
        const AxisTiles ax = tiled ? axis_tiles(lat_w, Tw, overlap_for(Tw)) : AxisTiles{lat_w, {0}};
        const std::vector<int64_t> &ys = ay.starts, &xs = ax.starts;
        const int64_t th = ay.size, tw = ax.size;
        const int64_t tin_h = th * fin, tin_w = tw * fin, tout_h = th * fout, tout_w = tw * fout;

        const std::string key = strfmt("%s:%lldx%lld", decoder ? "dec" : "enc", (long long)tin_w, (long long)tin_h);
        auto build = [&](ggml_context *ctx) {
            return decoder ? build_decoder(ctx, tin_w, tin_h) : build_encoder(ctx, tin_w, tin_h);
        };
        const char *in_name = decoder ? "z" : "image";
        const char *out_name = decoder ? "out" : "moments";

        std::vector<float> out(size_t(out_c * out_h * out_w), 0.0f);
        const bool single = ys.size() == 1 && xs.size() == 1;
        last_tiles = int(ys.size() * xs.size());
        try {
            if (single) {
                runner.prepare(key, build);
                runner.set_input(in_name, in, size_t(in_c * in_h * in_w) * 4);
                runner.compute(cancel);
                std::vector<float> r = runner.get_output(out_name);
                std::memcpy(out.data(), r.data(), out.size() * 4);  // encode: the mean comes first
            } else {
                const auto wy = axis_weights(ys, th, fout), wx = axis_weights(xs, tw, fout);
                std::vector<float> wsum(size_t(out_h * out_w), 0.0f);
                std::vector<float> tile_in(size_t(in_c * tin_h * tin_w));
                for (size_t ty = 0; ty < ys.size(); ++ty) {
                    for (size_t tx = 0; tx < xs.size(); ++tx) {
                        const int64_t y0 = ys[ty] * fin, x0 = xs[tx] * fin;
                        for (int64_t c = 0; c < in_c; ++c)
                            for (int64_t y = 0; y < tin_h; ++y)
                                std::memcpy(&tile_in[size_t((c * tin_h + y) * tin_w)],
                                            in + (c * in_h + y0 + y) * in_w + x0, size_t(tin_w) * 4);
                        runner.prepare(key, build);
                        runner.set_input(in_name, tile_in.data(), tile_in.size() * 4);
                        runner.compute(cancel);
                        std::vector<float> r = runner.get_output(out_name);
                        if (int64_t(r.size()) != out_c_graph * tout_h * tout_w)
                            fail_runtime("internal error: VAE tile output has %zu values", r.size());
                        const int64_t oy0 = ys[ty] * fout, ox0 = xs[tx] * fout;
                        const auto &wyv = wy[ty], &wxv = wx[tx];
                        for (int64_t y = 0; y < tout_h; ++y) {
                            float *ws = &wsum[size_t((oy0 + y) * out_w + ox0)];
                            for (int64_t x = 0; x < tout_w; ++x) ws[x] += wyv[size_t(y)] * wxv[size_t(x)];
                            for (int64_t c = 0; c < out_c; ++c) {
                                const float *src = &r[size_t((c * tout_h + y) * tout_w)];
                                float *dst = &out[size_t((c * out_h + oy0 + y) * out_w + ox0)];
                                for (int64_t x = 0; x < tout_w; ++x) dst[x] += wyv[size_t(y)] * wxv[size_t(x)] * src[x];
                            }
                        }
                    }
                }
                for (int64_t c = 0; c < out_c; ++c)
                    for (int64_t i = 0; i < out_h * out_w; ++i) out[size_t(c * out_h * out_w + i)] /= wsum[size_t(i)];
            }
        } catch (...) {
            runner.release();
            throw;
        }
        last_compute = runner.compute_buffer_bytes();
        log_info("VAE %s %lldx%lld: %d tile(s) of %lldx%lld latent px, compute buffer %.1f MiB", decoder ? "decode" : "encode",
                 (long long)out_w, (long long)out_h, last_tiles, (long long)tw, (long long)th, last_compute / 1048576.0);
        runner.release();  // the VAE runs once per image: give its compute memory back
        return out;
    }

    void load() { params.materialize(); }
};

VaeNet::VaeNet(Backend &backend, const ComponentWeights &weights, const EngineOptions &options)
    : Network(backend, weights, options), impl_(new Impl(*this, weights)) {}
VaeNet::~VaeNet() = default;
const VaeConfig &VaeNet::config() const { return impl_->cfg; }
int VaeNet::last_tiles() const { return impl_->last_tiles; }
int64_t VaeNet::last_tile() const { return impl_->last_tile; }
int64_t VaeNet::last_tile_w() const { return impl_->last_tile_w; }
size_t VaeNet::last_compute_bytes() const { return impl_->last_compute; }
bool VaeNet::own_conv() const { return impl_->own_conv(); }

static void check_side(const char *what, int64_t n) {
    if (n < 1 || n > kVaeMaxLatentSide)
        fail_value("%s %lld is out of range: the VAE takes 1 to %lld latent pixels per side", what, (long long)n,
                   (long long)kVaeMaxLatentSide);
}

std::vector<float> VaeNet::decode(const float *z, int64_t h, int64_t w, const VaeTiling &tiling,
                                  const CancelToken *cancel) {
    check_side("latent height", h);
    check_side("latent width", w);
    return impl_->run_tiled(true, z, h, w, tiling, cancel);
}

std::vector<float> VaeNet::encode(const float *image, int64_t height, int64_t width, const VaeTiling &tiling,
                                  const CancelToken *cancel) {
    const VaeConfig &c = impl_->cfg;
    if (!c.has_encoder)
        fail_value("these VAE weights have no encoder (encoder.* tensors); use a VAE file with the encoder for img2img");
    const int64_t s = c.scale();
    if (height < 1 || width < 1 || height % s != 0 || width % s != 0)
        fail_value("image size %lldx%lld (width x height) must be positive multiples of %lld for the VAE encoder; "
                   "crop or resize the image",
                   (long long)width, (long long)height, (long long)s);
    check_side("image height / scale", height / s);
    check_side("image width / scale", width / s);
    return impl_->run_tiled(false, image, height / s, width / s, tiling, cancel);
}

}  // namespace fm
