// Engine options: every knob of the engine in one struct, filled once when a model is loaded and
// passed down to the backend, the networks and the graph runner (nothing below reads the
// environment). engine_default_params() gives the defaults; engine_options_from_env() is the one
// place that reads the FLUXMINI_* environment variables.
#pragma once

#include "common.h"

#include <cstddef>

namespace fm {

// The VAE's convolution: fluxmini's CPU kernel where the CPU has it (cpu_conv.h), else ggml's
// im2col + matmul in bands of output rows; Im2col / Direct force a ggml form (tests, benchmarks).
enum class VaeConv { Own, Im2col, Direct };

// Weight streaming (memory.h): Auto follows the memory policy, On / Off force it (tests, benchmarks).
enum class StreamMode { Auto = -1, Off = 0, On = 1 };

struct EngineOptions {
    KernelChoice kernels = KernelChoice::Own;  // FLUXMINI_KERNELS=auto|ggml|portable|avx2|avxvnni|avx512vnni
    VaeConv vae_conv = VaeConv::Own;           // FLUXMINI_VAE_CONV=im2col|banded|direct
    size_t vae_budget_mb = 1536;               // FLUXMINI_VAE_BUDGET_MB: automatic VAE tiling tiles when
                                               // an untiled pass needs a larger compute buffer
    size_t vae_band_bytes = size_t(64) << 20;  // FLUXMINI_VAE_BAND_KB: patches per band of ggml's conv
    size_t max_memory_mb = 0;                  // FluxMini.load(max_memory=), --max-memory: the memory
                                               // budget (0: the cgroup limit or MemAvailable; memory.h)
    StreamMode stream = StreamMode::Auto;      // FLUXMINI_STREAM=0|1|auto: weight streaming (memory.h)
    bool profile = false;                      // FLUXMINI_PROFILE=1: time per ggml op on stderr
    bool flash_attn = true;                    // Flux attention through ggml_flash_attn_ext
    bool own_attention = true;                 // FLUXMINI_ATTENTION=ggml: ggml's flash attention instead of
                                               // fluxmini's fused CPU kernel (cpu_attention.h)
    int verbosity = 0;                         // engine log lines on stderr (0 quiet, 1 info, 2 ggml's too)
};

// The defaults, without looking at the environment.
EngineOptions engine_default_params();
// `base` with the FLUXMINI_* environment variables applied (unset or empty ones keep `base`).
// Throws FluxMiniValueError for a FLUXMINI_KERNELS that is not a kernel choice.
EngineOptions engine_options_from_env(EngineOptions base = engine_default_params());

// FLUXMINI_KERNELS's names: "auto" (Own), "ggml", "portable", "avx2", "avxvnni", "avx512vnni".
const char *kernel_choice_name(KernelChoice choice);
// The choice named `name`; false for an unknown name.
bool parse_kernel_choice(const char *name, KernelChoice *out);

}  // namespace fm
