// Run-time LoRA adapters on the CPU, as two ggml custom ops per pack of adapters (below):
//   down: h[k, n] = Σ_i down[k, i] · x[i, n]                 (every adapter's down at once)
//   up:   y[row0 + j, n] += scale · Σ_k up[j, k] · h[k, n]   (each adapter into its rows)
// The down product reads the F32 activation as it is (ggml's mul_mat converts it to the factor
// type first, then parallelises over the R ≤ 64 rows of `down`: about 5 GMAC/s, against ~100 for
// the Q4_0 kernel) and splits the tokens between the threads, each loaded `down` vector serving
// several tokens. The up product keeps `up` TRANSPOSED (upᵀ: rank rows of `rows` values), so its
// inner loop runs along the output rows (thousands long) instead of along the rank: ggml's
// mul_mat would take one dot product of length rank (4-64) per output value, and its vector
// loops barely start at that length (the scalar tail did nearly all the work: +35% per Flux step
// at rank 16, the same at rank 64). Factors stay in their own type (F32, F16 or BF16), widened in
// registers. Every path accumulates in F32; the vector paths fuse multiply and add (FMA) and sum
// in another order, so they differ from the portable one by float32 rounding only.
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

// Whether lora_up_op runs on `path` (a vector path this CPU has, or Portable).
bool lora_path_ok(KernelChoice path);

// h F32 [R, tokens...] = pack.down · x, x F32 [in, tokens...] (a view is read in place if its
// rows are evenly strided, else made contiguous). CPU backend only.
ggml_tensor *lora_down_op(ggml_context *ctx, ggml_tensor *x, const LoraPack &pack, KernelChoice path);

// y + Σ over the pack's parts of scale · up · h[k0 .. k0 + rank] (into rows row0 .. row0 + rows),
// added into y in place (the result is a view of y); y F32 [out, tokens...], h F32 [R, tokens...]
// (made contiguous here). CPU backend only.
ggml_tensor *lora_up_op(ggml_context *ctx, ggml_tensor *y, ggml_tensor *h, const LoraPack &pack, KernelChoice path);

// The op's work on plain arrays (for tests and benchmarks): out[n][row0 + j] += scale · Σ_k
// up_t[k][j] · h[n][k0 + k] for tokens n < tokens, j < rows, over this thread's share of the rows.
void lora_up_rows(KernelChoice path, ggml_type type, const void *up_t, int64_t rank, int64_t rows,
                  const float *h, int64_t h_stride, float scale, float *out, int64_t out_stride, int64_t tokens,
                  int64_t j0, int64_t j1);

// The down op's work on plain arrays (for tests and benchmarks): h[n][k] = Σ_i down[k][i] · x[n][i]
// for n < tokens, k < ranks; `down` [ranks][in] in `type` (F32, F16, BF16).
void lora_down_rows(KernelChoice path, ggml_type type, const void *down, int64_t in, int64_t ranks, const float *x,
                    int64_t x_stride, float *h, int64_t h_stride, int64_t tokens);

}  // namespace fm
