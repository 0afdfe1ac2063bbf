// Python classes fluxmini._core.Model and CancelToken: a thin layer over fm::Model. Long calls
// release the GIL and run under a Model::Call (the model's lock and verbosity) and the caller's
// cancel token. Component names are strings only here, converted by component_arg().
#include "common.h"
#include "model.h"
#include "options.h"

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

namespace py = pybind11;
using namespace fm;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

void need_ndim(const py::array &a, int ndim, const char *what, const char *shape) {
    if (a.ndim() != ndim)
        fail_value("%s must be a %d-D array of shape %s, got %d-D", what, ndim, shape, int(a.ndim()));
}

py::array_t<float> to_numpy(std::vector<float> &&v, std::vector<py::ssize_t> shape) {
    auto *heap = new std::vector<float>(std::move(v));
    py::capsule owner(heap, [](void *p) { delete static_cast<std::vector<float> *>(p); });
    return py::array_t<float>(shape, heap->data(), owner);
}

// The one conversion of a component name from Python.
Component component_arg(const std::string &name) {
    for (Component c : kComponents)
        if (name == component_name(c)) return c;
    fail_value("unknown component '%s'; components are diffusion, clip_l, t5xxl, vae", name.c_str());
}

VaeTiling tiling_from(int mode, int tile, int tile_w, int overlap) {
    VaeTiling t;
    t.mode = mode;
    if (tile > 0) t.tile = tile;
    if (tile_w > 0) t.tile_w = tile_w;
    if (overlap >= 0) t.overlap = overlap;
    return t;
}

// set_adapters' items -> specs; the arrays go into `keep` (alive while the engine copies them).
std::vector<AdapterSpec> adapter_specs(py::list items, std::vector<py::array> &keep) {
    std::vector<AdapterSpec> specs;
    for (py::handle h : items) {
        auto t = h.cast<py::tuple>();
        if (t.size() != 7) fail_value("set_adapters: each adapter is a 7-tuple");
        AdapterSpec a;
        a.target = t[0].cast<std::string>();
        a.row0 = t[1].cast<int64_t>();
        a.on_output = t[2].cast<bool>();
        a.scale = t[3].cast<float>();
        const std::string dt = t[4].cast<std::string>();
        size_t item = 0;
        if (dt == "f32") a.type = GGML_TYPE_F32, item = 4;
        else if (dt == "f16") a.type = GGML_TYPE_F16, item = 2;
        else if (dt == "bf16") a.type = GGML_TYPE_BF16, item = 2;
        else fail_value("set_adapters: dtype must be f32, f16 or bf16, not %s", dt.c_str());
        py::array down = t[5].cast<py::array>(), up = t[6].cast<py::array>();
        for (py::array *arr : {&down, &up})
            if (arr->ndim() != 2 || size_t(arr->itemsize()) != item ||
                !(arr->flags() & py::array::c_style))
                fail_value("set_adapters: the factors of '%s' must be C-contiguous 2-D %s arrays",
                           a.target.c_str(), dt.c_str());
        a.rank = down.shape(0);
        a.in = down.shape(1);
        a.rows = up.shape(0);
        if (up.shape(1) != a.rank)
            fail_value("set_adapters: '%s': up is [%lld, %lld] but down has rank %lld", a.target.c_str(),
                       (long long)up.shape(0), (long long)up.shape(1), (long long)a.rank);
        a.down = down.data();
        a.up = up.data();
        keep.push_back(down);
        keep.push_back(up);
        specs.push_back(std::move(a));
    }
    return specs;
}

}  // namespace

// The policy's fields as a dict (also _core.testing.memory_policy's answer, bind_testing.cpp).
py::dict memory_policy_dict(const MemoryPolicy &p) {
    py::dict d;
    d["budget_bytes"] = p.budget_bytes;
    d["source"] = p.source;
    d["stream"] = p.stream;
    d["evict"] = p.evict;
    d["release_compute"] = p.release_compute;
    d["vae_budget_bytes"] = p.vae_budget_bytes;
    return d;
}

void bind_model(py::module_ &m) {
    py::class_<CancelToken>(m, "CancelToken",
                            "Cancels the engine calls it is passed to, from any thread; stays cancelled.")
        .def(py::init<>())
        .def("cancel", &CancelToken::cancel)
        .def_property_readonly("cancelled", &CancelToken::cancelled);

    py::class_<Model>(m, "Model")
        .def(py::init([](const std::string &path, const std::string &clip_l, const std::string &t5xxl,
                         const std::string &vae, const std::string &backend, int threads,
                         const std::vector<std::string> &components, bool flash_attn, int verbosity,
                         int64_t max_memory_mb) {
                 ModelParams p = model_default_params();
                 p.path = path;
                 p.clip_l = clip_l;
                 p.t5xxl = t5xxl;
                 p.vae = vae;
                 p.backend = backend;
                 p.threads = threads;
                 p.components.clear();
                 for (const std::string &c : components) p.components.push_back(component_arg(c));
                 // The engine's options: read from the environment once, here, at load.
                 p.options = engine_options_from_env();
                 p.options.flash_attn = flash_attn;
                 p.options.verbosity = verbosity;
                 if (max_memory_mb < 0) fail_value("max_memory must be positive (MiB), got %lld", (long long)max_memory_mb);
                 p.options.max_memory_mb = size_t(max_memory_mb);
                 py::gil_scoped_release nogil;
                 return new Model(p);
             }),
             py::arg("path"), py::arg("clip_l") = "", py::arg("t5xxl") = "", py::arg("vae") = "",
             py::arg("backend") = "cpu", py::arg("threads") = 0,
             py::arg("components") = std::vector<std::string>{"diffusion", "clip_l", "t5xxl", "vae"},
             py::arg("flash_attn") = true, py::arg("verbosity") = 0, py::arg("max_memory_mb") = 0)
        .def("info",
             [](Model &self) {
                 py::list out;
                 for (auto &c : self.info()) {
                     py::dict d;
                     d["name"] = c.name;
                     d["present"] = c.present;
                     d["sources"] = c.sources;
                     d["tensors_per_type"] = c.tensors_per_type;
                     d["parameters"] = c.parameters;
                     d["bytes"] = c.bytes;
                     py::dict cfg;
                     for (auto &kv : c.config) cfg[py::str(kv.first)] = kv.second;
                     d["config"] = cfg;
                     out.append(d);
                 }
                 return out;
             })
        .def("memory",
             [](Model &self) {
                 const MemoryPolicy &p = self.memory_policy();
                 const MemoryLimits &l = self.memory_limits();
                 py::dict d = memory_policy_dict(p);
                 d["cgroup_bytes"] = l.cgroup_bytes;
                 d["cgroup_source"] = l.cgroup_source;
                 d["available_bytes"] = l.available_bytes;
                 d["description"] = p.describe();
                 return d;
             },
             "the memory policy (memory.h) and the limits it was made from")
        .def("placement",
             [](Model &self, const std::string &component) {
                 py::list out;
                 for (const PlacementRow &r : self.placement(component_arg(component))) {
                     py::dict d;
                     d["where"] = placement_name(r.where);
                     d["reason"] = r.reason;
                     d["count"] = r.count;
                     d["bytes"] = r.bytes;
                     out.append(d);
                 }
                 return out;
             },
             "where each parameter of a component lives and why: [{where, reason, count, bytes}]")
        .def("stats",
             [](Model &self, const std::string &component) {
                 Network &n = self.net(component_arg(component));
                 py::dict d;
                 d["segments"] = n.stream_segments();
                 d["dropped_bytes"] = n.stream_dropped_bytes();
                 d["compute_bytes"] = n.compute_bytes();
                 d["loaded"] = n.loaded();
                 if (component == "vae") {
                     d["vae_tiles"] = self.vae().last_tiles();
                     d["vae_tile"] = self.vae().last_tile();
                     d["vae_tile_w"] = self.vae().last_tile_w();
                     d["vae_compute_bytes"] = self.vae().last_compute_bytes();
                 }
                 return d;
             },
             "what the component's last computation did (tests, benchmarks)")
        .def_property_readonly("ignored_tensors", &Model::ignored_tensors)
        .def("tensor_table",
             [](Model &self, const std::string &component) {
                 // Reads no tensor data: what the files say (the embedding cache's fingerprint).
                 const ComponentWeights &w = self.component_weights(component_arg(component));
                 py::list out;
                 for (auto &kv : w.tensors) {
                     const TensorRef &t = *kv.second;
                     py::list ne;
                     for (int i = 0; i < t.n_dims; ++i) ne.append(t.ne[i]);
                     out.append(py::make_tuple(kv.first, t.file_name, ggml_type_name(t.type), ne, t.file->path(),
                                               size_t(t.data - t.file->data()), t.nbytes));
                 }
                 return out;
             },
             py::arg("component"),
             "[(bare name, name in the file, type, ne (ggml order), file path, byte offset in the file, bytes)]")
        .def_property_readonly("backend", &Model::backend_name)
        .def_property_readonly("backend_description", &Model::backend_description)
        .def_property_readonly("kernels", &Model::kernels)
        .def_property("threads", &Model::threads, [](Model &self, int n) { self.set_threads(n); })
        .def_property("profile", [](const Model &self) { return self.options().profile; }, &Model::set_profile,
                      "ggml's per-op timings on stderr after every graph (benchmarks)")
        .def("load",
             [](Model &self, const std::string &component) {
                 const Component c = component_arg(component);
                 py::gil_scoped_release nogil;
                 Model::Call call(self);
                 self.net(c).load();
             })
        .def("release",
             [](Model &self, const std::string &component) {
                 const Component c = component_arg(component);
                 py::gil_scoped_release nogil;
                 Model::Call call(self);
                 self.release(c);
             })
        .def("transformer",
             [](Model &self, F32Array latent, float sigma, float guidance, F32Array t5, F32Array pooled,
                const CancelToken *cancel) {
                 need_ndim(latent, 3, "latent", "[16, h, w]");
                 need_ndim(t5, 2, "t5", "[L, context_dim]");
                 need_ndim(pooled, 1, "pooled", "[vec_dim]");
                 const int64_t c = latent.shape(0), h = latent.shape(1), w = latent.shape(2);
                 std::vector<float> out;
                 {
                     py::gil_scoped_release nogil;
                     Model::Call call(self);
                     FluxNet &net = self.flux();
                     self.begin(Component::Diffusion);
                     const FluxConfig &cfg = net.config();
                     if (c != cfg.in_channels / 4)
                         fail_value("latent has %lld channels; this model needs %lld", (long long)c,
                                    (long long)(cfg.in_channels / 4));
                     if (t5.shape(1) != cfg.context_dim)
                         fail_value("t5 states are %lld wide; this model needs %lld", (long long)t5.shape(1),
                                    (long long)cfg.context_dim);
                     if (pooled.shape(0) != cfg.vec_dim)
                         fail_value("pooled has %lld values; this model needs %lld", (long long)pooled.shape(0),
                                    (long long)cfg.vec_dim);
                     out = net.forward(latent.data(), h, w, sigma, guidance, t5.data(), t5.shape(0), pooled.data(),
                                       cancel);
                 }
                 return to_numpy(std::move(out), {c, h, w});
             },
             py::arg("latent"), py::arg("sigma"), py::arg("guidance"), py::arg("t5"), py::arg("pooled"),
             py::arg("cancel") = nullptr)
        .def("encode_clip",
             [](Model &self, I32Array ids, const CancelToken *cancel) {
                 need_ndim(ids, 1, "ids", "[n]");
                 std::vector<float> out;
                 {
                     py::gil_scoped_release nogil;
                     Model::Call call(self);
                     self.begin(Component::ClipL);
                     out = self.clip().encode(ids.data(), ids.shape(0), cancel);
                 }
                 const py::ssize_t n = py::ssize_t(out.size());
                 return to_numpy(std::move(out), {n});
             },
             py::arg("ids"), py::arg("cancel") = nullptr)
        .def("encode_t5",
             [](Model &self, I32Array ids, bool sdcpp, const CancelToken *cancel) {
                 need_ndim(ids, 1, "ids", "[n]");
                 std::vector<float> out;
                 int64_t d = 0;
                 {
                     py::gil_scoped_release nogil;
                     Model::Call call(self);
                     d = self.t5().config().d_model;
                     self.begin(Component::T5xxl);
                     out = self.t5().encode(ids.data(), ids.shape(0), cancel, sdcpp);
                 }
                 return to_numpy(std::move(out), {ids.shape(0), py::ssize_t(d)});
             },
             py::arg("ids"), py::arg("sdcpp") = false, py::arg("cancel") = nullptr)
        .def("vae_decode",
             [](Model &self, F32Array z, int tiling, int tile, int tile_w, int overlap, const CancelToken *cancel) {
                 need_ndim(z, 3, "z", "[16, h, w]");
                 std::vector<float> out;
                 int64_t oc = 0, scale = 1;
                 {
                     py::gil_scoped_release nogil;
                     Model::Call call(self);
                     VaeNet &vae = self.vae();
                     self.begin(Component::Vae);
                     if (z.shape(0) != vae.config().z_channels)
                         fail_value("z has %lld channels; this VAE needs %lld", (long long)z.shape(0),
                                    (long long)vae.config().z_channels);
                     oc = vae.config().out_channels;
                     scale = vae.config().scale();
                     out = vae.decode(z.data(), z.shape(1), z.shape(2), tiling_from(tiling, tile, tile_w, overlap), cancel);
                 }
                 return to_numpy(std::move(out), {py::ssize_t(oc), z.shape(1) * scale, z.shape(2) * scale});
             },
             py::arg("z"), py::arg("tiling") = -1, py::arg("tile") = 0, py::arg("tile_w") = 0, py::arg("overlap") = -1,
             py::arg("cancel") = nullptr)
        .def("vae_encode",
             [](Model &self, F32Array image, int tiling, int tile, int tile_w, int overlap, const CancelToken *cancel) {
                 need_ndim(image, 3, "image", "[3, H, W]");
                 std::vector<float> out;
                 int64_t zc = 0, scale = 1;
                 {
                     py::gil_scoped_release nogil;
                     Model::Call call(self);
                     VaeNet &vae = self.vae();
                     self.begin(Component::Vae);
                     if (image.shape(0) != vae.config().in_channels)
                         fail_value("image has %lld channels; this VAE needs %lld", (long long)image.shape(0),
                                    (long long)vae.config().in_channels);
                     zc = vae.config().z_channels;
                     scale = vae.config().scale();
                     out = vae.encode(image.data(), image.shape(1), image.shape(2), tiling_from(tiling, tile, tile_w, overlap),
                                      cancel);
                 }
                 return to_numpy(std::move(out), {py::ssize_t(zc), image.shape(1) / scale, image.shape(2) / scale});
             },
             py::arg("image"), py::arg("tiling") = -1, py::arg("tile") = 0, py::arg("tile_w") = 0, py::arg("overlap") = -1,
             py::arg("cancel") = nullptr)
        .def("linears",
             [](Model &self, const std::string &component) {
                 const Component c = component_arg(component);
                 py::list out;
                 for (const LinearInfo &l : self.net(c).linears()) out.append(py::make_tuple(l.name, l.in, l.out));
                 return out;
             },
             "[(name, in_features, out_features)] of the component's linear layers (adapter targets)")
        .def("set_adapters",
             [](Model &self, const std::string &component, py::list items, bool merge) {
                 // items: [(target, row0, on_output, scale, dtype "f32"|"f16"|"bf16", down [rank, in],
                 // up [rows, rank])], arrays C-contiguous of that dtype (bf16 as uint16).
                 const Component c = component_arg(component);
                 std::vector<py::array> keep;  // the arrays stay alive while the engine copies them
                 std::vector<AdapterSpec> specs = adapter_specs(items, keep);
                 py::gil_scoped_release nogil;
                 Model::Call call(self);
                 self.net(c).set_adapters(specs, merge);
             },
             py::arg("component"), py::arg("adapters"), py::arg("merge") = false)
        .def("check_adapters",
             [](Model &self, const std::string &component, py::list items, bool merge) {
                 const Component c = component_arg(component);
                 std::vector<py::array> keep;
                 std::vector<AdapterSpec> specs = adapter_specs(items, keep);
                 Model::Call call(self);
                 self.net(c).check_adapters(specs, merge);
             },
             "set_adapters' checks alone (nothing changes)", py::arg("component"), py::arg("adapters"),
             py::arg("merge") = false)
        .def("merged_bytes",
             [](Model &self, const std::string &component) -> size_t {
                 return self.net(component_arg(component)).merged_bytes();
             })
        .def("adapter_bytes",
             [](Model &self, const std::string &component) -> size_t {
                 return self.net(component_arg(component)).adapter_bytes();
             })
        .def("weight_bytes", [](Model &self, const std::string &component) -> size_t {
            const Component c = component_arg(component);
            return self.net(c).weight_bytes();
        });
}
