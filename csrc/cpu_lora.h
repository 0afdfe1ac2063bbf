// The second product of run-time LoRA adapters on the CPU, as a ggml custom op:
//   y[row0 + j, n] += scale · Σ_k up[j, k] · h[k, n]      (h = down · x, computed by ggml)
// with `up` stored TRANSPOSED (upᵀ: rank rows of `rows` values, in the factors' own type F32,
// F16 or BF16), so the inner loop runs along the output rows (thousands long) instead of along the
// rank: ggml's mul_mat would take one dot product of length rank (4-64) per output value, and its
// vector loops barely start at that length (the scalar tail did nearly all the work: +35% per
// Flux step at rank 16, the same at rank 64). Every path accumulates in F32, each output adding
// its terms in the same order (k ascending); the vector paths fuse multiply and add (FMA), so
// they differ from the portable one by float32 rounding only.
#pragma once

#include "common.h"
#include "options.h"

#include <ggml.h>

#include <cstdint>
#include <vector>

namespace fm {

// The adapters of one linear layer that read the same tensor (its input, or its output for
// on_output adapters) and share a factor type, packed: their `down` factors stacked into one
// matrix (one ggml mul_mat, the activation converted once), their upᵀ side by side in one buffer.
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

// y + Σ over the pack's parts of scale · up · h[k0 .. k0 + rank] (into rows row0 .. row0 + rows);
// y F32 [out, tokens...], h F32 [R, tokens...] (made contiguous here). CPU backend only.
ggml_tensor *lora_up_op(ggml_context *ctx, ggml_tensor *y, ggml_tensor *h, const LoraPack &pack, KernelChoice path);

// The op's work on plain arrays (for tests and benchmarks): out[n][row0 + j] += scale · Σ_k
// up_t[k][j] · h[n][k0 + k] for tokens n < tokens, j < rows, over this thread's share of the rows.
void lora_up_rows(KernelChoice path, ggml_type type, const void *up_t, int64_t rank, int64_t rows,
                  const float *h, int64_t h_stride, float scale, float *out, int64_t out_stride, int64_t tokens,
                  int64_t j0, int64_t j1);

}  // namespace fm
