// The extension module fluxmini._core: error translation and module-level functions.
#include "backend.h"
#include "common.h"
#include "flux.h"

#include <ggml-cpu.h>
#include <ggml.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

void bind_model(py::module_ &m);

PYBIND11_MODULE(_core, m) {
    m.doc() = "fluxmini's C++ engine on ggml";
    fm::install_ggml_hooks();

    // fm::Error becomes the matching class of fluxmini.errors.
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const fm::Error &e) {
            py::module_ errors = py::module_::import("fluxmini.errors");
            const char *cls = "FluxMiniRuntimeError";
            switch (e.kind()) {
                case fm::ErrorKind::Value: cls = "FluxMiniValueError"; break;
                case fm::ErrorKind::File: cls = "FluxMiniFileError"; break;
                case fm::ErrorKind::Cancelled: cls = "Cancelled"; break;
                default: break;
            }
            py::object type = errors.attr(cls);
            PyErr_SetString(type.ptr(), e.what());
        } catch (const std::bad_alloc &) {
            py::module_ errors = py::module_::import("fluxmini.errors");
            PyErr_SetString(errors.attr("FluxMiniRuntimeError").ptr(),
                            "out of memory; try a smaller image, VAE tiling, or a smaller quantization");
        }
    });

    m.def("available_backends", &fm::Backend::available, "Backends this build of ggml provides.");
    m.def("physical_cores", &fm::Backend::physical_cores);
    m.def("set_verbosity", &fm::set_verbosity);
    m.def("cpu_features", []() {
        py::dict d;
        d["avx2"] = bool(ggml_cpu_has_avx2());
        d["avx512"] = bool(ggml_cpu_has_avx512());
        d["f16c"] = bool(ggml_cpu_has_f16c());
        d["fma"] = bool(ggml_cpu_has_fma());
        d["neon"] = bool(ggml_cpu_has_neon());
        return d;
    });
    // Micro-benchmarks for benchmarks/bench_flux.py: (wall seconds, process CPU seconds) of one op,
    // medians of reps.
    m.def("bench_mul_mat", [](const std::string &type, int64_t k, int64_t n, int64_t tokens, int threads, int reps) {
        py::gil_scoped_release nogil;
        const fm::BenchTime t = fm::bench_mul_mat(type, k, n, tokens, threads, reps);
        return std::make_pair(t.wall, t.cpu);
    }, py::arg("type"), py::arg("k"), py::arg("n"), py::arg("tokens"), py::arg("threads"), py::arg("reps") = 3);
    m.def("bench_attention", [](int64_t d, int64_t heads, int64_t tokens, bool flash, int threads, int reps) {
        py::gil_scoped_release nogil;
        const fm::BenchTime t = fm::bench_attention(d, heads, tokens, flash, threads, reps);
        return std::make_pair(t.wall, t.cpu);
    }, py::arg("d"), py::arg("heads"), py::arg("tokens"), py::arg("flash"), py::arg("threads"), py::arg("reps") = 3);
    bind_model(m);
}
