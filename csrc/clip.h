// CLIP-L text model (OpenAI ViT-L/14 text tower), docs/MODEL.md §6. Sizes come from tensor shapes.
#pragma once

#include "network.h"

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

class ClipNet final : public Network {
public:
    ClipNet(Backend &backend, const ComponentWeights &weights, const EngineOptions &options);
    ~ClipNet() override;
    const ClipConfig &config() const { return cfg_; }
    ConfigItems config_items() const override { return cfg_.items(); }

    // ids: `positions` token ids (77); returns the pooled output [hidden] (final-LN state at the
    // first EOS = largest id position). cancel: the call's token (may be null).
    std::vector<float> encode(const int32_t *ids, int64_t n, const CancelToken *cancel);

private:
    struct Layers;  // the parameter handles, clip.cpp
    ggml_cgraph *build(ggml_context *ctx) const;

    ClipConfig cfg_;
    std::unique_ptr<Layers> layers_;
};

}  // namespace fm
