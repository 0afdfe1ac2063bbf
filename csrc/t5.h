// T5 v1.1 encoder (T5-XXL in Flux), MODEL.md §7. Sizes come from tensor shapes.
#pragma once

#include "backend.h"
#include "weights.h"

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

class T5Net {
public:
    T5Net(Backend &backend, const ComponentWeights &weights);
    ~T5Net();
    const T5Config &config() const;
    void load();
    void release();
    bool loaded() const;
    size_t weight_bytes() const;

    // ids [n]; returns the last hidden state [n, d_model] (no attention mask).
    std::vector<float> encode(const int32_t *ids, int64_t n);

private:
    struct Impl;
    std::unique_ptr<Impl> impl_;
};

}  // namespace fm
