#include "options.h"

#include <cstdlib>
#include <cstring>

namespace fm {

EngineOptions engine_default_params() { return EngineOptions(); }

EngineOptions engine_options_from_env(EngineOptions o) {
    auto env = [](const char *name) -> const char * {
        const char *e = std::getenv(name);
        return e && *e ? e : nullptr;
    };
    if (const char *e = env("FLUXMINI_KERNELS")) {
        if (!std::strcmp(e, "ggml")) o.kernels = KernelChoice::Ggml;
        else if (!std::strcmp(e, "portable")) o.kernels = KernelChoice::Portable;
    }
    if (const char *e = env("FLUXMINI_VAE_CONV")) {
        if (!std::strcmp(e, "im2col") || !std::strcmp(e, "banded")) o.vae_conv = VaeConv::Im2col;
        else if (!std::strcmp(e, "direct")) o.vae_conv = VaeConv::Direct;
    }
    if (const char *e = env("FLUXMINI_VAE_BUDGET_MB")) o.vae_budget_mb = size_t(std::strtoull(e, nullptr, 10));
    if (const char *e = env("FLUXMINI_VAE_BAND_KB"))
        if (size_t kb = size_t(std::strtoull(e, nullptr, 10))) o.vae_band_bytes = kb << 10;
    if (const char *e = env("FLUXMINI_PROFILE")) o.profile = std::strcmp(e, "0") != 0;
    return o;
}

}  // namespace fm
