// Compute backends (CPU, CUDA, Metal) and the graph runner every network uses.
//
// Thread-safety: a Backend and everything built on it (parameter stores, graph runners) is used
// by one thread at a time. The Python Model object serialises calls with a mutex.
#pragma once

#include "cpu_attention.h"
#include "options.h"

#include <ggml-backend.h>
#include <ggml.h>

#include <functional>
#include <string>
#include <vector>

namespace fm {

class Backend {
public:
    // name: "cpu", "cuda", "metal" or "auto"; threads <= 0 means physical cores; kernels: which
    // CPU kernels the engine's graphs use (EngineOptions::kernels); own_attention: false keeps
    // ggml's flash attention (EngineOptions::own_attention).
    Backend(const std::string &name, int threads, KernelChoice kernels = KernelChoice::Own, bool own_attention = true);
    ~Backend();
    Backend(const Backend &) = delete;
    Backend &operator=(const Backend &) = delete;

    ggml_backend_t main() const { return main_; }
    ggml_backend_t cpu() const { return cpu_; }
    bool is_cpu() const { return main_ == cpu_; }
    const std::string &name() const { return name_; }
    const std::string &description() const { return description_; }
    int threads() const { return threads_; }
    void set_threads(int threads);

    // Whether Q4_0 / Q4_1 / Q8_0 linear weights use our CPU kernel (cpu_qmatmul.h: the CPU backend,
    // on every x86-64 CPU with AVX2, unless the kernel choice is Ggml) instead of ggml's matmul;
    // such weights stay in place in the file mapping (never repacked). qmatmul_path(): which of its
    // instruction-set paths (KernelChoice::Ggml where none).
    bool own_qmatmul() const { return qmatmul_path_ != KernelChoice::Ggml; }
    KernelChoice qmatmul_path() const { return qmatmul_path_; }
    // Which path of our fused attention (cpu_attention.h) replaces ggml's flash attention; Ggml
    // where none (other backends, FLUXMINI_KERNELS=ggml, FLUXMINI_ATTENTION=ggml, no AVX2).
    AttnPath attention_path() const { return attention_path_; }

    // The CPU buffer type that repacks weights for faster matmul, or nullptr.
    ggml_backend_buffer_type_t repack_buft() const { return repack_buft_; }
    // Whether `weight` (type, shape) would use a repack kernel in a mul_mat with F32 activations.
    bool can_repack(ggml_type type, int64_t ne0, int64_t ne1) const;

    static std::vector<std::string> available();
    static int physical_cores();

private:
    std::string name_, description_;
    ggml_backend_t main_ = nullptr;
    ggml_backend_t cpu_ = nullptr;
    ggml_backend_buffer_type_t repack_buft_ = nullptr;
    int threads_ = 1;
    KernelChoice qmatmul_path_ = KernelChoice::Ggml;
    AttnPath attention_path_ = AttnPath::Ggml;
};

// Marks `t` as the last node of a block while a network builds its graph: with streaming on, the
// graph runner computes the graph in segments that end at marked nodes (docs/ARCHITECTURE.md, "Memory").
// A mark changes nothing in the computation.
void mark_segment_end(ggml_tensor *t);

// Weight streaming for weights used in place from a file mapping (memory.h decides): before a
// segment runs, the pages of the next one's weights are read ahead (MADV_WILLNEED); after it, the
// pages of every weight no later segment of the graph uses are dropped from the process
// (MADV_DONTNEED) and, with `evict`, from the page cache too.
struct StreamSettings {
    bool on = false;
    bool evict = false;
};

// Builds a graph once per "key" (e.g. a resolution), reserves its compute memory once, and runs
// it as often as asked. Inputs and outputs are found by tensor name.
class GraphRunner {
public:
    using BuildFn = std::function<ggml_cgraph *(ggml_context *ctx)>;

    // options: the owner's (profile); they must outlive the runner.
    GraphRunner(Backend &backend, const EngineOptions &options, size_t max_nodes = 8192);
    ~GraphRunner();
    GraphRunner(const GraphRunner &) = delete;
    GraphRunner &operator=(const GraphRunner &) = delete;

    // Makes the graph for `key` current (building and reserving it when the key changed) and
    // allocates its tensors; then set inputs with set_input() and call compute().
    void prepare(const std::string &key, const BuildFn &build);
    void set_input(const char *name, const void *data, size_t nbytes);
    void set_input_f32(const char *name, const std::vector<float> &v) { set_input(name, v.data(), v.size() * 4); }
    void set_input_i32(const char *name, const std::vector<int32_t> &v) { set_input(name, v.data(), v.size() * 4); }
    // Runs the graph; throws Error(Cancelled) when `cancel` (may be null) is or gets cancelled,
    // Error(Interrupted) when Ctrl-C arrives meanwhile (on the main thread).
    void compute(const CancelToken *cancel = nullptr);
    ggml_tensor *tensor(const char *name) const;
    std::vector<float> get_output(const char *name) const;
    // Frees the compute memory and the graph (the next prepare() builds again).
    void release();
    size_t compute_buffer_bytes() const;
    // The node budget of the graphs built from now on (a network sets it once it knows its size).
    void set_max_nodes(size_t n) { max_nodes_ = n; }
    void set_streaming(const StreamSettings &s) { stream_ = s; }
    // Segments of the current graph (1 when nothing is marked or streaming is off), and the bytes
    // of in-place weights the last compute() dropped (tests, benchmarks).
    size_t segments() const { return segments_.size(); }
    size_t dropped_bytes() const { return dropped_bytes_; }

private:
    struct Segment {
        std::vector<std::pair<const void *, size_t>> prefetch;  // weights first used in this segment
        std::vector<std::pair<const void *, size_t>> drop;      // weights last used in this segment
    };
    void plan_segments();
    static size_t sched_size_for(ggml_cgraph *graph);
    void segment_done(size_t k);
    void prefetch_segment(size_t k) const;

    Backend &backend_;
    const EngineOptions &options_;
    size_t max_nodes_;
    std::string key_;
    ggml_context *ctx_ = nullptr;
    ggml_cgraph *graph_ = nullptr;
    ggml_backend_sched_t sched_ = nullptr;
    size_t sched_nodes_ = 0;  // the graph size sched_ was made for
    StreamSettings stream_;
    std::vector<Segment> segments_;
    std::vector<const ggml_tensor *> marks_;  // the nodes that end segments 0 .. n-2, in graph order
    size_t dropped_bytes_ = 0;
};

}  // namespace fm
