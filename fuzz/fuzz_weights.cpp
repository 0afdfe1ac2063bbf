// libFuzzer entry points over fluxmini's model-file reader (csrc/weights.cpp), built three ways by
// fuzz/build.sh (docs/FUZZING.md):
//   FUZZ_MODE 0  fuzz_gguf_bytes    the input is the whole file (GGUF or safetensors), byte-level;
//   FUZZ_MODE 1  fuzz_gguf_struct   the input drives a generator of GGUF files with valid framing
//                                   and hostile values (counts, lengths, KV and array types, n_dims,
//                                   dims, tensor types, offsets, alignment, names of any bytes);
//   FUZZ_MODE 2  fuzz_safetensors   the input is "JSON header \0 data"; the harness writes the
//                                   8-byte length (true, or a hostile one chosen by the input).
// Every input must either load or throw fm::Error; a loaded file must satisfy the invariants the
// engine relies on (checked below), else the harness traps and libFuzzer saves the input.
#include "common.h"
#include "weights.h"

#include <fuzzer/FuzzedDataProvider.h>
#include <ggml.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#ifndef FUZZ_MODE
#define FUZZ_MODE 0
#endif

namespace {

#define CHECK(cond)                                                                     \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            std::fprintf(stderr, "invariant broken: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
            __builtin_trap();                                                           \
        }                                                                               \
    } while (0)

bool valid_utf8(const std::string &s) {
    size_t i = 0, n = s.size();
    while (i < n) {
        unsigned c = (unsigned char)s[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || n - i < len) return false;
        uint32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
        for (size_t k = 1; k < len; ++k) {
            unsigned b = (unsigned char)s[i + k];
            if ((b & 0xC0) != 0x80) return false;
            cp = (cp << 6) | (b & 0x3F);
        }
        static const uint32_t min_cp[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < min_cp[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
        i += len;
    }
    return true;
}

std::string scratch_path() {
    const char *dir = std::getenv("FUZZ_TMPDIR");
    return std::string(dir ? dir : "/dev/shm") + "/fluxmini-fuzz-" + std::to_string(getpid()) + ".bin";
}

void write_file(const std::string &path, const std::string &bytes) {
    FILE *f = std::fopen(path.c_str(), "wb");
    if (!f) __builtin_trap();
    if (!bytes.empty() && std::fwrite(bytes.data(), 1, bytes.size(), f) != bytes.size()) __builtin_trap();
    std::fclose(f);
}

// What the engine relies on for every tensor of a file that loaded.
void check_loaded(const fm::WeightFile &wf) {
    const uint8_t *base = wf.map().data();
    const size_t size = wf.map().size();
    const bool gguf = std::strcmp(wf.format(), "gguf") == 0;
    for (const fm::TensorRef &t : wf.tensors()) {
        CHECK(valid_utf8(t.file_name));
        CHECK(t.n_dims >= 1 && t.n_dims <= 4);
        for (int k = 0; k < 4; ++k) CHECK(t.ne[k] >= (gguf ? 1 : 0) && t.ne[k] <= (int64_t(1) << 40));
        for (int k = t.n_dims; k < 4; ++k) CHECK(t.ne[k] == 1);
        CHECK(t.data >= base && t.nbytes <= size && size_t(t.data - base) <= size - t.nbytes);
        if (gguf) {
            CHECK(int(t.type) >= 0 && int(t.type) < GGML_TYPE_COUNT && ggml_blck_size(t.type) > 0);
            CHECK(t.ne[0] % ggml_blck_size(t.type) == 0);
            CHECK(t.nbytes == ggml_row_size(t.type, t.ne[0]) * size_t(t.ne[1] * t.ne[2] * t.ne[3]));
        }
        // Touch both ends: a lying range would fault here, not later in the engine.
        if (t.nbytes) {
            volatile uint8_t a = t.data[0], b = t.data[t.nbytes - 1];
            (void)a, (void)b;
        }
    }
}

void load(const std::string &bytes) {
    static const std::string path = scratch_path();
    write_file(path, bytes);
    try {
        auto wf = fm::WeightFile::open(path);
        check_loaded(*wf);
        // The name mapping into components (and its checks) runs on everything that parsed.
        fm::WeightSet ws(path, "", "", "");
        (void)ws;
    } catch (const fm::Error &e) {
        CHECK(e.what()[0] != 0);
        CHECK(valid_utf8(e.what()));  // Python decodes the message as UTF-8
    }
}

#if FUZZ_MODE == 1
// ------------------------------------------------------------------ structure-aware GGUF
struct Out {
    std::string b;
    template <typename T> void put(T v) { b.append(reinterpret_cast<const char *>(&v), sizeof(T)); }
    void str(const std::string &s, uint64_t claimed) { put<uint64_t>(claimed); b += s; }
};

const uint64_t kHostileU64[] = {0, 1, 2, 3, 31, 32, 33, 255, 256, 4096, 65535, 65536, 0x7fffffffULL,
                                0x80000000ULL, 0xffffffffULL, 0x100000000ULL, (uint64_t(1) << 40),
                                (uint64_t(1) << 40) + 1, uint64_t(INT64_MAX), uint64_t(INT64_MAX) + 1,
                                ~uint64_t(0), ~uint64_t(0) - 31};

uint64_t pick_u64(FuzzedDataProvider &p) {
    switch (p.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: return p.PickValueInArray(kHostileU64);
        case 1: return p.ConsumeIntegralInRange<uint64_t>(0, 1024);
        default: return p.ConsumeIntegral<uint64_t>();
    }
}

// A count or length: mostly the truth, sometimes a lie.
uint64_t claim(FuzzedDataProvider &p, uint64_t truth) { return p.ConsumeIntegralInRange<int>(0, 7) ? truth : pick_u64(p); }

std::string any_name(FuzzedDataProvider &p, int i, const std::vector<std::string> &names) {
    static const char *kPrefixes[] = {"", "model.diffusion_model.", "text_encoders.clip_l.transformer.",
                                      "text_encoders.t5xxl.transformer.", "first_stage_model.", "vae.",
                                      "cond_stage_model.transformer.", "cond_stage_model.1.transformer."};
    static const char *kBare[] = {"img_in.weight", "double_blocks.0.img_attn.qkv.weight",
                                  "text_model.embeddings.token_embedding.weight", "shared.weight",
                                  "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.conv_in.weight",
                                  "encoder.conv_in.weight", "x.position_ids"};
    switch (p.ConsumeIntegralInRange<int>(0, 5)) {
        case 0: return p.ConsumeRandomLengthString(300);  // any bytes
        case 1: if (!names.empty()) return names[p.ConsumeIntegralInRange<size_t>(0, names.size() - 1)];  // duplicate
                [[fallthrough]];
        case 2: return std::string(p.PickValueInArray(kPrefixes)) + p.PickValueInArray(kBare);
        default: return "t" + std::to_string(i);
    }
}

void kv_value(FuzzedDataProvider &p, Out &o, uint32_t type, int depth) {
    switch (type) {
        case 0: case 1: case 7: o.put<uint8_t>(p.ConsumeIntegral<uint8_t>()); break;
        case 2: case 3: o.put<uint16_t>(p.ConsumeIntegral<uint16_t>()); break;
        case 4: case 5: case 6: o.put<uint32_t>(p.ConsumeIntegral<uint32_t>()); break;
        case 10: case 11: case 12: o.put<uint64_t>(p.ConsumeIntegral<uint64_t>()); break;
        case 8: {
            std::string s = p.ConsumeRandomLengthString(64);
            o.str(s, claim(p, s.size()));
            break;
        }
        case 9: {
            uint32_t et = p.ConsumeIntegralInRange<int>(0, 5) ? p.ConsumeIntegralInRange<uint32_t>(0, 12)
                                                              : p.ConsumeIntegral<uint32_t>();
            uint64_t n = p.ConsumeIntegralInRange<uint64_t>(0, depth < 2 ? 6 : 1);
            o.put<uint32_t>(et);
            o.put<uint64_t>(claim(p, n));
            for (uint64_t k = 0; k < n && et <= 12; ++k) kv_value(p, o, et, depth + 1);  // nested arrays too
            break;
        }
        default: break;  // an unknown type: whatever follows is read as its value
    }
}

std::string make_gguf(FuzzedDataProvider &p) {
    Out o;
    o.b = "GGUF";
    const uint32_t kVersions[] = {3, 3, 3, 2, 1, 4, 0x03000000};
    o.put<uint32_t>(p.PickValueInArray(kVersions));
    const uint64_t n_tensors = p.ConsumeIntegralInRange<uint64_t>(0, 8);
    const uint64_t n_kv = p.ConsumeIntegralInRange<uint64_t>(0, 6);
    o.put<uint64_t>(claim(p, n_tensors));
    o.put<uint64_t>(claim(p, n_kv));
    uint64_t alignment = 32;
    for (uint64_t i = 0; i < n_kv; ++i) {
        if (p.ConsumeBool()) {  // general.alignment, with a good or a hostile value and type
            const uint32_t kAlign[] = {32, 32, 1, 0, 3, 16, 48, 64, 4096, 65536, 131072, 0xffffffffu};
            const uint32_t a = p.PickValueInArray(kAlign);
            o.str("general.alignment", claim(p, 17));
            const uint32_t type = p.ConsumeIntegralInRange<int>(0, 5) ? 4 : p.ConsumeIntegralInRange<uint32_t>(0, 13);
            o.put<uint32_t>(type);
            if (type == 4) {
                o.put<uint32_t>(a);
                if (a && !(a & (a - 1)) && a <= 65536) alignment = a;
            } else {
                kv_value(p, o, type, 0);
            }
        } else {
            std::string key = p.ConsumeRandomLengthString(40);
            o.str(key, claim(p, key.size()));
            const uint32_t type = p.ConsumeIntegralInRange<int>(0, 7) ? p.ConsumeIntegralInRange<uint32_t>(0, 12)
                                                                      : p.ConsumeIntegral<uint32_t>();
            o.put<uint32_t>(type);
            kv_value(p, o, type, 0);
        }
    }
    std::vector<std::string> names;
    uint64_t running = 0;
    for (uint64_t i = 0; i < n_tensors; ++i) {
        std::string name = any_name(p, int(i), names);
        names.push_back(name);
        o.str(name, claim(p, name.size()));
        const uint32_t kDims[] = {1, 2, 2, 3, 4, 0, 5, 0xffffffffu};
        const uint32_t n_dims = p.ConsumeIntegralInRange<int>(0, 3) ? p.ConsumeIntegralInRange<uint32_t>(1, 4)
                                                                    : p.PickValueInArray(kDims);
        o.put<uint32_t>(n_dims);
        const uint32_t kTypes[] = {0, 1, 30, 8, 2, 3, 6, 7, 10, 11, 12, 13, 14, 4, 5, 15, 16, 39, 40, 41, 200};
        const uint32_t type = p.PickValueInArray(kTypes);
        uint64_t nel_bytes = type < GGML_TYPE_COUNT && ggml_blck_size(ggml_type(type)) ? ggml_type_size(ggml_type(type)) : 4;
        const int64_t blck = type < GGML_TYPE_COUNT && ggml_blck_size(ggml_type(type)) ? ggml_blck_size(ggml_type(type)) : 1;
        for (uint32_t k = 0; k < n_dims && k < 6; ++k) {
            uint64_t d;
            if (p.ConsumeIntegralInRange<int>(0, 4)) d = k == 0 ? uint64_t(blck) * p.ConsumeIntegralInRange<uint64_t>(1, 4)
                                                                : p.ConsumeIntegralInRange<uint64_t>(1, 4);
            else d = pick_u64(p);
            o.put<uint64_t>(d);
            if (k == 0) nel_bytes = nel_bytes * (d / uint64_t(blck));
            else nel_bytes *= d;
        }
        o.put<uint32_t>(type);
        uint64_t off;
        switch (p.ConsumeIntegralInRange<int>(0, 9)) {
            case 0: off = 0; break;                 // overlaps the first tensor
            case 1: off = running + 1; break;       // misaligned
            case 2: off = pick_u64(p); break;       // anywhere
            default: off = running;
        }
        o.put<uint64_t>(off);
        if (nel_bytes < (uint64_t(1) << 14)) running = (running + nel_bytes + alignment - 1) / alignment * alignment;
    }
    // Padding to the data section (sometimes wrong), then data (sometimes short).
    size_t pad = (alignment - o.b.size() % alignment) % alignment;
    if (!p.ConsumeIntegralInRange<int>(0, 7)) pad = p.ConsumeIntegralInRange<size_t>(0, 64);
    o.b.append(pad, '\0');
    uint64_t data = p.ConsumeIntegralInRange<int>(0, 5) ? running : p.ConsumeIntegralInRange<uint64_t>(0, running + 64);
    std::string rest = p.ConsumeRemainingBytesAsString();
    for (uint64_t k = 0; k < data && k < (uint64_t(1) << 20); ++k) o.b += rest.empty() ? char(k * 37) : rest[k % rest.size()];
    return o.b;
}
#endif

}  // namespace

extern "C" int LLVMFuzzerInitialize(int *, char ***) {
    fm::install_ggml_hooks();
    // verbosity is 0 (quiet) unless a VerbosityScope raises it
    return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
#if FUZZ_MODE == 0
    load(std::string(reinterpret_cast<const char *>(data), size));
#elif FUZZ_MODE == 1
    FuzzedDataProvider p(data, size);
    load(make_gguf(p));
#else
    // "header \0 data"; the first byte chooses the length field: true (most) or hostile.
    if (size < 1) return 0;
    const uint8_t mode = data[0];
    std::string in(reinterpret_cast<const char *>(data + 1), size - 1);
    size_t cut = in.find('\0');
    std::string header = in.substr(0, cut), body = cut == std::string::npos ? "" : in.substr(cut + 1);
    uint64_t hlen = header.size();
    if (mode >= 0xF0) {
        const uint64_t kLies[] = {0, 1, hlen + 1, hlen - 1, hlen + body.size(), hlen + body.size() + 1,
                                  uint64_t(100) << 20, ~uint64_t(0), ~uint64_t(0) - 7, 0x8000000000000000ULL,
                                  0xffffffffULL, 2, 7, 8, 9, 10, 11, 12};
        hlen = kLies[mode & 0x0F];
    }
    std::string file(reinterpret_cast<const char *>(&hlen), 8);
    load(file + header + body);
#endif
    return 0;
}
