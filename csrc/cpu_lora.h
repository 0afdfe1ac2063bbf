// Run-time LoRA adapters on the CPU, as one ggml custom op per pack of adapters (lora_op):
//   down: h[k, n] = Σ_i down[k, i] · x[i, n]                 (every adapter's down at once)
//   up:   y[row0 + j, n] += scale · Σ_k up[j, k] · h[k, n]   (each adapter into its rows)
// The down product reads the F32 activation as it is (ggml's mul_mat converts it to the factor
// type first, then parallelises over the R ≤ 64 rows of `down`: about 5 GMAC/s, against ~100 for
// the Q4_0 kernel), each loaded `down` vector serving 4 tokens. The up product keeps `up`
// TRANSPOSED (upᵀ: rank rows of `rows` values), so its inner loop runs along the output rows
// (thousands long) instead of along the rank: ggml's mul_mat would take one dot product of length
// rank (4-64) per output value, and its vector loops barely start at that length (the scalar tail
// did nearly all the work: +35% per Flux step at rank 16, the same at rank 64). Factors stay in
// their own type (F32, F16 or BF16), widened in registers. Every path accumulates in F32; the
// vector paths fuse multiply and add (FMA) and sum in another order, so they differ from the
// portable one by float32 rounding only.
#pragma once

#include "common.h"
#include "options.h"

#include <ggml.h>

#include <cstdint>
#include <vector>

namespace fm {

// The adapters of one linear layer that read the same tensor (its input, or its output for
// on_output adapters) and share a factor type, packed: their `down` factors stacked into one
// matrix (one product reads the activation once), their upᵀ side by side in one buffer.
struct LoraPack {
    struct Part {             // one adapter
        int64_t k0 = 0;       // its rows in `down` (and in h): k0 .. k0 + rank
        int64_t rank = 0;
        int64_t row0 = 0;     // the output rows it adds to: row0 .. row0 + rows
        int64_t rows = 0;
        int64_t up_offset = 0;  // its upᵀ [rank][rows] starts here in `up_t` (elements)
        float scale = 1.0f;
    };
    ggml_tensor *down = nullptr;  // ne [in, R], R = Σ rank
    ggml_tensor *up_t = nullptr;  // ne [Σ rank·rows], same type as down
    bool on_output = false;
    bool merged = false;  // added into the layer's weight (Network's merge mode): linear() skips it
    std::vector<Part> parts;
    // The custom op's userdata: this pack and the kernel path (one per path, so nothing is
    // allocated per graph).
    struct Node {
        const LoraPack *pack;
        KernelChoice path;
    };
    Node nodes[6];  // indexed by KernelChoice
    LoraPack();
    LoraPack(const LoraPack &o);
    LoraPack &operator=(const LoraPack &o);
};

// Whether lora_op runs on `path` (a vector path this CPU has, or Portable).
bool lora_path_ok(KernelChoice path);

// y + Σ over the pack's parts of scale · up · (down · x)[k0 .. k0 + rank] (into rows row0 ..
// row0 + rows), one node: each thread takes whole tiles of 4 tokens through both products, so h
// stays in its cache. Added into y in place (the result is a view of y). y F32 [out, tokens...]
// (made contiguous here), x F32 [in, tokens...] (a view is read in place if its rows are evenly
// strided, else made contiguous); x may be y (output adapters). CPU backend only.
ggml_tensor *lora_op(ggml_context *ctx, ggml_tensor *y, ggml_tensor *x, const LoraPack &pack, KernelChoice path);

// The up product on plain arrays (lora_op's second half, also for tests): out[n][row0 + j] +=
// scale · Σ_k up_t[k][j] · h[n][k0 + k] for tokens n < tokens and rows j0 <= j < j1.
void lora_up_rows(KernelChoice path, ggml_type type, const void *up_t, int64_t rank, int64_t rows,
                  const float *h, int64_t h_stride, float scale, float *out, int64_t out_stride, int64_t tokens,
                  int64_t j0, int64_t j1);

// The down product on plain arrays (lora_op's first half, also for tests and micro-benchmarks):
// h[n][k] = Σ_i down[k][i] · x[n][i] for n < tokens, k < ranks; `down` [ranks][in] in `type`
// (F32, F16, BF16).
void lora_down_rows(KernelChoice path, ggml_type type, const void *down, int64_t in, int64_t ranks, const float *x,
                    int64_t x_stride, float *h, int64_t h_stride, int64_t tokens);

}  // namespace fm
