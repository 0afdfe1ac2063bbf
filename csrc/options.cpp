#include "options.h"

#include <cstdlib>
#include <cstring>

namespace fm {

namespace {
constexpr KernelChoice kAllChoices[] = {KernelChoice::Own,  KernelChoice::Ggml,    KernelChoice::Portable,
                                        KernelChoice::Avx2, KernelChoice::AvxVnni, KernelChoice::Avx512Vnni};
}  // namespace

const char *kernel_choice_name(KernelChoice choice) {
    switch (choice) {
    case KernelChoice::Own: return "auto";
    case KernelChoice::Ggml: return "ggml";
    case KernelChoice::Portable: return "portable";
    case KernelChoice::Avx2: return "avx2";
    case KernelChoice::AvxVnni: return "avxvnni";
    case KernelChoice::Avx512Vnni: return "avx512vnni";
    }
    return "?";
}

bool parse_kernel_choice(const char *name, KernelChoice *out) {
    for (KernelChoice c : kAllChoices)
        if (!std::strcmp(name, kernel_choice_name(c))) {
            *out = c;
            return true;
        }
    return false;
}

EngineOptions engine_default_params() { return EngineOptions(); }

EngineOptions engine_options_from_env(EngineOptions o) {
    auto env = [](const char *name) -> const char * {
        const char *e = std::getenv(name);
        return e && *e ? e : nullptr;
    };
    if (const char *e = env("FLUXMINI_KERNELS"))
        if (!parse_kernel_choice(e, &o.kernels))
            fail_value("FLUXMINI_KERNELS='%s' is not a kernel choice; use auto, avx512vnni, avxvnni, avx2, portable or ggml",
                       e);
    if (const char *e = env("FLUXMINI_VAE_CONV")) {
        if (!std::strcmp(e, "im2col") || !std::strcmp(e, "banded")) o.vae_conv = VaeConv::Im2col;
        else if (!std::strcmp(e, "direct")) o.vae_conv = VaeConv::Direct;
    }
    if (const char *e = env("FLUXMINI_VAE_BUDGET_MB")) o.vae_budget_mb = size_t(std::strtoull(e, nullptr, 10));
    if (const char *e = env("FLUXMINI_VAE_BAND_KB"))
        if (size_t kb = size_t(std::strtoull(e, nullptr, 10))) o.vae_band_bytes = kb << 10;
    if (const char *e = env("FLUXMINI_ATTENTION")) {
        if (!std::strcmp(e, "ggml")) o.own_attention = false;
        else if (!std::strcmp(e, "auto")) o.own_attention = true;
        else fail_value("FLUXMINI_ATTENTION='%s' is not a choice; use auto or ggml", e);
    }
    if (const char *e = env("FLUXMINI_STREAM")) {
        if (!std::strcmp(e, "0") || !std::strcmp(e, "off")) o.stream = StreamMode::Off;
        else if (!std::strcmp(e, "1") || !std::strcmp(e, "on")) o.stream = StreamMode::On;
        else if (!std::strcmp(e, "auto")) o.stream = StreamMode::Auto;
        else fail_value("FLUXMINI_STREAM='%s' is not a streaming choice; use 0, 1 or auto", e);
    }
    if (const char *e = env("FLUXMINI_PROFILE")) o.profile = std::strcmp(e, "0") != 0;
    return o;
}

}  // namespace fm
