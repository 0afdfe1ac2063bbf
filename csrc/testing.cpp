#include "testing.h"

#include "backend.h"
#include "common.h"
#include "cpu_qmatmul.h"
#include "layers.h"
#include "options.h"
#include "weights.h"

#include <ggml-alloc.h>
#include <ggml-backend.h>
#include <strings.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

namespace fm {

namespace {
double process_cpu_seconds() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    return double(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) + 1e-6 * double(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec);
}

// Median wall-clock seconds and median process CPU seconds (all threads) of one compute.
namespace {
// The weights of a test or benchmark graph: their context and backend buffer, freed together.
struct WeightArena {
    ggml_context *ctx = nullptr;
    ggml_backend_buffer_t buf = nullptr;
    explicit WeightArena(size_t n_tensors) {
        ggml_init_params ip{ggml_tensor_overhead() * n_tensors, nullptr, true};
        ctx = ggml_init(ip);
    }
    void allocate(ggml_backend_buffer_type_t buft, const char *what) {
        buf = ggml_backend_alloc_ctx_tensors_from_buft(ctx, buft);
        if (!buf) fail_runtime("out of memory for the %s", what);
    }
    ~WeightArena() {
        if (buf) ggml_backend_buffer_free(buf);
        ggml_free(ctx);
    }
    WeightArena(const WeightArena &) = delete;
    WeightArena &operator=(const WeightArena &) = delete;
};
}  // namespace

BenchTime median_seconds(GraphRunner &runner, int reps) {
    runner.compute();  // warm-up
    std::vector<double> wall, cpu;
    for (int i = 0; i < std::max(1, reps); ++i) {
        const double c0 = process_cpu_seconds();
        const auto t0 = std::chrono::steady_clock::now();
        runner.compute();
        wall.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        cpu.push_back(process_cpu_seconds() - c0);
    }
    std::sort(wall.begin(), wall.end());
    std::sort(cpu.begin(), cpu.end());
    return {wall[wall.size() / 2], cpu[cpu.size() / 2]};
}

std::vector<float> random_values(size_t n, float scale, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto &x : v) x = dist(rng);
    return v;
}
}  // namespace

BenchTime bench_mul_mat(const std::string &type_name, int64_t k, int64_t n, int64_t m, int threads, int reps,
                        bool ggml_only) {
    ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char *nm = ggml_type_name(ggml_type(t));
        if (nm && strcasecmp(nm, type_name.c_str()) == 0) type = ggml_type(t);
    }
    if (type == GGML_TYPE_COUNT || !is_supported_type(type)) fail_value("unknown tensor type '%s'", type_name.c_str());
    if (k < 1 || n < 1 || m < 1 || k * n > (int64_t(1) << 30) || k * m > (int64_t(1) << 30))
        fail_value("bench_mul_mat sizes out of range");
    if (k % ggml_blck_size(type)) fail_value("k=%lld is not a multiple of %s's block size", (long long)k, type_name.c_str());
    const EngineOptions options = engine_options_from_env();
    Backend backend("cpu", threads, options.kernels);
    WeightArena arena(2);
    ggml_tensor *w = ggml_new_tensor_2d(arena.ctx, type, k, n);
    const bool own = !ggml_only && backend.own_qmatmul() && qmatmul_shape(w);  // placed and used as the engine does
    const bool repack = !own && backend.can_repack(type, k, n);
    arena.allocate(repack ? backend.repack_buft() : ggml_backend_get_default_buffer_type(backend.cpu()),
                   "benchmark weight");
    {
        const std::vector<float> f = random_values(size_t(k * n), 1.0f / std::sqrt(float(k)), 1);
        std::vector<uint8_t> q(ggml_row_size(type, k) * size_t(n));
        if (type == GGML_TYPE_F32) std::memcpy(q.data(), f.data(), q.size());
        else ggml_quantize_chunk(type, f.data(), q.data(), 0, n, k, nullptr);
        ggml_backend_tensor_set(w, q.data(), 0, q.size());
    }
    BenchTime s{};
    {
        GraphRunner runner(backend, options, 16);
        runner.prepare("mm", [&](ggml_context *ctx) {
            ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, k, m);
            ggml_set_name(x, "x");
            ggml_set_input(x);
            ggml_tensor *y = own ? qmatmul_op(ctx, w, x, nullptr, backend.qmatmul_path()) : ggml_mul_mat(ctx, w, x);
            ggml_set_output(y);
            ggml_cgraph *g = ggml_new_graph_custom(ctx, 16, false);
            ggml_build_forward_expand(g, y);
            return g;
        });
        runner.set_input_f32("x", random_values(size_t(k * m), 1.0f, 2));
        s = median_seconds(runner, reps);
    }
    return s;
}

BenchTime bench_attention(int64_t d, int64_t heads, int64_t l, bool flash, int threads, int reps,
                          const std::string &kernels) {
    if (d < 1 || heads < 1 || l < 1 || d * heads * l > (int64_t(1) << 28)) fail_value("bench_attention sizes out of range");
    const EngineOptions options = engine_options_from_env();
    Backend backend("cpu", threads, options.kernels, options.own_attention);
    AttnPath path = backend.attention_path();
    if (!kernels.empty() && (!parse_attention_path(kernels.c_str(), &path) || !attention_path_supported(path)))
        fail_value("bench_attention: kernels '%s' is not ggml or an attention path this CPU runs", kernels.c_str());
    GraphRunner runner(backend, options, 32);
    runner.prepare("fa", [&](ggml_context *ctx) {
        Ops o{ctx};
        o.flash_attn = flash;
        o.attn_path = path;
        o.flash_kv_f32 = backend.is_cpu();  // as FluxNet::forward chooses
        auto in = [&](const char *name) {
            ggml_tensor *t = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, heads, l);
            ggml_set_name(t, name);
            ggml_set_input(t);
            return t;
        };
        ggml_tensor *q = in("q"), *k = in("k"), *v = in("v");
        ggml_tensor *y = attention(o, q, k, v, nullptr, 1.0f / std::sqrt(float(d)));
        ggml_set_output(y);
        ggml_cgraph *g = ggml_new_graph_custom(ctx, 32, false);
        ggml_build_forward_expand(g, y);
        return g;
    });
    for (const char *name : {"q", "k", "v"}) runner.set_input_f32(name, random_values(size_t(d * heads * l), 1.0f, 3));
    return median_seconds(runner, reps);
}

std::vector<float> linear_f32(const float *x, int64_t rows, int64_t in, const float *w, int64_t out, const float *bias,
                              const std::vector<AdapterData> &adapters, int threads, KernelChoice kernels) {
    if (rows < 1 || in < 1 || out < 1) fail_value("linear_f32: empty sizes");
    std::vector<AdapterFactors> factors;
    std::vector<std::vector<uint8_t>> stored;  // the factors in their test type
    for (const AdapterData &a : adapters) {
        AdapterFactors f;
        f.rank = a.rank;
        f.rows = a.rows ? a.rows : out;
        f.row0 = a.row0;
        f.in = a.on_output ? out : in;
        f.on_output = a.on_output;
        f.scale = a.scale;
        f.type = a.type;
        if (a.rank < 1 || f.row0 < 0 || f.row0 + f.rows > out) fail_value("linear_f32: bad adapter rank or rows");
        if (a.type != GGML_TYPE_F32 && a.type != GGML_TYPE_F16 && a.type != GGML_TYPE_BF16)
            fail_value("linear_f32: adapter type must be F32, F16 or BF16");
        for (auto [src, n] : {std::pair{a.down, f.rank * f.in}, std::pair{a.up, f.rows * f.rank}}) {
            stored.emplace_back(size_t(n) * ggml_type_size(a.type));
            void *dst = stored.back().data();
            if (a.type == GGML_TYPE_F16) ggml_fp32_to_fp16_row(src, static_cast<ggml_fp16_t *>(dst), n);
            else if (a.type == GGML_TYPE_BF16) ggml_fp32_to_bf16_row(src, static_cast<ggml_bf16_t *>(dst), n);
            else std::memcpy(dst, src, size_t(n) * sizeof(float));
        }
        f.down = stored[stored.size() - 2].data();
        f.up = stored.back().data();
        factors.push_back(f);
    }
    const EngineOptions options = engine_options_from_env();
    Backend backend("cpu", threads, kernels);
    WeightArena arena(2 + 2 * adapters.size());
    ggml_context *wctx = arena.ctx;
    Linear p;
    p.w = ggml_new_tensor_2d(wctx, GGML_TYPE_F32, in, out);
    if (bias) p.b = ggml_new_tensor_1d(wctx, GGML_TYPE_F32, out);
    std::vector<std::pair<ggml_tensor *, std::vector<uint8_t>>> uploads;
    const std::vector<LoraPack> packs = pack_adapters(wctx, factors, uploads);
    p.adapters = &packs;
    arena.allocate(ggml_backend_get_default_buffer_type(backend.cpu()), "test weights");
    std::vector<float> y;
    {
        ggml_backend_tensor_set(p.w, w, 0, ggml_nbytes(p.w));
        if (bias) ggml_backend_tensor_set(p.b, bias, 0, ggml_nbytes(p.b));
        for (auto &u : uploads) ggml_backend_tensor_set(u.first, u.second.data(), 0, ggml_nbytes(u.first));
        const size_t nodes = 16 + kNodesPerAdapter * adapters.size();
        GraphRunner runner(backend, options, nodes);
        runner.prepare("linear", [&](ggml_context *ctx) {
            ggml_tensor *xt = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, in, rows);
            ggml_set_name(xt, "x");
            ggml_set_input(xt);
            ggml_tensor *yt = linear(Ops(ctx, backend), xt, p);
            ggml_set_name(yt, "y");
            ggml_set_output(yt);
            ggml_cgraph *g = ggml_new_graph_custom(ctx, nodes, false);
            ggml_build_forward_expand(g, yt);
            return g;
        });
        runner.set_input("x", x, size_t(rows * in) * sizeof(float));
        runner.compute();
        y = runner.get_output("y");
    }
    return y;
}

}  // namespace fm
