#include "model.h"

#include "common.h"
#include "cpu_qmatmul.h"

#include <algorithm>

namespace fm {

ModelParams model_default_params() { return ModelParams(); }

static bool wants(const ModelParams &p, const char *c) {
    return std::find(p.components.begin(), p.components.end(), c) != p.components.end();
}

Model::Model(const ModelParams &params) : params_(params) {
    set_verbosity(params.verbosity);
    install_ggml_hooks();
    GgmlAbortGuard guard;
    for (auto &c : params.components)
        if (c != "diffusion" && c != "clip_l" && c != "t5xxl" && c != "vae")
            fail_value("unknown component '%s'; components are diffusion, clip_l, t5xxl, vae", c.c_str());
    weights_ = std::make_unique<WeightSet>(params.path, params.clip_l, params.t5xxl, params.vae);
    backend_ = std::make_unique<Backend>(params.backend, params.threads);
    // Build each network present: this infers its configuration and checks every shape now,
    // so a damaged file fails at load, not in the middle of a generation.
    auto &W = *weights_;
    if (!W.component(Component::Diffusion).empty()) {
        flux_ = std::make_unique<FluxNet>(*backend_, W.component(Component::Diffusion));
        flux_->set_flash_attn(params.flash_attn);
    }
    if (!W.component(Component::ClipL).empty()) clip_ = std::make_unique<ClipNet>(*backend_, W.component(Component::ClipL));
    if (!W.component(Component::T5xxl).empty()) t5_ = std::make_unique<T5Net>(*backend_, W.component(Component::T5xxl));
    if (!W.component(Component::Vae).empty()) vae_ = std::make_unique<VaeNet>(*backend_, W.component(Component::Vae));
    if (wants(params, "diffusion") && !flux_) missing("diffusion");
    if (wants(params, "clip_l") && !clip_) missing("clip_l");
    if (wants(params, "t5xxl") && !t5_) missing("t5xxl");
    if (wants(params, "vae") && !vae_) missing("vae");
}

Model::~Model() = default;

void Model::missing(const char *component) const {
    std::string files;
    for (auto &f : weights_->files()) files += (files.empty() ? "" : ", ") + f->path();
    std::string hint;
    if (std::string(component) == "diffusion") hint = "pass a FLUX.1-mini GGUF (it holds the diffusion model)";
    else hint = strfmt("pass the %s file separately (%s=PATH, CLI --%s)", component, component, component);
    fail_value("no %s weights found in %s; %s", component, files.c_str(), hint.c_str());
}

void Model::set_threads(int n) { backend_->set_threads(n); }

FluxNet &Model::flux() { if (!flux_) missing("diffusion"); return *flux_; }
ClipNet &Model::clip() { if (!clip_) missing("clip_l"); return *clip_; }
T5Net &Model::t5() { if (!t5_) missing("t5xxl"); return *t5_; }
VaeNet &Model::vae() { if (!vae_) missing("vae"); return *vae_; }

std::string Model::kernels() const {
    if (!backend_->is_cpu()) return "ggml (" + backend_->name() + ")";
    std::string s = backend_->own_qmatmul() ? std::string("Q4_0/Q4_1/Q8_0 matmul: fluxmini (") +
                                                  qmatmul_path_description(backend_->qmatmul_path()) + ")"
                                            : std::string("matmul: ggml");
    if (vae_) s += vae_->own_conv() ? "; VAE convolution: fluxmini (AVX2)" : "; VAE convolution: ggml";
    return s;
}

void Model::release(const std::string &component) {
    if (component == "diffusion") { if (flux_) flux_->release(); weights_->release_pages(Component::Diffusion); }
    else if (component == "clip_l") { if (clip_) clip_->release(); weights_->release_pages(Component::ClipL); }
    else if (component == "t5xxl") { if (t5_) t5_->release(); weights_->release_pages(Component::T5xxl); }
    else if (component == "vae") { if (vae_) vae_->release(); weights_->release_pages(Component::Vae); }
    else fail_value("unknown component '%s'; components are diffusion, clip_l, t5xxl, vae", component.c_str());
}

std::vector<ComponentInfo> Model::info() const {
    std::vector<ComponentInfo> out;
    for (int c = 0; c < int(Component::Count); ++c) {
        const ComponentWeights &w = weights_->component(Component(c));
        ComponentInfo ci;
        ci.name = component_name(Component(c));
        ci.present = !w.empty();
        ci.sources = w.sources;
        for (auto &kv : w.tensors) {
            ci.tensors_per_type[ggml_type_name(kv.second->type)] += 1;
            ci.parameters += kv.second->nelements();
            ci.bytes += int64_t(kv.second->nbytes);
        }
        if (c == int(Component::Diffusion) && flux_) ci.config = flux_->config().items();
        if (c == int(Component::ClipL) && clip_) ci.config = clip_->config().items();
        if (c == int(Component::T5xxl) && t5_) ci.config = t5_->config().items();
        if (c == int(Component::Vae) && vae_) ci.config = vae_->config().items();
        out.push_back(std::move(ci));
    }
    return out;
}

}  // namespace fm
