// fluxmini._core.testing: the CPU kernels on their own (tests against numpy references) and the
// micro-benchmarks (benchmarks/). Kept apart from the model bindings; nothing here is an API.
#include "common.h"
#include "cpu_attention.h"
#include "cpu_conv.h"
#include "cpu_gelu.h"
#include "cpu_norm.h"
#include "cpu_lora.h"
#include "cpu_qmatmul.h"
#include "memory.h"
#include "options.h"
#include "testing.h"

#include <ggml.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <ctime>
#include <optional>
#include <tuple>
#include <thread>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

py::dict memory_policy_dict(const fm::MemoryPolicy &p);  // bind_model.cpp

namespace {
// The quantized matmul's paths, fastest first.
constexpr fm::KernelChoice kQmatmulPaths[] = {fm::KernelChoice::Avx512Vnni, fm::KernelChoice::AvxVnni,
                                              fm::KernelChoice::Avx2, fm::KernelChoice::Portable};

ggml_type qmatmul_type(const std::string &name) {
    return name == "q4_0" ? GGML_TYPE_Q4_0 : name == "q4_1" ? GGML_TYPE_Q4_1 : name == "q8_0" ? GGML_TYPE_Q8_0 : GGML_TYPE_COUNT;
}

// The quantized-matmul path called `name` (one of kQmatmulPaths; "auto" and "ggml" are not paths).
bool qmatmul_path_named(const std::string &name, fm::KernelChoice *path) {
    fm::KernelChoice c;
    if (!fm::parse_kernel_choice(name.c_str(), &c)) return false;
    for (fm::KernelChoice p : kQmatmulPaths)
        if (p == c) {
            *path = c;
            return true;
        }
    return false;
}

// fn(0 .. threads-1), fn(0) on the calling thread.
template <class Fn> void run_threads(int threads, Fn &&fn) {
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back([&fn, t] { fn(t); });
    fn(0);
    for (auto &th : pool) th.join();
}

// The convolution path a test asks for (name: avx512, avx2, portable), or the engine's.
fm::ConvPath conv_path_arg(const char *fn, const std::optional<std::string> &kernels) {
    if (!kernels) return fm::conv_engine_path();
    for (fm::ConvPath p : {fm::ConvPath::Avx512, fm::ConvPath::Avx2, fm::ConvPath::Portable})
        if (*kernels == fm::conv_path_name(p) && fm::conv_path_supported(p)) return p;
    fm::fail_value("%s: kernels '%s' is not a path this CPU runs (avx512, avx2, portable)", fn, kernels->c_str());
}
fm::NormPath norm_path_arg(const char *fn, const std::optional<std::string> &kernels) {
    if (!kernels) return fm::norm_engine_path();
    for (fm::NormPath p : {fm::NormPath::Avx2, fm::NormPath::Portable})
        if (*kernels == fm::norm_path_name(p) && fm::norm_path_supported(p)) return p;
    fm::fail_value("%s: kernels '%s' is not a path this CPU runs (avx2, portable)", fn, kernels->c_str());
}
}  // namespace

void bind_testing(py::module_ &m) {
    using f32_array = py::array_t<float, py::array::c_style | py::array::forcecast>;
    // Micro-benchmarks for benchmarks/bench_flux.py: (wall seconds, process CPU seconds) of one op,
    // medians of reps.
    m.def("read_memory_limits", [](const std::string &root) {
        const fm::MemoryLimits l = fm::read_memory_limits(root);
        return py::make_tuple(l.cgroup_bytes, l.cgroup_source, l.available_bytes);
    }, py::arg("root"), "(cgroup limit bytes or 0, its file, MemAvailable bytes) as read under root");
    m.def("parse_cgroup_limit", &fm::parse_cgroup_limit);
    m.def("memory_policy", [](uint64_t max_memory_mb, uint64_t cgroup_bytes, uint64_t available_bytes,
                              uint64_t weight_bytes) {
        fm::EngineOptions o = fm::engine_default_params();
        o.max_memory_mb = size_t(max_memory_mb);
        fm::MemoryLimits l;
        l.cgroup_bytes = cgroup_bytes;
        l.cgroup_source = cgroup_bytes ? "cgroup" : "";
        l.available_bytes = available_bytes;
        return memory_policy_dict(fm::memory_policy(o, l, weight_bytes));
    });
    m.def("bench_mul_mat", [](const std::string &type, int64_t k, int64_t n, int64_t tokens, int threads, int reps,
                              bool ggml_only) {
        py::gil_scoped_release nogil;
        const fm::BenchTime t = fm::bench_mul_mat(type, k, n, tokens, threads, reps, ggml_only);
        return std::make_pair(t.wall, t.cpu);
    }, py::arg("type"), py::arg("k"), py::arg("n"), py::arg("tokens"), py::arg("threads"), py::arg("reps") = 3,
       py::arg("ggml_only") = false);
    // kernels: None (the engine's choice), "ggml" (ggml's flash attention) or a path of ours.
    m.def("bench_attention", [](int64_t d, int64_t heads, int64_t tokens, bool flash, int threads, int reps,
                                std::optional<std::string> kernels) {
        py::gil_scoped_release nogil;
        const fm::BenchTime t = fm::bench_attention(d, heads, tokens, flash, threads, reps, kernels.value_or(""));
        return std::make_pair(t.wall, t.cpu);
    }, py::arg("d"), py::arg("heads"), py::arg("tokens"), py::arg("flash"), py::arg("threads"), py::arg("reps") = 3,
       py::arg("kernels") = py::none());
    // The fused attention kernel on its own, for tests against numpy: q [Lq, H, d], k and v
    // [Lk, H, d] (any strides with d contiguous: views of a fused qkv work), mask None, [Lq, Lk] or
    // [H', Lq, Lk] (H % H' == 0) added to the scaled scores -> [Lq, H, d]; the work split over
    // `threads` threads as the graph op splits it, on path `kernels` (default: the fastest here).
    m.def("attention", [](py::array_t<float, py::array::forcecast> q, py::array_t<float, py::array::forcecast> k,
                          py::array_t<float, py::array::forcecast> v, std::optional<f32_array> mask, float scale,
                          int threads, std::optional<std::string> kernels) {
        fm::AttnPath path = fm::AttnPath::Portable;
        for (fm::AttnPath p : {fm::AttnPath::Avx512, fm::AttnPath::Avx2})
            if (fm::attention_path_supported(p)) { path = p; break; }
        if (kernels && (!fm::parse_attention_path(kernels->c_str(), &path) || path == fm::AttnPath::Ggml ||
                        !fm::attention_path_supported(path)))
            fm::fail_value("attention: kernels '%s' is not a path this CPU runs (avx512, avx2, portable)", kernels->c_str());
        auto rows_ok = [](const py::array &a) {
            return a.ndim() == 3 && a.strides(2) == sizeof(float) && a.strides(0) % sizeof(float) == 0 &&
                   a.strides(1) % sizeof(float) == 0 && a.strides(0) >= 0 && a.strides(1) >= 0;
        };
        if (!rows_ok(q) || !rows_ok(k) || !rows_ok(v) || k.shape(1) != q.shape(1) || v.shape(1) != q.shape(1) ||
            k.shape(2) != q.shape(2) || v.shape(2) != q.shape(2) || v.shape(0) != k.shape(0) || threads < 1 ||
            q.shape(0) < 1 || k.shape(0) < 1 || q.shape(1) < 1 || q.shape(2) < 1)
            fm::fail_value("attention takes q [Lq, H, d], k and v [Lk, H, d] with d contiguous, threads >= 1");
        const int64_t lq = q.shape(0), heads = q.shape(1), d = q.shape(2), lk = k.shape(0);
        fm::AttnArgs a{};
        const int64_t f = sizeof(float);
        a.q = q.data(), a.k = k.data(), a.v = v.data();
        a.q_row = q.strides(0) / f, a.q_head = q.strides(1) / f;
        a.k_row = k.strides(0) / f, a.k_head = k.strides(1) / f;
        a.v_row = v.strides(0) / f, a.v_head = v.strides(1) / f;
        if (mask) {
            const int64_t hm = mask->ndim() == 3 ? mask->shape(0) : 1;
            if ((mask->ndim() != 2 && mask->ndim() != 3) || mask->shape(mask->ndim() - 2) != lq ||
                mask->shape(mask->ndim() - 1) != lk || hm < 1 || heads % hm)
                fm::fail_value("mask must be [Lq, Lk] or [H', Lq, Lk] with H a multiple of H'");
            a.mask = mask->data(), a.mask_row = lk, a.mask_head = lq * lk, a.mask_heads = hm;
        }
        a.d = d, a.heads = heads, a.lq = lq, a.lk = lk, a.scale = scale;
        f32_array out({lq, heads, d});
        a.out = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) { fm::attention_f32(path, a, t, threads); });
        }
        return out;
    }, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("mask") = py::none(), py::arg("scale") = 1.0f,
       py::arg("threads") = 1, py::arg("kernels") = py::none());
    // The fused attention's paths this CPU runs, fastest first (always ending in "portable"), and
    // the one a model loaded now would use ("ggml": ggml's flash attention).
    m.def("attention_paths", [] {
        std::vector<std::string> out;
        for (fm::AttnPath p : {fm::AttnPath::Avx512, fm::AttnPath::Avx2, fm::AttnPath::Portable})
            if (fm::attention_path_supported(p)) out.push_back(fm::attention_path_name(p));
        return out;
    });
    m.def("attention_engine_path", [] {
        const fm::EngineOptions o = fm::engine_options_from_env();
        fm::qmatmul_engine_path(o.kernels);  // a forced path this CPU lacks is an error, as at load
        return std::string(fm::attention_path_name(o.own_attention ? fm::attention_engine_path(o.kernels) : fm::AttnPath::Ggml));
    });
    // The CPU convolution kernel on its own, for tests against a numpy reference: x [Cin, H, W],
    // kernel [Cout, Cin, k, k] (torch's layout), bias [Cout] or None -> [Cout, OH, OW]; the
    // output pixels are split over `threads` threads as the graph op splits them; on path
    // `kernels` (default: the engine's). A float16 kernel runs as F16 (as F16 VAE files do).
    m.def("conv2d_f32", [](f32_array x, py::array kernel_in, std::optional<f32_array> bias, int stride, int pad,
                           int threads, std::optional<std::string> kernels) {
        using f16_array = py::array_t<uint16_t, py::array::c_style>;
        const bool f16 = kernel_in.dtype().is(py::dtype("float16"));
        f16_array kernel16 =
            f16 ? f16_array(py::module_::import("numpy").attr("ascontiguousarray")(kernel_in).attr("view")("uint16"))
                : f16_array();
        f32_array kernel32 = f16 ? f32_array() : f32_array::ensure(kernel_in);
        if (!f16 && !kernel32) fm::fail_value("conv2d_f32: the kernel must be a float32 or float16 array");
        const py::array &kernel = f16 ? static_cast<const py::array &>(kernel16) : kernel32;
        const fm::ConvPath path = conv_path_arg("conv2d_f32", kernels);
        if (x.ndim() != 3 || kernel.ndim() != 4 || kernel.shape(1) != x.shape(0) || kernel.shape(2) != kernel.shape(3))
            fm::fail_value("conv2d_f32 takes x [Cin, H, W] and kernel [Cout, Cin, k, k]");
        const int64_t cin = x.shape(0), h = x.shape(1), w = x.shape(2), cout = kernel.shape(0), k = kernel.shape(2);
        if (bias && (bias->ndim() != 1 || bias->shape(0) != cout)) fm::fail_value("bias must be [Cout]");
        if (stride < 1 || pad < 0 || threads < 1 || h + 2 * pad < k || w + 2 * pad < k)
            fm::fail_value("bad stride, padding or thread count");
        const int64_t oh = (h + 2 * pad - k) / stride + 1, ow = (w + 2 * pad - k) / stride + 1;
        f32_array out({cout, oh, ow});
        const fm::ConvKernel kp = f16 ? fm::ConvKernel{nullptr, reinterpret_cast<const ggml_fp16_t *>(kernel16.data())}
                                      : fm::ConvKernel{kernel32.data(), nullptr};
        const float *xp = x.data(), *bp = bias ? bias->data() : nullptr;
        float *op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) { fm::conv2d_f32(kp, xp, bp, op, w, h, cin, cout, k, stride, pad, t, threads, path); });
        }
        return out;
    }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("stride") = 1, py::arg("pad") = 0, py::arg("threads") = 1,
       py::arg("kernels") = py::none());
    // GroupNorm (+ scale and shift, + SiLU) on its own, for tests: x [C, H, W], gamma and beta [C]
    // or None -> [C, H, W]; groups split over `threads` threads as the graph op splits them; on
    // path `kernels` (default: the engine's).
    m.def("group_norm_f32", [](f32_array x, std::optional<f32_array> gamma, std::optional<f32_array> beta, int groups,
                               float eps, bool silu, int threads, std::optional<std::string> kernels) {
        const fm::NormPath path = norm_path_arg("group_norm_f32", kernels);
        if (x.ndim() != 3 || groups < 1 || x.shape(0) % groups != 0 || threads < 1)
            fm::fail_value("group_norm_f32 takes x [C, H, W] with C a multiple of groups, threads >= 1");
        const int64_t c = x.shape(0), plane = x.shape(1) * x.shape(2);
        for (const auto *v : {&gamma, &beta})
            if (*v && ((*v)->ndim() != 1 || (*v)->shape(0) != c)) fm::fail_value("gamma and beta must be [C]");
        f32_array out({x.shape(0), x.shape(1), x.shape(2)});
        const float *xp = x.data(), *gp = gamma ? gamma->data() : nullptr, *bp = beta ? beta->data() : nullptr;
        float *op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) { fm::group_norm_f32(xp, gp, bp, op, plane, c, groups, eps, silu, t, threads, path); });
        }
        return out;
    }, py::arg("x"), py::arg("gamma"), py::arg("beta"), py::arg("groups"), py::arg("eps") = 1e-6f,
       py::arg("silu") = false, py::arg("threads") = 1, py::arg("kernels") = py::none());
    // The tanh GELU on its own, for tests: x float32 of any shape -> the same shape; the values
    // split over `threads` threads as the graph op splits them; on path `kernels` (default: the engine's).
    m.def("gelu_tanh_f32", [](f32_array x, int threads, std::optional<std::string> kernels) {
        const fm::NormPath path = norm_path_arg("gelu_tanh_f32", kernels);
        if (threads < 1) fm::fail_value("gelu_tanh_f32: threads must be >= 1");
        f32_array out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
        const int64_t n = x.size();
        const float *xp = x.data();
        float *op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) {
                const int64_t i0 = n * t / threads, i1 = n * (t + 1) / threads;
                fm::gelu_tanh_f32(xp + i0, op + i0, i1 - i0, path);
            });
        }
        return out;
    }, py::arg("x"), py::arg("threads") = 1, py::arg("kernels") = py::none());
    m.def("norm_paths", [] {
        std::vector<std::string> out;
        for (fm::NormPath p : {fm::NormPath::Avx2, fm::NormPath::Portable})
            if (fm::norm_path_supported(p)) out.push_back(fm::norm_path_name(p));
        return out;
    });
    // conv3x3(upsample2x(x)) with padding 1 on its own (the VAE decoder's Upsample2D), for tests:
    // x [Cin, H, W], kernel [Cout, Cin, 3, 3] float32 -> [Cout, 2H, 2W]; as conv2d_f32 above.
    m.def("upsample_conv2d_f32", [](f32_array x, f32_array kernel, std::optional<f32_array> bias, int threads,
                                    std::optional<std::string> kernels) {
        const fm::ConvPath path = conv_path_arg("upsample_conv2d_f32", kernels);
        if (x.ndim() != 3 || kernel.ndim() != 4 || kernel.shape(1) != x.shape(0) || kernel.shape(2) != 3 ||
            kernel.shape(3) != 3 || threads < 1)
            fm::fail_value("upsample_conv2d_f32 takes x [Cin, H, W] and kernel [Cout, Cin, 3, 3], threads >= 1");
        const int64_t cin = x.shape(0), h = x.shape(1), w = x.shape(2), cout = kernel.shape(0);
        if (bias && (bias->ndim() != 1 || bias->shape(0) != cout)) fm::fail_value("bias must be [Cout]");
        f32_array out({cout, 2 * h, 2 * w});
        const fm::ConvKernel kp{kernel.data(), nullptr};
        const float *xp = x.data(), *bp = bias ? bias->data() : nullptr;
        float *op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) { fm::upsample_conv2d_f32(kp, xp, bp, op, w, h, cin, cout, t, threads, path); });
        }
        return out;
    }, py::arg("x"), py::arg("kernel"), py::arg("bias"), py::arg("threads") = 1, py::arg("kernels") = py::none());
    m.def("cpu_conv2d_available", &fm::cpu_conv2d_available);
    // The convolution's paths this CPU runs, fastest first, and the engine's (kernels: default).
    m.def("conv_paths", [] {
        std::vector<std::string> out;
        for (fm::ConvPath p : {fm::ConvPath::Avx512, fm::ConvPath::Avx2, fm::ConvPath::Portable})
            if (fm::conv_path_supported(p)) out.push_back(fm::conv_path_name(p));
        return out;
    });
    m.def("conv_engine_path", [] { return std::string(fm::conv_path_name(fm::conv_engine_path())); });
    // The quantized matmul kernel on its own, for tests: w = ggml Q4_0, Q4_1 or Q8_0 rows as bytes
    // [n, row bytes], x [rows, k] -> [rows, n]; quantization of x and the product split over
    // `threads` threads, on instruction-set path `kernels` (default: the fastest this CPU runs);
    // f16_scales: the activation scales rounded to F16 as ggml stores them.
    m.def("qmatmul", [](const std::string &type_name, py::array_t<uint8_t, py::array::c_style> w, f32_array x,
                        std::optional<f32_array> bias, int threads, std::optional<std::string> kernels,
                        bool f16_scales) {
        const ggml_type type = qmatmul_type(type_name);
        if (type == GGML_TYPE_COUNT) fm::fail_value("qmatmul takes type q4_0, q4_1 or q8_0");
        fm::KernelChoice path = fm::qmatmul_best_path();
        if (kernels) {
            if (!qmatmul_path_named(*kernels, &path))
                fm::fail_value("qmatmul: unknown kernels '%s' (avx512vnni, avxvnni, avx2 or portable)", kernels->c_str());
            if (!fm::qmatmul_path_supported(path))
                fm::fail_value("qmatmul: this CPU lacks %s", fm::qmatmul_path_description(path));
        }
        if (x.ndim() != 2 || w.ndim() != 2 || x.shape(1) % 32 != 0 || size_t(w.shape(1)) != ggml_row_size(type, x.shape(1)) ||
            w.shape(0) % 8 != 0 || threads < 1)
            fm::fail_value("qmatmul takes w [n, row bytes] uint8 (n a multiple of 8) and x [rows, k] (k a multiple of 32)");
        const int64_t rows = x.shape(0), k = x.shape(1), n = w.shape(0);
        if (bias && (bias->ndim() != 1 || bias->shape(0) != n)) fm::fail_value("bias must be [n]");
        std::vector<fm::QuantBlock> xq(size_t(rows * (k / 32)));
        f32_array out({rows, n});
        const uint8_t *wp = w.data();
        const float *xp = x.data(), *bp = bias ? bias->data() : nullptr;
        float *op = out.mutable_data();
        {
            py::gil_scoped_release nogil;
            run_threads(threads, [&](int t) {
                fm::quantize_rows_q8(path, xp, k, rows * t / threads, rows * (t + 1) / threads, xq.data(), f16_scales);
            });
            run_threads(threads, [&](int t) {
                fm::qmatmul(path, type, wp, ggml_row_size(type, k), xq.data(), bp, op, rows, n, k, t, threads);
            });
        }
        return out;
    }, py::arg("type"), py::arg("w"), py::arg("x"), py::arg("bias") = py::none(), py::arg("threads") = 1,
       py::arg("kernels") = py::none(), py::arg("f16_scales") = false);
    // The quantized matmul's instruction-set paths this CPU runs, fastest first (always ending in
    // "portable"; FLUXMINI_CPU_WITHOUT removes paths).
    m.def("qmatmul_paths", [] {
        std::vector<std::string> out;
        for (fm::KernelChoice p : kQmatmulPaths)
            if (fm::qmatmul_path_supported(p)) out.push_back(fm::kernel_choice_name(p));
        return out;
    });
    // The path a model loaded now would use (EngineOptions from FLUXMINI_KERNELS; "ggml" for
    // ggml's matmul; FluxMiniValueError for a bad value or a path this CPU lacks).
    m.def("qmatmul_engine_path", [] {
        return std::string(fm::kernel_choice_name(fm::qmatmul_engine_path(fm::engine_options_from_env().kernels)));
    });
    // Kernel micro-benchmark (benchmarks/bench_qmatmul.py): `reps` runs of quantize + GEMM of a
    // random [k -> n] weight over `rows` rows on one path in the calling thread (threads = 1) or
    // `threads` threads; per run (wall seconds, CPU seconds of the calling thread), so that figures
    // taken on a shared machine can count only the time the thread actually ran.
    m.def("bench_qmatmul", [](const std::string &type_name, int64_t k, int64_t n, int64_t rows, const std::string &kernels,
                              int threads, int reps) {
        const ggml_type type = qmatmul_type(type_name);
        fm::KernelChoice path = fm::KernelChoice::Portable;
        const bool named = qmatmul_path_named(kernels, &path);
        if (type == GGML_TYPE_COUNT || !named || !fm::qmatmul_path_supported(path) || k % 32 || n % 8 || k < 32 || n < 8 ||
            rows < 1 || threads < 1 || reps < 1 || k * n > (int64_t(1) << 28) || k * rows > (int64_t(1) << 28))
            fm::fail_value("bench_qmatmul: bad type, kernels (or one this CPU lacks) or sizes");
        std::vector<float> wf(size_t(k * n)), x(size_t(k * rows)), out(size_t(n * rows));
        uint32_t state = 1;
        auto rnd = [&] { state = state * 1664525u + 1013904223u; return float(int32_t(state >> 8) - (1 << 23)) / float(1 << 23); };
        for (auto &v : wf) v = rnd();
        for (auto &v : x) v = rnd();
        std::vector<uint8_t> w(ggml_row_size(type, k) * size_t(n));
        ggml_quantize_chunk(type, wf.data(), w.data(), 0, n, k, nullptr);
        std::vector<fm::QuantBlock> xq(size_t(rows * (k / 32)));
        std::vector<std::pair<double, double>> times;
        py::gil_scoped_release nogil;
        auto clock = [](clockid_t id) { timespec t; clock_gettime(id, &t); return double(t.tv_sec) + 1e-9 * double(t.tv_nsec); };
        for (int r = 0; r < reps; ++r) {
            const double w0 = clock(CLOCK_MONOTONIC), c0 = clock(CLOCK_THREAD_CPUTIME_ID);
            run_threads(threads, [&](int t) {
                fm::quantize_rows_q8(path, x.data(), k, rows * t / threads, rows * (t + 1) / threads, xq.data());
            });
            run_threads(threads, [&](int t) {
                fm::qmatmul(path, type, w.data(), ggml_row_size(type, k), xq.data(), nullptr, out.data(), rows, n, k, t,
                            threads);
            });
            times.emplace_back(clock(CLOCK_MONOTONIC) - w0, clock(CLOCK_THREAD_CPUTIME_ID) - c0);
        }
        return times;
    }, py::arg("type"), py::arg("k"), py::arg("n"), py::arg("rows"), py::arg("kernels"), py::arg("threads") = 1,
       py::arg("reps") = 10);
    // The LoRA down-product kernel on its own, for tests and micro-benchmarks: x [tokens, in], down [ranks, in] (F32 values stored in factor_type: f32, or rounded to
    // f16 / bf16) -> (h [tokens, ranks], wall seconds of each of `reps` runs), the tokens split over
    // `threads` threads in tiles of 4 as lora_op splits them; kernels: a path of
    // qmatmul_paths() ("avx512vnni", "avxvnni", "avx2", "portable").
    m.def("lora_down", [](f32_array x, f32_array down, const std::string &factor_type, const std::string &kernels,
                          int threads, int reps) {
        const ggml_type type = factor_type == "f32" ? GGML_TYPE_F32 : factor_type == "f16" ? GGML_TYPE_F16
                               : factor_type == "bf16" ? GGML_TYPE_BF16 : GGML_TYPE_COUNT;
        fm::KernelChoice path = fm::KernelChoice::Portable;
        if (type == GGML_TYPE_COUNT || !qmatmul_path_named(kernels, &path) || !fm::lora_path_ok(path))
            fm::fail_value("lora_down: factor_type f32, f16 or bf16 and a path this CPU runs");
        if (x.ndim() != 2 || down.ndim() != 2 || x.shape(1) != down.shape(1) || threads < 1 || reps < 1)
            fm::fail_value("lora_down takes x [tokens, in] and down [ranks, in]");
        const int64_t tokens = x.shape(0), in = x.shape(1), ranks = down.shape(0);
        std::vector<uint8_t> stored(size_t(ranks * in) * ggml_type_size(type));
        if (type == GGML_TYPE_F16) ggml_fp32_to_fp16_row(down.data(), reinterpret_cast<ggml_fp16_t *>(stored.data()), ranks * in);
        else if (type == GGML_TYPE_BF16) ggml_fp32_to_bf16_row(down.data(), reinterpret_cast<ggml_bf16_t *>(stored.data()), ranks * in);
        else std::memcpy(stored.data(), down.data(), stored.size());
        f32_array h({tokens, ranks});
        const float *xp = x.data();
        float *hp = h.mutable_data();
        std::vector<double> times;
        {
            py::gil_scoped_release nogil;
            const int64_t tiles = (tokens + 3) / 4;
            for (int r = 0; r < reps; ++r) {
                const auto t0 = std::chrono::steady_clock::now();
                run_threads(threads, [&](int t) {
                    const int64_t n0 = std::min(tokens, tiles * t / threads * 4);
                    const int64_t n1 = std::min(tokens, tiles * (t + 1) / threads * 4);
                    if (n0 < n1)
                        fm::lora_down_rows(path, type, stored.data(), in, ranks, xp + n0 * in, in, hp + n0 * ranks, ranks,
                                           n1 - n0);
                });
                times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
        }
        return std::make_tuple(h, times);
    }, py::arg("x"), py::arg("down"), py::arg("factor_type") = "f32", py::arg("kernels") = "portable",
       py::arg("threads") = 1, py::arg("reps") = 1);
    // linear() as the networks call it, F32 weights: x [rows, in], w [out, in], bias [out] or None,
    // adapters [(down [rank, in], up [rows, rank], scale[, row0[, on_output]]), ...] -> [rows, out];
    // factor_type: the adapters' stored type (f32, f16, bf16: values rounded to it); kernels: a
    // FLUXMINI_KERNELS choice (auto, ggml, portable, avx2, avxvnni, avx512vnni).
    m.def("linear", [](f32_array x, f32_array w, std::optional<f32_array> bias, py::list adapters, int threads,
                       const std::string &factor_type, const std::string &kernels) {
        if (x.ndim() != 2 || w.ndim() != 2 || w.shape(1) != x.shape(1))
            fm::fail_value("linear takes x [rows, in] and w [out, in]");
        const int64_t rows = x.shape(0), in = x.shape(1), out = w.shape(0);
        if (bias && (bias->ndim() != 1 || bias->shape(0) != out)) fm::fail_value("bias must be [out]");
        if (threads < 1) fm::fail_value("threads must be positive");
        const ggml_type type = factor_type == "f32" ? GGML_TYPE_F32 : factor_type == "f16" ? GGML_TYPE_F16
                               : factor_type == "bf16" ? GGML_TYPE_BF16 : GGML_TYPE_COUNT;
        if (type == GGML_TYPE_COUNT) fm::fail_value("factor_type must be f32, f16 or bf16");
        fm::KernelChoice choice;
        if (!fm::parse_kernel_choice(kernels.c_str(), &choice)) fm::fail_value("unknown kernels '%s'", kernels.c_str());
        std::vector<f32_array> keep;
        std::vector<fm::AdapterData> ad;
        for (py::handle item : adapters) {
            py::tuple t = py::cast<py::tuple>(item);
            if (t.size() < 3 || t.size() > 5) fm::fail_value("an adapter is (down, up, scale[, row0[, on_output]])");
            keep.push_back(py::cast<f32_array>(t[0]));
            keep.push_back(py::cast<f32_array>(t[1]));
            const f32_array &down = keep[keep.size() - 2], &up = keep.back();
            fm::AdapterData a{down.data(), up.data(), 0, py::cast<float>(t[2])};
            a.row0 = t.size() > 3 ? py::cast<int64_t>(t[3]) : 0;
            a.on_output = t.size() > 4 && py::cast<bool>(t[4]);
            a.type = type;
            if (down.ndim() != 2 || up.ndim() != 2 || down.shape(1) != (a.on_output ? out : in) ||
                up.shape(1) != down.shape(0) || a.row0 < 0 || a.row0 + up.shape(0) > out)
                fm::fail_value("an adapter is (down [rank, in], up [rows, rank], scale[, row0[, on_output]])");
            a.rank = down.shape(0);
            a.rows = up.shape(0);
            ad.push_back(a);
        }
        std::vector<float> y;
        {
            py::gil_scoped_release nogil;
            y = fm::linear_f32(x.data(), rows, in, w.data(), out, bias ? bias->data() : nullptr, ad, threads, choice);
        }
        f32_array res({rows, out});
        std::copy(y.begin(), y.end(), res.mutable_data());
        return res;
    }, py::arg("x"), py::arg("w"), py::arg("bias") = py::none(), py::arg("adapters") = py::list(),
       py::arg("threads") = 1, py::arg("factor_type") = "f32", py::arg("kernels") = "auto");
}
