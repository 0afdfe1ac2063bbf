// Shared basics of the engine: the error type every failure becomes, and string formatting.
#pragma once

#include <cstdarg>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fm {

// Which Python exception an Error becomes (fluxmini.errors): the bindings translate by kind.
enum class ErrorKind { Value, File, Runtime, Cancelled };

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

// Verbosity of the engine's own log lines on stderr (0 = quiet).
void set_verbosity(int level);
int verbosity();
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

// FLUXMINI_KERNELS: unset or "auto" (fluxmini's CPU kernels, the fastest this CPU runs), "ggml"
// (ggml's matmul everywhere, for comparisons), "portable" (our kernels' plain C++ versions), or one
// instruction-set path of the quantized matmul: "avx512vnni", "avxvnni", "avx2" (cpu_qmatmul.h).
// Never throws (kernel threads read it): an unknown value gives Invalid, which the backend reports.
enum class KernelChoice { Own, Ggml, Portable, Avx2, AvxVnni, Avx512Vnni, Invalid };
KernelChoice kernel_choice();

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
