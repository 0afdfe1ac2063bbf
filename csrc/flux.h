// FLUX.1 MMDiT (double + single stream blocks), docs/MODEL.md §2-3. Sizes come from tensor shapes.
#pragma once

#include "network.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct FluxConfig {
    int64_t hidden = 0, head_dim = 0, heads = 0, depth = 0, depth_single = 0, mlp_hidden = 0;
    int64_t in_channels = 0, context_dim = 0, vec_dim = 0;
    bool guidance = false;
    static FluxConfig infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

class FluxNet final : public Network {
public:
    // Infers the configuration and checks every tensor's shape; reads no weight data.
    FluxNet(Backend &backend, const ComponentWeights &weights, const EngineOptions &options);
    ~FluxNet() override;
    const FluxConfig &config() const { return cfg_; }
    ConfigItems config_items() const override { return cfg_.items(); }

    // latent [16, h, w] (channel-major float32), txt [n_txt, context_dim], pooled [vec_dim];
    // returns the velocity [16, h, w]. cancel: the call's token (may be null).
    std::vector<float> forward(const float *latent, int64_t h, int64_t w, float sigma, float guidance,
                               const float *txt, int64_t n_txt, const float *pooled, const CancelToken *cancel);

private:
    struct Layers;  // the parameter handles, flux.cpp
    ggml_cgraph *build(ggml_context *ctx, int64_t l_img, int64_t l_txt, bool exact, bool flash, bool kv_f32) const;

    FluxConfig cfg_;
    int64_t temb_dim_ = 256;
    std::unique_ptr<Layers> layers_;
};

}  // namespace fm
