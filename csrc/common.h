// Shared basics of the engine: the error type every failure becomes, and string formatting.
#pragma once

#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fm {

// Which Python exception an Error becomes (fluxmini.errors; Interrupted: KeyboardInterrupt): the
// bindings translate by kind. Cancelled: the call's CancelToken was cancelled; Interrupted:
// Ctrl-C (SIGINT) arrived during a computation.
enum class ErrorKind { Value, File, Runtime, Cancelled, Interrupted };

class Error : public std::runtime_error {
public:
    Error(ErrorKind kind, const std::string &msg) : std::runtime_error(msg), kind_(kind) {}
    ErrorKind kind() const { return kind_; }

private:
    ErrorKind kind_;
};

std::string strfmt(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void fail_value(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail_file(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] void fail_runtime(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// Verbosity of the engine's own log lines (and ggml's) on stderr, 0 = quiet. It belongs to the
// thread: a model sets its own for the duration of each call (VerbosityScope, Model::Call), so
// two models in two threads log at their own levels.
int verbosity();
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
class VerbosityScope {
public:
    explicit VerbosityScope(int level);
    ~VerbosityScope();
    VerbosityScope(const VerbosityScope &) = delete;
    VerbosityScope &operator=(const VerbosityScope &) = delete;

private:
    int prev_;
};

// Which CPU kernels run (FLUXMINI_KERNELS, parsed by engine_options_from_env() in options.h):
// Own ("auto" or unset: fluxmini's, the fastest path this CPU runs), Ggml (ggml's matmul
// everywhere, for comparisons), Portable (our kernels' plain C++ versions, so tests exercise them
// on any CPU), or one instruction-set path of the quantized matmul: Avx512Vnni, AvxVnni, Avx2
// (cpu_qmatmul.h; the VAE convolution keeps its AVX2 kernel under these).
enum class KernelChoice { Own, Ggml, Portable, Avx2, AvxVnni, Avx512Vnni };
// The process's choice for the convolution kernel's own dispatch (cpu_conv.cpp picks its vector
// or plain version once per process): engine_options_from_env().kernels at first use (Own when
// FLUXMINI_KERNELS is not a valid choice: the model load reports that). A model's engine uses its
// own EngineOptions::kernels, read when it is loaded; the quantized matmul takes its path per call.
KernelChoice kernel_choice();

// A per-call cancellation flag. cancel() from any thread stops the computations that run under
// this token: the graph runner checks it before a graph and between its nodes (ggml's abort
// callback). A cancelled token stays cancelled, so it stops every later call it is passed to.
class CancelToken {
public:
    void cancel() { flag_.store(true); }
    bool cancelled() const { return flag_.load(); }

private:
    std::atomic<bool> flag_{false};
};

// The last error line ggml logged on this thread (ggml reports parse failures only by logging).
std::string take_ggml_error();
void install_ggml_hooks();

// Turns GGML_ASSERT failures into fm::Error while the calling thread builds graphs or loads
// weights (never inside ggml's worker threads, where throwing would terminate the process).
class GgmlAbortGuard {
public:
    GgmlAbortGuard();
    ~GgmlAbortGuard();
    GgmlAbortGuard(const GgmlAbortGuard &) = delete;
    GgmlAbortGuard &operator=(const GgmlAbortGuard &) = delete;

private:
    bool prev_;
};

}  // namespace fm
