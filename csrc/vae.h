// FLUX autoencoder (16 latent channels), MODEL.md §5, with tiled decode/encode.
#pragma once

#include "backend.h"
#include "weights.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct VaeConfig {
    int64_t z_channels = 0, ch = 0, levels = 0, num_res_blocks = 0, in_channels = 0, out_channels = 0;
    int64_t top_channels = 0;
    bool has_encoder = false;
    static VaeConfig infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

struct VaeTiling {
    int mode = -1;           // -1 auto (tile when an untiled pass would exceed budget), 0 off, 1 on
    int tile = 64;           // tile size in latent pixels
    int overlap = 16;        // overlap in latent pixels
    size_t budget_mb = 1536; // auto mode: largest compute buffer an untiled pass may use
};

class VaeNet {
public:
    VaeNet(Backend &backend, const ComponentWeights &weights);
    ~VaeNet();
    const VaeConfig &config() const;
    void load();
    void release();
    bool loaded() const;
    size_t weight_bytes() const;

    // z [z_channels, h, w] in VAE space -> image [3, 8h, 8w] (unclamped).
    std::vector<float> decode(const float *z, int64_t h, int64_t w, const VaeTiling &tiling);
    // image [3, H, W] in [-1, 1] -> mean [z_channels, H/8, W/8].
    std::vector<float> encode(const float *image, int64_t height, int64_t width, const VaeTiling &tiling);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace fm
