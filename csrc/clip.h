// CLIP-L text model (OpenAI ViT-L/14 text tower), MODEL.md §6. Sizes come from tensor shapes.
#pragma once

#include "backend.h"
#include "weights.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct ClipConfig {
    int64_t vocab = 0, positions = 0, hidden = 0, heads = 0, layers = 0, mlp = 0;
    static ClipConfig infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

class ClipNet {
public:
    ClipNet(Backend &backend, const ComponentWeights &weights);
    ~ClipNet();
    const ClipConfig &config() const;
    void load();
    void release();
    bool loaded() const;
    size_t weight_bytes() const;

    // ids: `positions` token ids (77); returns the pooled output [hidden] (final-LN state at the
    // first EOS = largest id position).
    std::vector<float> encode(const int32_t *ids, int64_t n);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace fm
