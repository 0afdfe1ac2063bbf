#include "common.h"

#include "options.h"

#include <ggml.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

namespace fm {

static std::string vformat(const char *fmt, va_list ap) {
    va_list ap2;
    va_copy(ap2, ap);
    int n = std::vsnprintf(nullptr, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0) return fmt;
    std::vector<char> buf(size_t(n) + 1);
    std::vsnprintf(buf.data(), buf.size(), fmt, ap);
    return std::string(buf.data(), size_t(n));
}

std::string strfmt(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

#define FM_DEFINE_FAIL(fn, kind)                  \
    void fn(const char *fmt, ...) {               \
        va_list ap;                               \
        va_start(ap, fmt);                        \
        std::string s = vformat(fmt, ap);         \
        va_end(ap);                               \
        throw Error(kind, s);                     \
    }
FM_DEFINE_FAIL(fail_value, ErrorKind::Value)
FM_DEFINE_FAIL(fail_file, ErrorKind::File)
FM_DEFINE_FAIL(fail_runtime, ErrorKind::Runtime)
#undef FM_DEFINE_FAIL

static thread_local int t_verbosity = 0;
int verbosity() { return t_verbosity; }
VerbosityScope::VerbosityScope(int level) : prev_(t_verbosity) { t_verbosity = level; }
VerbosityScope::~VerbosityScope() { t_verbosity = prev_; }

void log_info(const char *fmt, ...) {
    if (t_verbosity <= 0) return;
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "fluxmini: %s\n", s.c_str());
}

static thread_local std::string t_last_ggml_error;
static thread_local bool t_abort_to_exception = false;

std::string take_ggml_error() {
    std::string s;
    s.swap(t_last_ggml_error);
    while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
    return s;
}

static void ggml_log_hook(enum ggml_log_level level, const char *text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR || level == GGML_LOG_LEVEL_WARN) {
        if (level == GGML_LOG_LEVEL_ERROR) t_last_ggml_error = text;
        if (t_verbosity > 0) std::fputs(text, stderr);
    } else if (t_verbosity > 1) {
        std::fputs(text, stderr);
    }
}

static void ggml_abort_hook(const char *message) {
    if (t_abort_to_exception) {
        t_abort_to_exception = false;
        throw Error(ErrorKind::Runtime,
                    strfmt("internal ggml check failed: %s (please report this with the model file's "
                           "`fluxmini info` output)", message ? message : "?"));
    }
    std::fprintf(stderr, "fluxmini: ggml aborted: %s\n", message ? message : "?");
}

void install_ggml_hooks() {
    static std::once_flag once;
    std::call_once(once, [] {
        ggml_log_set(ggml_log_hook, nullptr);
        ggml_set_abort_callback(ggml_abort_hook);
    });
}

GgmlAbortGuard::GgmlAbortGuard() : prev_(t_abort_to_exception) { t_abort_to_exception = true; }
GgmlAbortGuard::~GgmlAbortGuard() { t_abort_to_exception = prev_; }

KernelChoice kernel_choice() {
    // Never throws (kernel threads may ask first): a bad FLUXMINI_KERNELS is reported at load.
    static const KernelChoice choice = [] {
        try {
            return engine_options_from_env().kernels;
        } catch (const Error &) {
            return KernelChoice::Own;
        }
    }();
    return choice;
}

}  // namespace fm
