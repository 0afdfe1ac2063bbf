// Building blocks shared by Flux, T5, CLIP and the VAE, written once.
//
// Activations are F32 throughout. With `exact` set (F32 weights), activations that ggml's CPU
// backend computes through F16 lookup tables (GELU, quick GELU) are composed from exact ops,
// and attention keeps K/V in F32, so F32 files reproduce the float32 reference to ~1e-5.
#pragma once

#include "common.h"
#include "cpu_attention.h"
#include "cpu_lora.h"

#include <ggml.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace fm {

class Backend;

struct Ops {
    explicit Ops(ggml_context *c) : ctx(c) {}
    // For graphs that run on `backend`: takes its choice of kernels (qmatmul_path).
    Ops(ggml_context *c, const Backend &backend);

    ggml_context *ctx;
    bool exact = false;       // exact activation path (F32 weights)
    bool flash_attn = true;   // use ggml_flash_attn_ext where allowed
    // Flash attention with F32 K/V instead of F16: exact enough for the exact path, and on ggml's
    // CPU backend faster than F16 K/V (no F16 dot products); GPU kernels want F16 (leave false).
    bool flash_kv_f32 = false;
    // Ask GPU backends to accumulate linear() matmuls in F32 (CUDA may use F16 for F16 weights,
    // which overflows on T5's activations). The CPU backend accumulates in F32 anyway.
    bool f32_matmul = false;
    // Q4_0 / Q4_1 / Q8_0 weights of linear() go through our CPU kernel on this path
    // (Backend::qmatmul_path(); cpu_qmatmul.h), unless Ggml.
    KernelChoice qmatmul_path = KernelChoice::Ggml;
    // On that path, round the activations' Q8_0 block scales to F16 as ggml stores them
    // (compat="sd.cpp"'s T5, docs/MODEL.md §4.7); ggml's own path always does.
    bool f16_act_scales = false;
    // attention() with flash_attn runs our fused CPU kernel on this path (Backend::attention_path();
    // cpu_attention.h) instead of ggml's flash attention, unless Ggml.
    AttnPath attn_path = AttnPath::Ggml;
    // gelu_tanh() keeps ggml's F16-table GELU even where our kernels run (compat="sd.cpp"'s T5,
    // which follows ggml's arithmetic; docs/MODEL.md §4.7).
    bool ggml_gelu = false;
};

// One low-rank adapter (LoRA) of a linear layer, as set_adapters() and pack_adapters() take it:
// y[row0 : row0 + rows] += scale · up(down(x)), factors in their file type (F32, F16 or BF16),
// row-major as PyTorch stores them: down [rank, in], up [rows, rank] (rows may cover only part of a
// fused weight, e.g. the q of a fused qkv). With on_output the adapter reads the layer's output
// instead of its input: y += scale · up(down(y)) (XLabs' single-block proj_lora, a residual
// after linear2).
struct AdapterFactors {
    int64_t row0 = 0;
    bool on_output = false;
    float scale = 1.0f;
    ggml_type type = GGML_TYPE_F32;
    int64_t rank = 0, in = 0, rows = 0;
    const void *down = nullptr, *up = nullptr;
};

// The adapters of one layer packed for linear() (LoraPack, cpu_lora.h): one pack per (input or
// output, factor type), in the order of first appearance. Tensors are created in `ctx` (no_alloc);
// after allocating them, copy each `uploads` entry's bytes into its tensor. The packs' memory is
// the factors' own size (upᵀ is `up` transposed, nothing added).
std::vector<LoraPack> pack_adapters(ggml_context *ctx, const std::vector<AdapterFactors> &adapters,
                                    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> &uploads);
// Graph nodes linear() may add per adapter (ggml's route, on other backends: views, two
// products, a transpose copy, a scale, an add).
constexpr size_t kNodesPerAdapter = 8;

// Everything a linear layer computes with. Networks hold one per layer and pass it to linear()
// whole, so whatever changes how a linear runs (adapters, weights streamed per layer) is written
// once, in linear().
struct Linear {
    ggml_tensor *w = nullptr;  // ne=[in, out]
    ggml_tensor *b = nullptr;  // [out] or null
    // The layer's adapters, packed, owned by its Network (set_adapters() changes them in place,
    // so every copy of the handle sees them); null or empty: none.
    const std::vector<LoraPack> *adapters = nullptr;
};

// The affine parameters of a normalisation (either may be null).
struct Norm {
    ggml_tensor *w = nullptr, *b = nullptr;
};

// y = x·Wᵀ + b (+ the adapters); x [in, n...].
ggml_tensor *linear(const Ops &o, ggml_tensor *x, const Linear &p);

// LayerNorm over ne[0] with the affine p (w/b may be null: no affine).
ggml_tensor *layer_norm(const Ops &o, ggml_tensor *x, const Norm &p, float eps);
// RMSNorm over ne[0] times w (w may be null).
ggml_tensor *rms_norm(const Ops &o, ggml_tensor *x, ggml_tensor *w, float eps);
// GroupNorm of an image x [W, H, C, N] with per-channel affine p [C].
ggml_tensor *group_norm(const Ops &o, ggml_tensor *x, const Norm &p, int groups, float eps);

ggml_tensor *gelu_tanh(const Ops &o, ggml_tensor *x);   // tanh-approximated GELU
// ggml_concat(head, gelu_tanh(x), 0): rows [head | GELU(x)], one pass where our GELU op runs
ggml_tensor *concat_gelu_tanh(const Ops &o, ggml_tensor *head, ggml_tensor *x);
ggml_tensor *quick_gelu(const Ops &o, ggml_tensor *x);  // x·sigmoid(1.702x)
ggml_tensor *silu(const Ops &o, ggml_tensor *x);

// Multi-head attention. q [d, H, Lq], k/v [d, H, Lk] (ggml order: head_dim fastest);
// mask: null or F32 [Lk, Lq] or [Lk, Lq, H] added to the scores before softmax.
// Returns [d·H, Lq].
ggml_tensor *attention(const Ops &o, ggml_tensor *q, ggml_tensor *k, ggml_tensor *v, ggml_tensor *mask,
                       float scale);

}  // namespace fm
