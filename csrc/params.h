// The runtime parameters of one network: which type each weight runs in, where it lives
// (in place in the mmap, a repacked CPU buffer, or a backend buffer), and shape checks.
//
// A network declares every parameter with its expected shape (declare), then calls
// materialize() once: nothing is read or copied before all shapes were checked.
#pragma once

#include "backend.h"
#include "weights.h"

#include <ggml.h>

#include <map>
#include <string>
#include <vector>

namespace fm {

enum class ParamKind {
    Matmul,     // Linear weight: stored type (repacked on CPU when a kernel exists)
    Embedding,  // table read with ggml_get_rows: stored type
    F32,        // biases, norm weights, small tables: always F32
    Conv,       // conv kernels: F32 if stored F32 (exact), else F16
};

// Where a parameter lives once materialised, and why (fluxmini info shows it).
enum class Placement { InPlace, Repacked, Converted, Copied, Device };
const char *placement_name(Placement p);

struct PlacementRow {
    Placement where = Placement::InPlace;
    std::string reason;
    int64_t count = 0;
    int64_t bytes = 0;  // bytes the parameter takes where it lives (anonymous memory unless InPlace)
};

class ParamStore {
public:
    ParamStore(Backend &backend, const ComponentWeights &weights);
    ~ParamStore();
    ParamStore(const ParamStore &) = delete;
    ParamStore &operator=(const ParamStore &) = delete;

    // Declares a parameter; `ne` is the expected ggml shape (ne[0] fastest = PyTorch's last dim).
    ggml_tensor *declare(const std::string &name, ParamKind kind, std::initializer_list<int64_t> ne);
    ggml_tensor *declare_optional(const std::string &name, ParamKind kind, std::initializer_list<int64_t> ne);
    // Allocates and fills every declared parameter.
    void materialize();
    // Frees every buffer this store owns (weights used in place stay in the file mapping).
    void release();
    // Where the parameters will live (or live) and why, grouped by (placement, reason); needs no
    // materialize().
    std::vector<PlacementRow> placement() const;

    // True when every big weight is F32: the network then uses the exact activation path.
    bool all_f32() const { return all_f32_; }
    size_t bytes() const { return bytes_; }
    size_t bytes_in_place() const { return bytes_in_place_; }
    size_t bytes_repacked() const { return bytes_repacked_; }
    const ComponentWeights &weights() const { return weights_; }

private:
    struct Entry {
        ggml_tensor *tensor;
        const TensorRef *src;
        ParamKind kind;
    };
    Placement place(const Entry &e, std::string *reason) const;
    Backend &backend_;
    const ComponentWeights &weights_;
    ggml_context *ctx_ = nullptr;
    std::vector<Entry> entries_;
    std::vector<ggml_backend_buffer_t> buffers_;
    bool all_f32_ = true;
    bool materialized_ = false;
    size_t bytes_ = 0, bytes_in_place_ = 0, bytes_repacked_ = 0;
};

// Converts n elements of any supported type to F32 / F16.
void convert_to_f32(ggml_type type, const void *src, float *dst, int64_t n);

}  // namespace fm
