#include "model.h"

#include "common.h"
#include "cpu_conv.h"
#include "cpu_gelu.h"
#include "cpu_qmatmul.h"

#include <algorithm>

namespace fm {

ModelParams model_default_params() { return ModelParams(); }

namespace {
// Builds the network of component c; this infers its configuration and checks every shape now,
// so a damaged file fails at load, not in the middle of a generation.
std::unique_ptr<Network> make_network(Component c, Backend &backend, const ComponentWeights &w,
                                      const EngineOptions &options) {
    switch (c) {
        case Component::Diffusion: return std::make_unique<FluxNet>(backend, w, options);
        case Component::ClipL: return std::make_unique<ClipNet>(backend, w, options);
        case Component::T5xxl: return std::make_unique<T5Net>(backend, w, options);
        case Component::Vae: return std::make_unique<VaeNet>(backend, w, options);
        default: break;
    }
    fail_runtime("internal error: no network for component %d", int(c));
}
}  // namespace

Model::Model(const ModelParams &params) : options_(params.options) {
    VerbosityScope verbosity(options_.verbosity);
    install_ggml_hooks();
    GgmlAbortGuard guard;
    weights_ = std::make_unique<WeightSet>(params.path, params.clip_l, params.t5xxl, params.vae);
    backend_ = std::make_unique<Backend>(params.backend, params.threads, options_.kernels, options_.own_attention);
    for (Component c : kComponents)
        if (!weights_->component(c).empty())
            nets_[size_t(c)] = make_network(c, *backend_, weights_->component(c), options_);
    uint64_t file_bytes = 0;
    for (auto &f : weights_->files()) file_bytes += f->map().size();
    limits_ = read_memory_limits();
    policy_ = fm::memory_policy(options_, limits_, file_bytes);
    log_info("memory: %s", policy_.describe().c_str());
    for (Component c : kComponents)
        if (Network *n = nets_[size_t(c)].get()) {
            MemoryPolicy p = policy_;
            // The VAE's weights are small and read again by every tile: they stay mapped.
            if (c == Component::Vae) p.stream = false;
            n->set_memory_policy(p);
        }
    for (Component c : kComponents) {
        const bool wanted = std::find(params.components.begin(), params.components.end(), c) != params.components.end();
        if (wanted && !nets_[size_t(c)]) missing(c);
    }
}

Model::~Model() = default;

void Model::missing(Component c) const {
    std::string files;
    for (auto &f : weights_->files()) files += (files.empty() ? "" : ", ") + f->path();
    const char *name = component_name(c);
    const std::string hint = c == Component::Diffusion
                                 ? "pass a FLUX.1-mini GGUF (it holds the diffusion model)"
                                 : strfmt("pass the %s file separately (%s=PATH, CLI --%s)", name, name, name);
    fail_value("no %s weights found in %s; %s", name, files.c_str(), hint.c_str());
}

void Model::set_threads(int n) { backend_->set_threads(n); }

Network &Model::net(Component c) {
    Network *n = nets_.at(size_t(c)).get();
    if (!n) missing(c);
    return *n;
}

std::string Model::kernels() const {
    if (!backend_->is_cpu()) return "ggml (" + backend_->name() + ")";
    std::string s = backend_->own_qmatmul() ? std::string("Q4_0/Q4_1/Q8_0 matmul: fluxmini (") +
                                                  qmatmul_path_description(backend_->qmatmul_path()) + ")"
                                            : std::string("matmul: ggml");
    const AttnPath attn = backend_->attention_path();
    s += attn == AttnPath::Ggml ? "; attention: ggml" : strfmt("; attention: fluxmini (%s)", attention_path_description(attn));
    // Our GELU runs where our matmul does (layers.cpp gelu_tanh()).
    s += backend_->own_qmatmul()
             ? strfmt("; GELU: fluxmini (%s)",
                      gelu_path_for(backend_->qmatmul_path()) == NormPath::Avx2 ? "AVX2" : "plain C++")
             : std::string("; GELU: ggml");
    if (const auto *vae = static_cast<const VaeNet *>(nets_[size_t(Component::Vae)].get()))
        s += vae->own_conv() ? strfmt("; VAE convolution: fluxmini (%s)", conv_engine_path() == ConvPath::Avx512 ? "AVX-512" : "AVX2")
                             : std::string("; VAE convolution: ggml");
    return s;
}

void Model::release(Component c) {
    if (Network *n = nets_.at(size_t(c)).get()) n->release();
    weights_->release_pages(c, policy_.evict);
}

void Model::begin(Component c) {
    if (!policy_.release_compute) return;
    for (Component o : kComponents)
        if (o != c)
            if (Network *n = nets_[size_t(o)].get()) n->release_compute();
}

std::vector<PlacementRow> Model::placement(Component c) const {
    const Network *n = nets_.at(size_t(c)).get();
    return n ? n->placement() : std::vector<PlacementRow>{};
}

std::vector<ComponentInfo> Model::info() const {
    std::vector<ComponentInfo> out;
    for (Component c : kComponents) {
        const ComponentWeights &w = weights_->component(c);
        ComponentInfo ci;
        ci.name = component_name(c);
        ci.present = !w.empty();
        ci.sources = w.sources;
        for (auto &kv : w.tensors) {
            ci.tensors_per_type[ggml_type_name(kv.second->type)] += 1;
            ci.parameters += kv.second->nelements();
            ci.bytes += int64_t(kv.second->nbytes);
        }
        if (const Network *n = nets_[size_t(c)].get()) ci.config = n->config_items();
        out.push_back(std::move(ci));
    }
    return out;
}

}  // namespace fm
