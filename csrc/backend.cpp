#include "backend.h"

#include "common.h"
#include "cpu_qmatmul.h"
#include "weights.h"

#include <ggml-cpu.h>

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <unordered_map>
#include <unordered_set>
#include <thread>
#include <utility>

namespace fm {

int Backend::physical_cores() {
    // Count distinct (physical id, core id) pairs; fall back to the logical count.
    std::ifstream f("/proc/cpuinfo");
    std::set<std::pair<std::string, std::string>> cores;
    std::string line, phys = "0";
    while (std::getline(f, line)) {
        auto val = [&]() { auto p = line.find(':'); return p == std::string::npos ? std::string() : line.substr(p + 1); };
        if (line.rfind("physical id", 0) == 0) phys = val();
        else if (line.rfind("core id", 0) == 0) cores.insert({phys, val()});
    }
    int n = int(cores.size());
    if (n <= 0) n = int(std::thread::hardware_concurrency());
    return n > 0 ? n : 1;
}

std::vector<std::string> Backend::available() {
    std::vector<std::string> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        std::string n = ggml_backend_reg_name(ggml_backend_dev_backend_reg(d));
        for (auto &c : n) c = char(std::tolower(c));
        if (n == "cpu" || n == "cuda" || n == "metal") {
            bool seen = false;
            for (auto &o : out) seen |= o == n;
            if (!seen) out.push_back(n);
        }
    }
    return out;
}

static ggml_backend_dev_t find_device(const std::string &reg_name) {
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t d = ggml_backend_dev_get(i);
        std::string n = ggml_backend_reg_name(ggml_backend_dev_backend_reg(d));
        for (auto &c : n) c = char(std::tolower(c));
        if (n == reg_name) return d;
    }
    return nullptr;
}

Backend::Backend(const std::string &name_in, int threads, KernelChoice kernels, bool own_attention) {
    install_ggml_hooks();
    std::string name = name_in;
    for (auto &c : name) c = char(std::tolower(c));
    if (name != "cpu" && name != "cuda" && name != "metal" && name != "auto")
        fail_value("unknown backend '%s'; choose cpu, cuda, metal or auto", name_in.c_str());
    ggml_backend_dev_t cpu_dev = find_device("cpu");
    if (!cpu_dev) fail_runtime("the ggml library has no CPU backend; reinstall fluxmini");
    cpu_ = ggml_backend_dev_init(cpu_dev, nullptr);
    if (!cpu_) fail_runtime("could not start ggml's CPU backend");

    ggml_backend_dev_t dev = nullptr;
    if (name == "auto") {
        for (const char *n : {"cuda", "metal"})
            if ((dev = find_device(n))) { name = n; break; }
        if (!dev) name = "cpu";
    } else if (name != "cpu") {
        dev = find_device(name);
        if (!dev) {
            ggml_backend_free(cpu_);
            std::string have;
            for (auto &a : available()) have += (have.empty() ? "" : ", ") + a;
            fail_runtime("this fluxmini build has no %s backend (available: %s); rebuild it against a ggml "
                         "built with %s (see README, 'GPU builds') or use backend=\"cpu\"",
                         name.c_str(), have.c_str(), name == "cuda" ? "-DGGML_CUDA=ON" : "-DGGML_METAL=ON");
        }
    }
    if (dev) {
        main_ = ggml_backend_dev_init(dev, nullptr);
        if (!main_) {
            ggml_backend_free(cpu_);
            fail_runtime("could not start the %s backend (is a GPU present and its driver loaded?)", name.c_str());
        }
        description_ = ggml_backend_dev_description(dev);
    } else {
        main_ = cpu_;
        description_ = ggml_backend_dev_description(cpu_dev);
    }
    name_ = name;

    // ggml's repacking CPU buffer type (an "extra" buffer type of the CPU device).
    ggml_backend_reg_t cpu_reg = ggml_backend_dev_backend_reg(cpu_dev);
    auto get_extra = reinterpret_cast<ggml_backend_dev_get_extra_bufts_t>(
        ggml_backend_reg_get_proc_address(cpu_reg, "ggml_backend_dev_get_extra_bufts"));
    if (get_extra) {
        for (ggml_backend_buffer_type_t *b = get_extra(cpu_dev); b && *b; ++b)
            if (std::strstr(ggml_backend_buft_name(*b), "REPACK")) repack_buft_ = *b;
    }
    const KernelChoice qmatmul = qmatmul_engine_path(kernels);  // checks the choice on any backend
    qmatmul_path_ = is_cpu() ? qmatmul : KernelChoice::Ggml;
    attention_path_ = is_cpu() && own_attention ? attention_engine_path(kernels) : AttnPath::Ggml;
    set_threads(threads);
}

Backend::~Backend() {
    if (main_ && main_ != cpu_) ggml_backend_free(main_);
    if (cpu_) ggml_backend_free(cpu_);
}

void Backend::set_threads(int threads) {
    if (threads <= 0) threads = physical_cores();
    if (threads > 512) fail_value("threads=%d is too many", threads);
    threads_ = threads;
    ggml_backend_cpu_set_n_threads(cpu_, threads);
}

bool Backend::can_repack(ggml_type type, int64_t ne0, int64_t ne1) const {
    if (!repack_buft_ || !is_cpu()) return false;
    // Ask the CPU device whether a mul_mat with this weight in a repack buffer is supported,
    // the way the weight would be used (F32 activations of a few rows).
    ggml_init_params ip{ggml_tensor_overhead() * 4, nullptr, true};
    ggml_context *ctx = ggml_init(ip);
    ggml_tensor *w = ggml_new_tensor_2d(ctx, type, ne0, ne1);
    ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, ne0, 64);
    ggml_tensor *op = ggml_mul_mat(ctx, w, x);
    ggml_backend_buffer_t dummy = ggml_backend_buft_alloc_buffer(repack_buft_, 0);
    w->buffer = dummy;
    bool ok = ggml_backend_dev_supports_op(ggml_backend_get_device(cpu_), op);
    w->buffer = nullptr;
    ggml_backend_buffer_free(dummy);
    ggml_free(ctx);
    return ok;
}

// ---------------------------------------------------------------------------------------------

GraphRunner::GraphRunner(Backend &backend, const EngineOptions &options, size_t max_nodes)
    : backend_(backend), options_(options), max_nodes_(max_nodes) {}

GraphRunner::~GraphRunner() { release(); }

void GraphRunner::release() {
    if (sched_) ggml_backend_sched_free(sched_);
    sched_ = nullptr;
    if (ctx_) ggml_free(ctx_);
    ctx_ = nullptr;
    graph_ = nullptr;
    key_.clear();
    segments_.clear();
    marks_.clear();
}

namespace {
constexpr const char *kSegmentEnd = "fm.segment_end";
}

void mark_segment_end(ggml_tensor *t) {
    if (t && t->name[0] == '\0') ggml_set_name(t, kSegmentEnd);
}

// Splits the graph at its marked nodes and lists, per segment, the in-place weights (tensors whose
// data lies in a live file mapping) it uses first and last.
void GraphRunner::plan_segments() {
    segments_.clear();
    marks_.clear();
    if (!stream_.on || !graph_) return;
    struct Use {
        size_t first, last;
        size_t nbytes;
        bool rows_only;  // read by get_rows only: a few rows of a table, not worth reading ahead
    };
    std::unordered_map<const void *, Use> uses;
    std::vector<const void *> order;
    size_t seg = 0;
    const int n = ggml_graph_n_nodes(graph_);
    for (int i = 0; i < n; ++i) {
        ggml_tensor *node = ggml_graph_node(graph_, i);
        for (int k = 0; k < GGML_MAX_SRC; ++k) {
            const ggml_tensor *src = node->src[k];
            // In-place weights are the tensors whose data lies in a file mapping.
            if (!src || !src->data || (src->flags & GGML_TENSOR_FLAG_INPUT) || !MappedFile::containing(src->data))
                continue;
            const bool rows = node->op == GGML_OP_GET_ROWS && k == 0;
            auto it = uses.find(src->data);
            if (it == uses.end()) {
                uses.emplace(src->data, Use{seg, seg, ggml_nbytes(src), rows});
                order.push_back(src->data);
            } else {
                it->second.last = seg;
                it->second.nbytes = std::max(it->second.nbytes, ggml_nbytes(src));
                it->second.rows_only = it->second.rows_only && rows;
            }
        }
        if (i + 1 < n && std::strcmp(ggml_get_name(node), kSegmentEnd) == 0) {
            marks_.push_back(node);
            ++seg;
        }
    }
    segments_.resize(seg + 1);
    for (const void *d : order) {
        const Use &u = uses[d];
        if (!u.rows_only) segments_[u.first].prefetch.push_back({d, u.nbytes});
        segments_[u.last].drop.push_back({d, u.nbytes});
    }
}

void GraphRunner::prefetch_segment(size_t k) const {
    if (k >= segments_.size()) return;
    for (auto &r : segments_[k].prefetch)
        if (const MappedFile *f = MappedFile::containing(r.first)) f->prefetch_range(r.first, r.second);
}

void GraphRunner::segment_done(size_t k) {
    if (k >= segments_.size()) return;
    for (auto &r : segments_[k].drop) {
        const MappedFile *f = MappedFile::containing(r.first);
        if (!f) continue;
        if (stream_.evict) f->evict_range(r.first, r.second);
        else f->release_range(r.first, r.second);
        dropped_bytes_ += r.second;
    }
    prefetch_segment(k + 2);  // segment k + 1 was read ahead when segment k - 1 ended
}

// A scheduler's graph size must cover the graph's nodes and leaves (ggml asserts it). ggml has no
// accessor for the leaf count: leaves are the distinct inputs without an op (weights, inputs),
// plus the result itself when it has none.
size_t GraphRunner::sched_size_for(ggml_cgraph *graph) {
    const int n_nodes = ggml_graph_n_nodes(graph);
    std::unordered_set<const ggml_tensor *> leaves;
    for (int i = 0; i < n_nodes; ++i) {
        const ggml_tensor *node = ggml_graph_node(graph, i);
        for (const ggml_tensor *src : node->src)
            if (src && src->op == GGML_OP_NONE) leaves.insert(src);
    }
    const size_t need = size_t(n_nodes) + leaves.size() + 1;
    size_t n = 256;
    while (n < need) n *= 2;
    return n;
}

void GraphRunner::prepare(const std::string &key, const BuildFn &build) {
    GgmlAbortGuard guard;
    auto fresh_graph = [&]() {
        if (ctx_) ggml_free(ctx_);
        ctx_ = nullptr;
        graph_ = nullptr;
        ggml_init_params ip{ggml_tensor_overhead() * max_nodes_ + ggml_graph_overhead_custom(max_nodes_, false),
                            nullptr, true};
        ctx_ = ggml_init(ip);
        if (!ctx_) fail_runtime("out of memory while building a graph");
        graph_ = build(ctx_);
    };
    // Splitting a graph across two backends rewrites its nodes' inputs to the scheduler's
    // copies, so a split graph cannot be split again: with a GPU backend every allocation gets
    // a freshly built graph (cheap next to a step). A CPU-only graph is never rewritten and is
    // reused as long as the key stays the same.
    const bool multi_backend = !backend_.is_cpu();
    const bool new_key = !graph_ || key != key_;
    if (new_key) {
        key_.clear();
        fresh_graph();
        // ggml sizes a scheduler's bookkeeping for one split per node of its graph size (about
        // 25 KB a node: 830 MB for the VAE's 32768-node budget, 200 MB for a text encoder's 8192),
        // so on the CPU it is made for the graph at hand, rounded up to a power of two, and remade
        // only when a larger graph comes (docs/FUZZING.md, "Why after_load was slow under ASan").
        // With a GPU backend (not measured) it keeps the node budget, whose margin a split
        // graph's input copies may need.
        const size_t sched_nodes = multi_backend ? max_nodes_ : sched_size_for(graph_);
        if (sched_ && sched_nodes > sched_nodes_) {
            ggml_backend_sched_free(sched_);
            sched_ = nullptr;
        }
        if (!sched_) {
            ggml_backend_t backends[2] = {backend_.main(), backend_.cpu()};
            int n = multi_backend ? 2 : 1;
            sched_ = ggml_backend_sched_new(backends, nullptr, n, sched_nodes, false, true);
            sched_nodes_ = sched_nodes;
        }
        // The scheduler still holds the last graph's tensors in its hash set, sized for one graph.
        ggml_backend_sched_reset(sched_);
        if (!ggml_backend_sched_reserve(sched_, graph_))
            fail_runtime("could not reserve %s memory for the compute graph (out of memory?); try a smaller "
                         "size or VAE tiling",
                         backend_.name().c_str());
        key_ = key;
        plan_segments();
        if (multi_backend) {
            // Ops the GPU backend lacks run on the CPU, with copies at every split: worth seeing.
            int on_cpu = 0;
            for (int i = 0; i < ggml_graph_n_nodes(graph_); ++i)
                if (ggml_backend_sched_get_tensor_backend(sched_, ggml_graph_node(graph_, i)) == backend_.cpu()) ++on_cpu;
            log_info("graph %s: %d nodes (%d on the CPU, %d splits), compute buffer %.1f MiB (built and reserved)",
                     key.c_str(), ggml_graph_n_nodes(graph_), on_cpu, ggml_backend_sched_get_n_splits(sched_),
                     compute_buffer_bytes() / 1048576.0);
        } else {
            log_info("graph %s: %d nodes, compute buffer %.1f MiB (built and reserved)", key.c_str(),
                     ggml_graph_n_nodes(graph_), compute_buffer_bytes() / 1048576.0);
        }
    }
    if (multi_backend) fresh_graph();
    ggml_backend_sched_reset(sched_);
    if (!ggml_backend_sched_alloc_graph(sched_, graph_))
        fail_runtime("could not allocate the compute graph on %s (out of memory?)", backend_.name().c_str());
}

ggml_tensor *GraphRunner::tensor(const char *name) const {
    ggml_tensor *t = graph_ ? ggml_graph_get_tensor(graph_, name) : nullptr;
    if (!t) fail_runtime("internal error: graph tensor '%s' not found", name);
    return t;
}

void GraphRunner::set_input(const char *name, const void *data, size_t nbytes) {
    ggml_tensor *t = tensor(name);
    if (ggml_nbytes(t) != nbytes)
        fail_runtime("internal error: input '%s' needs %zu bytes, got %zu", name, ggml_nbytes(t), nbytes);
    ggml_backend_tensor_set(t, data, 0, nbytes);
}

std::vector<float> GraphRunner::get_output(const char *name) const {
    ggml_tensor *t = tensor(name);
    if (t->type != GGML_TYPE_F32) fail_runtime("internal error: output '%s' is not F32", name);
    std::vector<float> out(size_t(ggml_nelements(t)));
    ggml_backend_tensor_get(t, out.data(), 0, out.size() * 4);
    return out;
}

size_t GraphRunner::compute_buffer_bytes() const {
    if (!sched_) return 0;
    size_t n = 0;
    for (int i = 0; i < ggml_backend_sched_get_n_backends(sched_); ++i)
        n += ggml_backend_sched_get_buffer_size(sched_, ggml_backend_sched_get_backend(sched_, i));
    return n;
}

namespace {
// What aborts a running graph: the call's cancel token, or SIGINT during the compute. While a
// graph runs on the main thread, SIGINT sets this compute's flag (Python's handler would only run
// after the native call returns); the previous handler is restored afterwards and the bindings
// raise KeyboardInterrupt.
struct AbortState {
    const CancelToken *cancel = nullptr;
    std::atomic<bool> sigint{false};
};
std::atomic<std::atomic<bool> *> g_sigint_target{nullptr};
void on_sigint(int) {
    if (std::atomic<bool> *t = g_sigint_target.load()) t->store(true);
}
bool abort_requested(void *data) {
    const auto *s = static_cast<const AbortState *>(data);
    return s->sigint.load() || (s->cancel && s->cancel->cancelled());
}

struct SigintScope {
    struct sigaction old_{};
    bool installed_ = false;
    explicit SigintScope(std::atomic<bool> *flag) {
        if (getpid() != gettid()) return;  // only the main thread owns SIGINT handling
        // A process that ignores SIGINT (started with nohup or in a shell's background, where
        // Python keeps it ignored too) must not be stopped by it during a computation either.
        struct sigaction current{};
        if (sigaction(SIGINT, nullptr, &current) != 0 || current.sa_handler == SIG_IGN) return;
        g_sigint_target.store(flag);
        struct sigaction sa{};
        sa.sa_handler = on_sigint;
        sigemptyset(&sa.sa_mask);
        installed_ = sigaction(SIGINT, &sa, &old_) == 0;
        if (!installed_) g_sigint_target.store(nullptr);
    }
    ~SigintScope() {
        if (!installed_) return;
        sigaction(SIGINT, &old_, nullptr);
        g_sigint_target.store(nullptr);
    }
};
}  // namespace

namespace {
// EngineOptions::profile (FLUXMINI_PROFILE=1): time every node of a graph (the scheduler then runs the nodes one by one,
// so the sum is a little above a normal run) and print the time per op type on stderr.
struct OpProfiler {
    using clock = std::chrono::steady_clock;
    struct Row {
        double seconds = 0, flops = 0;
        int count = 0;
    };
    clock::time_point start;
    std::map<std::string, Row> rows;

    static double flops_of(const ggml_tensor *t) {
        if (t->op == GGML_OP_MUL_MAT) return 2.0 * double(t->src[0]->ne[0]) * double(ggml_nelements(t));
        if (t->op == GGML_OP_FLASH_ATTN_EXT)  // Q·Kᵀ and P·V: 4·d·Lq·Lk·heads
            return 4.0 * double(t->src[0]->ne[0]) * double(t->src[0]->ne[1]) * double(t->src[1]->ne[1]) *
                   double(t->src[0]->ne[2]);
        if (t->op == GGML_OP_CUSTOM && std::strcmp(t->name, "fm.attention") == 0)  // q [d, H, Lq], k [d, H, Lk]
            return 4.0 * double(t->src[0]->ne[0]) * double(t->src[0]->ne[1]) * double(t->src[0]->ne[2]) *
                   double(t->src[1]->ne[2]);
        if (t->op == GGML_OP_CUSTOM && std::strcmp(t->name, "fm.conv") == 0)  // 2·k²·Cin·Cout per output pixel
            return 2.0 * double(ggml_nelements(t->src[1])) * double(t->ne[0]) * double(t->ne[1]);
        if (t->op == GGML_OP_CUSTOM && std::strcmp(t->name, "fm.upconv") == 0)  // 2x2 kernels: 2·4·Cin·Cout a pixel
            return 2.0 * double(ggml_nelements(t->src[1])) * 4.0 / 9.0 * double(t->ne[0]) * double(t->ne[1]);
        return 0;
    }
    static bool eval(ggml_tensor *t, bool ask, void *user) {
        auto *p = static_cast<OpProfiler *>(user);
        if (ask) {
            p->start = clock::now();
            return true;
        }
        std::string key = ggml_op_desc(t);
        if (t->op == GGML_OP_MUL_MAT) {
            const ggml_tensor *w = t->src[0];
            const char *buf = w->buffer ? ggml_backend_buffer_name(w->buffer) : "";
            key += strfmt("(%s%s, n=%lld)", ggml_type_name(w->type), std::strstr(buf, "REPACK") ? " repacked" : "",
                          (long long)(ggml_nelements(t) / t->ne[0]));
        } else if (t->op == GGML_OP_CUSTOM && std::strncmp(t->name, "fm.", 3) == 0) {
            key += strfmt("(%s)", t->name + 3);  // our kernels name their nodes (fm.conv, fm.norm, ...)
        }
        Row &r = p->rows[key];
        r.seconds += std::chrono::duration<double>(clock::now() - p->start).count();
        r.flops += flops_of(t);
        r.count += 1;
        return true;
    }
    void print(const std::string &key) const {
        std::vector<std::pair<std::string, Row>> v(rows.begin(), rows.end());
        std::sort(v.begin(), v.end(), [](const auto &a, const auto &b) { return a.second.seconds > b.second.seconds; });
        double total = 0;
        for (auto &r : v) total += r.second.seconds;
        std::fprintf(stderr, "fluxmini profile of graph %s: %.3f s in %zu op kinds\n", key.c_str(), total, v.size());
        std::fprintf(stderr, "  %9s %6s %6s %9s  %s\n", "ms", "%", "count", "GFLOP/s", "op");
        for (auto &r : v) {
            const Row &x = r.second;
            std::fprintf(stderr, "  %9.1f %6.1f %6d %9s  %s\n", x.seconds * 1e3, 100.0 * x.seconds / total, x.count,
                         x.flops > 0 ? strfmt("%.1f", x.flops / x.seconds / 1e9).c_str() : "", r.first.c_str());
        }
    }
};
}  // namespace

void GraphRunner::compute(const CancelToken *cancel) {
    if (cancel && cancel->cancelled())
        throw Error(ErrorKind::Cancelled, "cancelled (FluxMini.interrupt() or the call's CancelToken)");
    AbortState abort;
    abort.cancel = cancel;
    ggml_backend_cpu_set_abort_callback(backend_.cpu(), abort_requested, &abort);
    const bool profile = options_.profile;
    OpProfiler prof;
    // The scheduler computes the nodes up to each one the callback asks for, then calls it again:
    // the profiler asks for every node, streaming for the marked ends of segments. Either way the
    // nodes run in the same order through the same kernels, so the results are the same bits.
    struct Hooks {
        GraphRunner *runner;
        OpProfiler *prof;
        size_t next_mark = 0;
        bool is_mark(const ggml_tensor *t) const {
            return next_mark < runner->marks_.size() && runner->marks_[next_mark] == t;
        }
        static bool eval(ggml_tensor *t, bool ask, void *user) {
            auto *h = static_cast<Hooks *>(user);
            if (ask) {
                if (h->prof) OpProfiler::eval(t, true, h->prof);
                return h->prof || h->is_mark(t);
            }
            if (h->prof) OpProfiler::eval(t, false, h->prof);
            if (h->is_mark(t)) h->runner->segment_done(h->next_mark++);
            return true;
        }
    } hooks{this, profile ? &prof : nullptr};
    const bool streaming = !segments_.empty();
    dropped_bytes_ = 0;
    if (streaming) {
        prefetch_segment(0);
        prefetch_segment(1);
    }
    if (profile || segments_.size() > 1) ggml_backend_sched_set_eval_callback(sched_, Hooks::eval, &hooks);
    enum ggml_status st;
    {
        SigintScope sig(&abort.sigint);
        st = ggml_backend_sched_graph_compute(sched_, graph_);
    }
    ggml_backend_sched_set_eval_callback(sched_, nullptr, nullptr);
    if (profile && st == GGML_STATUS_SUCCESS) prof.print(key_);
    if (streaming && st == GGML_STATUS_SUCCESS) segment_done(segments_.size() - 1);
    ggml_backend_cpu_set_abort_callback(backend_.cpu(), nullptr, nullptr);
    if (abort.sigint.load()) throw Error(ErrorKind::Interrupted, "interrupted (Ctrl-C)");
    if (st == GGML_STATUS_ABORTED || (cancel && cancel->cancelled()))
        throw Error(ErrorKind::Cancelled, "cancelled (FluxMini.interrupt() or the call's CancelToken)");
    if (st != GGML_STATUS_SUCCESS) fail_runtime("the %s backend failed to compute the graph (status %d)",
                                                backend_.name().c_str(), int(st));
}

}  // namespace fm
