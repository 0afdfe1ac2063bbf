// T5 v1.1 encoder (T5-XXL in Flux), docs/MODEL.md §7. Sizes come from tensor shapes.
#pragma once

#include "network.h"

#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace fm {

struct T5Config {
    int64_t vocab = 0, d_model = 0, heads = 0, d_kv = 0, d_ff = 0, layers = 0, buckets = 0;
    static T5Config infer(const ComponentWeights &w);
    std::vector<std::pair<std::string, int64_t>> items() const;
};

class T5Net final : public Network {
public:
    T5Net(Backend &backend, const ComponentWeights &weights, const EngineOptions &options);
    ~T5Net() override;
    const T5Config &config() const { return cfg_; }
    ConfigItems config_items() const override { return cfg_.items(); }

    // ids [n]; returns the last hidden state [n, d_model] (no attention mask). cancel: the
    // call's token (may be null).
    // sdcpp: stable-diffusion.cpp's arithmetic where it differs (docs/MODEL.md §4.7): F16 activation
    // scales, wo's input scaled by 1/32 and its output by 32.
    std::vector<float> encode(const int32_t *ids, int64_t n, const CancelToken *cancel, bool sdcpp = false);

private:
    struct Layers;  // the parameter handles, t5.cpp
    ggml_cgraph *build(ggml_context *ctx, int64_t n, bool sdcpp) const;
    const std::vector<int32_t> &bucket_indices(int64_t n);

    T5Config cfg_;
    std::unique_ptr<Layers> layers_;
    std::vector<int32_t> buckets_;  // bucket index per (query, key), for the current length
    int64_t buckets_len_ = 0;
};

}  // namespace fm
