// FLUX autoencoder (16 latent channels), docs/MODEL.md §5, with tiled decode/encode.
#pragma once

#include "network.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct VaeConfig {
    int64_t z_channels = 0, ch = 0, levels = 0, num_res_blocks = 0, in_channels = 0, out_channels = 0;
    int64_t top_channels = 0;
    std::vector<int64_t> level_channels;  // output channels of each level, level 0 first (ch·ch_mult)
    bool has_encoder = false;
    int64_t scale() const { return int64_t(1) << (levels - 1); }  // image px per latent px
    static VaeConfig infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

struct VaeTiling {
    int mode = -1;           // -1 auto (tile when an untiled pass would need a compute buffer larger
                             // than EngineOptions::vae_budget_mb), 0 off, 1 on
    int tile = 72;           // largest tile side in latent pixels (decode and encode); tiles are
                             // shrunk to cover the image evenly. 72 covers 1024 px (128 latent)
                             // with 2x2 tiles at overlap 16; each tile's decode needs ~1 GiB
    int tile_w = 0;          // largest tile width when it differs from `tile` (then `tile` is the
                             // height); 0: square
    int overlap = -1;        // least overlap of neighbouring tiles in latent pixels (0 <= overlap < tile);
                             // -1: min(16, tile / 4), per axis
};

// Largest latent side the VAE accepts (8192 image pixels), and the smallest tile side.
constexpr int64_t kVaeMaxLatentSide = 1024;
constexpr int64_t kVaeMinTile = 8;

class VaeNet final : public Network {
public:
    VaeNet(Backend &backend, const ComponentWeights &weights, const EngineOptions &options);
    ~VaeNet() override;
    const VaeConfig &config() const;
    ConfigItems config_items() const override { return config().items(); }

    // z [z_channels, h, w] in VAE space -> image [3, 8h, 8w] (unclamped). cancel: the call's
    // token (may be null).
    std::vector<float> decode(const float *z, int64_t h, int64_t w, const VaeTiling &tiling, const CancelToken *cancel);
    // image [3, H, W] in [-1, 1] -> mean [z_channels, H/8, W/8].
    std::vector<float> encode(const float *image, int64_t height, int64_t width, const VaeTiling &tiling,
                              const CancelToken *cancel);

    // What the last decode/encode did (for tests and benchmarks): tiles run (1 = untiled) and the
    // compute buffer of its graph in bytes.
    int last_tiles() const;
    int64_t last_tile() const;    // the largest tile height it allowed, in latent pixels (0: untiled)
    int64_t last_tile_w() const;  // and width
    size_t last_compute_bytes() const;
    // Whether F32/F16 convolutions run fluxmini's CPU kernel (cpu_conv.h) rather than ggml's.
    bool own_conv() const;

private:
    struct Impl;  // layers, graphs and the tiled driver, vae.cpp
    std::unique_ptr<Impl> impl_;
};

}  // namespace fm
