// The extension module fluxmini._core: error translation, module-level functions, the model
// bindings (bind_model.cpp) and the test and benchmark entry points (_core.testing,
// bind_testing.cpp).
#include "backend.h"
#include "common.h"
#include "weights.h"

#include <ggml-cpu.h>
#include <ggml.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;

void bind_model(py::module_ &m);
void bind_testing(py::module_ &m);

PYBIND11_MODULE(_core, m) {
    m.doc() = "fluxmini's C++ engine on ggml";
    fm::install_ggml_hooks();

    // fm::Error becomes the matching class of fluxmini.errors; Ctrl-C during a computation
    // becomes KeyboardInterrupt, as it would have been without the engine's SIGINT handler.
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const fm::Error &e) {
            if (e.kind() == fm::ErrorKind::Interrupted) {
                PyErr_SetString(PyExc_KeyboardInterrupt, e.what());
                return;
            }
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
    m.def("name_rules", &fm::name_rules, "The loader's tensor-name rules (python/fluxmini/data/names.txt).");
    m.def("cpu_features", []() {
        py::dict d;
        d["avx2"] = bool(ggml_cpu_has_avx2());
        d["avx512"] = bool(ggml_cpu_has_avx512());
        d["f16c"] = bool(ggml_cpu_has_f16c());
        d["fma"] = bool(ggml_cpu_has_fma());
        d["neon"] = bool(ggml_cpu_has_neon());
        return d;
    });
    bind_model(m);
    py::module_ testing = m.def_submodule(
        "testing", "Test and benchmark entry points (the CPU kernels on their own, micro-benchmarks); not an API.");
    bind_testing(testing);
}
