#include "weights.h"

#include "common.h"
#include "names_table.h"


#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <mutex>
#include <cstring>
#include <limits>
#include <sstream>
#include <set>

namespace fm {

const char *component_name(Component c) {
    switch (c) {
        case Component::Diffusion: return "diffusion";
        case Component::ClipL: return "clip_l";
        case Component::T5xxl: return "t5xxl";
        case Component::Vae: return "vae";
        default: return "?";
    }
}

bool is_supported_type(ggml_type t) {
    switch (t) {
        case GGML_TYPE_F32: case GGML_TYPE_F16: case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0: case GGML_TYPE_Q4_0: case GGML_TYPE_Q4_1:
        case GGML_TYPE_Q5_0: case GGML_TYPE_Q5_1:
        case GGML_TYPE_Q2_K: case GGML_TYPE_Q3_K: case GGML_TYPE_Q4_K:
        case GGML_TYPE_Q5_K: case GGML_TYPE_Q6_K:
            return true;
        default:
            return false;
    }
}

// ---------------------------------------------------------------------------------------------
// MappedFile

namespace {
std::mutex &live_maps_mutex() {
    static std::mutex m;
    return m;
}
std::vector<const MappedFile *> &live_maps() {
    static std::vector<const MappedFile *> v;
    return v;
}
}  // namespace

MappedFile::MappedFile(const std::string &path) : path_(path) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == ENOENT) fail_file("model file not found: %s (check the path)", path.c_str());
        fail_file("cannot open %s: %s", path.c_str(), std::strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        ::close(fd);
        fail_file("%s is not a regular file", path.c_str());
    }
    size_ = size_t(st.st_size);
    if (size_ == 0) {
        ::close(fd);
        fail_file("%s is empty (0 bytes): the download or conversion did not finish", path.c_str());
    }
    void *p = mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
    int e = errno;
    if (p == MAP_FAILED) {
        ::close(fd);
        fail_file("cannot map %s into memory: %s", path.c_str(), std::strerror(e));
    }
    fd_ = fd;
    base_ = static_cast<uint8_t *>(p);
    std::lock_guard<std::mutex> lock(live_maps_mutex());
    live_maps().push_back(this);
}

MappedFile::~MappedFile() {
    {
        std::lock_guard<std::mutex> lock(live_maps_mutex());
        auto &v = live_maps();
        v.erase(std::remove(v.begin(), v.end(), this), v.end());
    }
    if (base_) munmap(base_, size_);
    if (fd_ >= 0) ::close(fd_);
}

const MappedFile *MappedFile::containing(const void *ptr) {
    std::lock_guard<std::mutex> lock(live_maps_mutex());
    for (const MappedFile *m : live_maps())
        if (m->contains(ptr)) return m;
    return nullptr;
}

// The whole pages inside [ptr, ptr + n) of the mapping (never a page shared with a neighbour's
// bytes, which may still be in use); false when there is none.
static bool whole_pages(const uint8_t *base, size_t size, const void *ptr, size_t n, uintptr_t *begin, uintptr_t *end) {
    const uint8_t *p = static_cast<const uint8_t *>(ptr);
    if (!base || p < base || p + n > base + size || n == 0) return false;
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    *begin = (uintptr_t(p) + page - 1) / page * page;
    *end = (uintptr_t(p) + n) / page * page;
    return *end > *begin;
}

void MappedFile::release_range(const void *ptr, size_t n) const {
    uintptr_t begin, end;
    if (whole_pages(base_, size_, ptr, n, &begin, &end))
        madvise(reinterpret_cast<void *>(begin), end - begin, MADV_DONTNEED);
}

void MappedFile::evict_range(const void *ptr, size_t n) const {
    uintptr_t begin, end;
    if (!whole_pages(base_, size_, ptr, n, &begin, &end)) return;
    madvise(reinterpret_cast<void *>(begin), end - begin, MADV_DONTNEED);
    // Only pages no process maps leave the page cache; ours were just unmapped.
    if (fd_ >= 0) posix_fadvise(fd_, off_t(begin - uintptr_t(base_)), off_t(end - begin), POSIX_FADV_DONTNEED);
}

void MappedFile::prefetch_range(const void *ptr, size_t n) const {
    const uint8_t *p = static_cast<const uint8_t *>(ptr);
    if (!base_ || p < base_ || p + n > base_ + size_ || n == 0) return;
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const uintptr_t begin = uintptr_t(p) / page * page;  // readahead may cover a neighbour's bytes
    madvise(reinterpret_cast<void *>(begin), uintptr_t(p) + n - begin, MADV_WILLNEED);
}

std::string TensorRef::shape_str() const {
    std::string s = "[";
    for (int i = n_dims - 1; i >= 0; --i) {
        s += std::to_string(ne[i]);
        if (i) s += ", ";
    }
    return s + "]";
}

// ---------------------------------------------------------------------------------------------
// File formats

static bool add_overflows(size_t a, size_t b, size_t *out) { return __builtin_add_overflow(a, b, out); }

// Length of the well-formed UTF-8 sequence at s[i..n) (no overlongs, no surrogates, at most
// U+10FFFF), or 0 if the bytes there are not one.
static size_t utf8_seq_len(const unsigned char *s, size_t i, size_t n) {
    const unsigned c = s[i];
    if (c < 0x80) return 1;
    size_t len;
    unsigned lo = 0x80, hi = 0xBF;  // allowed range of the second byte
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) { len = 3; if (c == 0xE0) lo = 0xA0; if (c == 0xED) hi = 0x9F; }
    else if (c >= 0xF0 && c <= 0xF4) { len = 4; if (c == 0xF0) lo = 0x90; if (c == 0xF4) hi = 0x8F; }
    else return 0;
    if (n - i < len) return 0;
    if (s[i + 1] < lo || s[i + 1] > hi) return 0;
    for (size_t k = 2; k < len; ++k)
        if ((s[i + k] & 0xC0) != 0x80) return 0;
    return len;
}

static bool valid_utf8(const std::string &str) {
    const auto *s = reinterpret_cast<const unsigned char *>(str.data());
    for (size_t i = 0, n = str.size(); i < n;) {
        size_t k = utf8_seq_len(s, i, n);
        if (!k) return false;
        i += k;
    }
    return true;
}

// A string read from a file, fit for an error message (which Python decodes as UTF-8): bytes that
// are not UTF-8 and control characters become \xNN, and long strings are cut.
static std::string printable(const std::string &str) {
    const auto *s = reinterpret_cast<const unsigned char *>(str.data());
    std::string out;
    size_t i = 0;
    for (const size_t n = str.size(); i < n && out.size() < 160;) {
        size_t k = utf8_seq_len(s, i, n);
        if (k == 1 && s[i] >= 0x20 && s[i] != 0x7F) out += char(s[i]);
        else if (k > 1) out.append(str, i, k);
        else { out += strfmt("\\x%02x", s[i]); k = 1; }
        i += k;
    }
    if (i < str.size()) out += strfmt("... (%zu bytes)", str.size());
    return out;
}

// What the reader keeps is bounded whatever the file holds, so that loading takes at most the file
// plus a fixed margin (tests/test_corrupt_files.py measures it): at most kMaxEntries tensors and
// keys (a FLUX.1 file has about 1,500 tensors and a few dozen keys), names and keys of at most
// kMaxNameBytes (the longest real ones, T5's in the sd.cpp layout, are about 100 bytes), and at
// most kMaxMetadataBytes of metadata strings (the rest is skipped: nothing needs it).
constexpr uint64_t kMaxEntries = 1 << 16;
constexpr size_t kMaxNameBytes = 256;
constexpr size_t kMaxMetadataBytes = size_t(16) << 20;

static void check_entry_count(uint64_t n, const char *what, const std::string &path) {
    if (n > kMaxEntries)
        fail_file("%s: the header has %llu %s; fluxmini reads files of at most %llu (a FLUX.1 file has about "
                  "1,500 tensors); the file is damaged or not a FLUX.1 model",
                  path.c_str(), (unsigned long long)n, what, (unsigned long long)kMaxEntries);
}

static void check_name_length(const std::string &name, const char *what, size_t index, const std::string &path) {
    if (name.size() > kMaxNameBytes)
        fail_file("%s: %s #%zu has a name of %zu bytes ('%s'); fluxmini reads names of at most %zu bytes; the file "
                  "is damaged",
                  path.c_str(), what, index, name.size(), printable(name).c_str(), kMaxNameBytes);
}

// Names must be UTF-8 (Python sees them as str) and unique within a file; tensors must not share
// bytes (each writer lays them out one after the other). index is the tensor's position in the file.
static void check_names_and_overlaps(const std::vector<TensorRef> &tensors, const std::string &path) {
    std::map<std::string, size_t> seen;
    for (size_t i = 0; i < tensors.size(); ++i) {
        const std::string &name = tensors[i].file_name;
        if (!valid_utf8(name))
            fail_file("%s: tensor #%zu has a name that is not valid UTF-8 ('%s'); the file is damaged", path.c_str(),
                      i, printable(name).c_str());
        auto ins = seen.emplace(name, i);
        if (!ins.second)
            fail_file("%s: tensor #%zu and tensor #%zu are both named '%s'; the file is damaged", path.c_str(),
                      ins.first->second, i, printable(name).c_str());
    }
    std::vector<const TensorRef *> by_addr;
    by_addr.reserve(tensors.size());
    for (const TensorRef &t : tensors)
        if (t.nbytes) by_addr.push_back(&t);
    std::sort(by_addr.begin(), by_addr.end(), [](const TensorRef *a, const TensorRef *b) { return a->data < b->data; });
    for (size_t i = 1; i < by_addr.size(); ++i)
        if (by_addr[i - 1]->data + by_addr[i - 1]->nbytes > by_addr[i]->data)
            fail_file("%s: the data of tensors '%s' and '%s' overlap; the file is damaged", path.c_str(),
                      printable(by_addr[i - 1]->file_name).c_str(), printable(by_addr[i]->file_name).c_str());
}

std::unique_ptr<WeightFile> WeightFile::open(const std::string &path) {
    auto wf = std::unique_ptr<WeightFile>(new WeightFile());
    wf->map_ = std::make_unique<MappedFile>(path);
    const uint8_t *d = wf->map_->data();
    size_t n = wf->map_->size();
    if (n >= 4 && std::memcmp(d, "GGUF", 4) == 0) {
        wf->format_ = "gguf";
        wf->parse_gguf();
    } else if (n >= 10 && d[8] == '{') {
        wf->format_ = "safetensors";
        wf->parse_safetensors();
    } else {
        fail_file("%s is neither a GGUF nor a safetensors file (its first bytes are not 'GGUF' nor a "
                  "safetensors header); pass a FLUX.1-mini .gguf or .safetensors file",
                  path.c_str());
    }
    return wf;
}

// Our own GGUF reader: ggml's gguf API rejects tensor names of 64 bytes or more (GGML_MAX_NAME
// in the prebuilt library), and gpustack's T5 names are up to ~100 bytes. Every count, length
// and offset is checked against the file size before it is used.
namespace {
class GgufCursor {
public:
    GgufCursor(const uint8_t *d, size_t n, const std::string &path) : d_(d), n_(n), path_(path) {}
    size_t pos() const { return pos_; }
    template <typename T> T read() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, d_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }
    std::string str() {
        uint64_t len = read<uint64_t>();
        if (len > (uint64_t(1) << 20)) bad("a string of %llu bytes", (unsigned long long)len);
        need(size_t(len));
        std::string s(reinterpret_cast<const char *>(d_ + pos_), size_t(len));
        pos_ += size_t(len);
        return s;
    }
    void skip(uint64_t n) {
        if (n > n_ - pos_) truncated();
        pos_ += size_t(n);
    }
    void need(size_t k) {
        if (k > n_ - pos_) truncated();
    }
    [[noreturn]] void truncated() {
        fail_file("%s: the GGUF header ends early (at byte %zu of %zu); the file is truncated or damaged: "
                  "download it again",
                  path_.c_str(), pos_, n_);
    }
    [[noreturn]] void bad(const char *fmt, unsigned long long v) {
        std::string what = strfmt(fmt, v);
        fail_file("%s: damaged GGUF header (%s at byte %zu); download the file again", path_.c_str(),
                  what.c_str(), pos_);
    }

private:
    const uint8_t *d_;
    size_t n_;
    size_t pos_ = 0;
    const std::string &path_;
};

enum GgufValueType : uint32_t {
    kU8 = 0, kI8, kU16, kI16, kU32, kI32, kF32, kBool, kString, kArray, kU64, kI64, kF64, kTypeCount
};

size_t gguf_scalar_size(uint32_t t) {
    switch (t) {
        case kU8: case kI8: case kBool: return 1;
        case kU16: case kI16: return 2;
        case kU32: case kI32: case kF32: return 4;
        case kU64: case kI64: case kF64: return 8;
        default: return 0;
    }
}
}  // namespace

void WeightFile::parse_gguf() {
    const std::string &path = map_->path();
    const size_t fsize = map_->size();
    GgufCursor cur(map_->data(), fsize, path);
    cur.skip(4);  // magic
    const uint32_t version = cur.read<uint32_t>();
    if (version != 2 && version != 3)
        fail_file("%s: GGUF version %u is not supported (fluxmini reads versions 2 and 3)", path.c_str(), version);
    const uint64_t n_tensors = cur.read<uint64_t>();
    const uint64_t n_kv = cur.read<uint64_t>();
    // Each entry takes at least 8 bytes, so counts larger than the file are damage, not data.
    if (n_tensors > fsize / 8 || n_kv > fsize / 8)
        fail_file("%s: the GGUF header claims %llu tensors and %llu keys, impossible for a %zu-byte file; "
                  "the file is damaged",
                  path.c_str(), (unsigned long long)n_tensors, (unsigned long long)n_kv, fsize);
    check_entry_count(n_tensors, "tensors", path);
    check_entry_count(n_kv, "keys", path);
    uint64_t alignment = 32;
    size_t metadata_bytes = 0;
    std::set<std::string> keys;
    for (uint64_t i = 0; i < n_kv; ++i) {
        std::string key = cur.str();
        check_name_length(key, "key", size_t(i), path);
        if (!keys.insert(key).second)
            fail_file("%s: the GGUF key '%s' appears twice; the file is damaged", path.c_str(), printable(key).c_str());
        uint32_t type = cur.read<uint32_t>();
        if (type >= kTypeCount) cur.bad("unknown value type %llu", type);
        if (type == kString) {
            std::string value = cur.str();
            if (valid_utf8(key) && valid_utf8(value) && (metadata_bytes += value.size()) <= kMaxMetadataBytes)
                metadata_[key] = std::move(value);
        } else if (type == kArray) {
            uint32_t et = cur.read<uint32_t>();
            uint64_t n = cur.read<uint64_t>();
            if (et >= kTypeCount || et == kArray) cur.bad("bad array element type %llu", et);
            if (et == kString) {
                for (uint64_t k = 0; k < n; ++k) cur.str();
            } else {
                size_t es = gguf_scalar_size(et);
                if (n > fsize / es) cur.truncated();
                cur.skip(n * es);
            }
        } else {
            size_t es = gguf_scalar_size(type);
            if (key == "general.alignment" && type == kU32) {
                alignment = cur.read<uint32_t>();
                if (alignment == 0 || (alignment & (alignment - 1)) != 0 || alignment > 65536)
                    cur.bad("general.alignment %llu is not a power of two up to 65536", (unsigned long long)alignment);
            } else {
                cur.skip(es);
            }
        }
    }
    struct Info {
        std::string name;
        uint32_t n_dims;
        int64_t ne[4];
        uint32_t type;
        uint64_t offset;
    };
    std::vector<Info> infos;
    // A tensor info takes at least 32 bytes of the file; reserve no more than the file can hold.
    infos.reserve(size_t(std::min<uint64_t>(n_tensors, (fsize - cur.pos()) / 32)));
    for (uint64_t i = 0; i < n_tensors; ++i) {
        Info in{};
        in.name = cur.str();
        check_name_length(in.name, "tensor", size_t(i), path);
        if (!valid_utf8(in.name))
            fail_file("%s: tensor #%llu has a name that is not valid UTF-8 ('%s'); the file is damaged",
                      path.c_str(), (unsigned long long)i, printable(in.name).c_str());
        in.n_dims = cur.read<uint32_t>();
        if (in.n_dims == 0 || in.n_dims > 4)
            fail_file("%s: tensor '%s' has %u dimensions (1 to 4 are valid); the file is damaged", path.c_str(),
                      printable(in.name).c_str(), in.n_dims);
        for (int k = 0; k < 4; ++k) in.ne[k] = 1;
        for (uint32_t k = 0; k < in.n_dims; ++k) {
            uint64_t v = cur.read<uint64_t>();
            if (v == 0 || v > (uint64_t(1) << 40))
                fail_file("%s: tensor '%s' has a bad dimension (%llu); the file is damaged", path.c_str(),
                          printable(in.name).c_str(), (unsigned long long)v);
            in.ne[k] = int64_t(v);
        }
        in.type = cur.read<uint32_t>();
        in.offset = cur.read<uint64_t>();
        infos.push_back(std::move(in));
    }
    size_t data_off = (cur.pos() + alignment - 1) / alignment * alignment;
    if (data_off > fsize && n_tensors > 0) cur.truncated();

    tensors_.reserve(infos.size());
    for (Info &in : infos) {
        TensorRef t;
        t.file_name = in.name;
        if (in.type >= uint32_t(GGML_TYPE_COUNT) || ggml_type_size(ggml_type(in.type)) == 0 ||
            ggml_blck_size(ggml_type(in.type)) == 0)
            fail_file("%s: tensor '%s' has unknown type id %u; the file is damaged or was written by a newer "
                      "tool than this ggml knows",
                      path.c_str(), printable(in.name).c_str(), in.type);
        t.supported = is_supported_type(ggml_type(in.type));
        t.type = ggml_type(in.type);
        t.n_dims = int(in.n_dims);
        for (int k = 0; k < 4; ++k) t.ne[k] = in.ne[k];
        const int64_t blck = ggml_blck_size(t.type);
        if (t.ne[0] % blck != 0)
            fail_file("%s: tensor '%s' of type %s has rows of %lld values, not a multiple of the block size %lld; "
                      "the file is damaged",
                      path.c_str(), printable(in.name).c_str(), ggml_type_name(t.type), (long long)t.ne[0], (long long)blck);
        size_t nbytes = ggml_row_size(t.type, t.ne[0]);
        for (int k = 1; k < 4; ++k)
            if (__builtin_mul_overflow(nbytes, size_t(t.ne[k]), &nbytes))
                fail_file("%s: tensor '%s' has an impossible size; the file is damaged", path.c_str(), printable(in.name).c_str());
        t.nbytes = nbytes;
        size_t off = 0, end = 0;
        if (in.offset % alignment != 0 || add_overflows(data_off, size_t(in.offset), &off) ||
            add_overflows(off, t.nbytes, &end) || end > fsize) {
            fail_file("%s: tensor '%s' (%zu bytes at offset %llu) lies past the end of the file (%zu bytes) or "
                      "is misaligned: the file is truncated or damaged; download it again",
                      path.c_str(), printable(in.name).c_str(), t.nbytes, (unsigned long long)(data_off + in.offset), fsize);
        }
        t.data = map_->data() + off;
        t.file = map_.get();
        tensors_.push_back(std::move(t));
    }
    check_names_and_overlaps(tensors_, path);
}

// A streaming JSON reader for the safetensors header: the header is read member by member into
// TensorRefs and metadata strings, with no document tree, so memory stays within a small factor
// of the header's size whatever it holds (a tree of values can take 20x the text it came from).
namespace {
class JsonParser {
public:
    JsonParser(const char *p, size_t n, const std::string &path) : p_(p), end_(p + n), path_(path) {}

    [[noreturn]] void bad(const char *what) {
        fail_file("%s: the safetensors header is not valid JSON (%s); the file is damaged or not a "
                  "safetensors file",
                  path_.c_str(), what);
    }
    char peek() {
        ws();
        return p_ < end_ ? *p_ : '\0';
    }
    bool accept(char c) {
        if (peek() != c) return false;
        ++p_;
        return true;
    }
    void expect(char c, const char *what) {
        if (!accept(c)) bad(what);
    }
    void end() {
        ws();
        if (p_ != end_) bad("trailing characters after the header object");
    }
    // The members of an object: member(key) must read the value.
    template <typename F> void object(F &&member) {
        expect('{', "expected an object");
        if (accept('}')) return;
        do {
            ws();
            std::string key = string();
            expect(':', "expected ':'");
            member(key);
        } while (accept(','));
        expect('}', "expected ',' or '}'");
    }
    // The elements of an array: element() must read the value.
    template <typename F> void array(F &&element) {
        expect('[', "expected an array");
        if (accept(']')) return;
        do element();
        while (accept(','));
        expect(']', "expected ',' or ']'");
    }
    bool at_number() {
        const char c = peek();
        return c == '-' || (c >= '0' && c <= '9');
    }
    // A number; true (and *out set) when it is a plain unsigned integer that fits 64 bits.
    bool number(uint64_t *out) {
        if (!at_number()) bad("expected a number");
        const char *s = p_;
        while (p_ < end_ && (std::strchr("+-.eE", *p_) || (*p_ >= '0' && *p_ <= '9'))) ++p_;
        const std::string tok(s, p_);
        if (tok.find_first_not_of("0123456789") != std::string::npos || tok.size() > 19) return false;
        *out = std::strtoull(tok.c_str(), nullptr, 10);
        return true;
    }
    // Reads and drops any value (nesting is limited: recursion depth stays small).
    void skip(int depth) {
        if (depth > 8) bad("nesting too deep");
        const char c = peek();
        uint64_t u;
        if (c == '{') object([&](const std::string &) { skip(depth + 1); });
        else if (c == '[') array([&] { skip(depth + 1); });
        else if (c == '"') string();
        else if (at_number()) number(&u);
        else if (end_ - p_ >= 4 && (std::memcmp(p_, "true", 4) == 0 || std::memcmp(p_, "null", 4) == 0)) p_ += 4;
        else if (end_ - p_ >= 5 && std::memcmp(p_, "false", 5) == 0) p_ += 5;
        else bad(p_ >= end_ ? "unexpected end" : "unexpected character");
    }
    std::string string() {
        if (p_ >= end_ || *p_ != '"') bad("expected a string");
        ++p_;
        std::string s;
        while (p_ < end_ && *p_ != '"') {
            // as GGUF strings: the copy stays small whatever the header holds (peak memory)
            if (s.size() > (size_t(1) << 20)) bad("a string of more than 1 MiB; fluxmini reads strings up to 1 MiB");
            if (*p_ == '\\') {
                ++p_;
                if (p_ >= end_) bad("unterminated escape");
                char c = *p_++;
                switch (c) {
                    case 'n': s += '\n'; break;
                    case 't': s += '\t'; break;
                    case 'r': s += '\r'; break;
                    case 'b': s += '\b'; break;
                    case 'f': s += '\f'; break;
                    case 'u': {
                        unsigned cp = hex4();
                        // A UTF-16 surrogate pair is one code point; a lone surrogate is no text.
                        if (cp >= 0xDC00 && cp <= 0xDFFF) bad("lone low surrogate in a \\u escape");
                        if (cp >= 0xD800 && cp <= 0xDBFF) {
                            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u') bad("lone high surrogate in a \\u escape");
                            p_ += 2;
                            unsigned lo = hex4();
                            if (lo < 0xDC00 || lo > 0xDFFF) bad("lone high surrogate in a \\u escape");
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        }
                        if (cp < 0x80) s += char(cp);
                        else if (cp < 0x800) { s += char(0xC0 | (cp >> 6)); s += char(0x80 | (cp & 0x3F)); }
                        else if (cp < 0x10000) { s += char(0xE0 | (cp >> 12)); s += char(0x80 | ((cp >> 6) & 0x3F)); s += char(0x80 | (cp & 0x3F)); }
                        else {
                            s += char(0xF0 | (cp >> 18)); s += char(0x80 | ((cp >> 12) & 0x3F));
                            s += char(0x80 | ((cp >> 6) & 0x3F)); s += char(0x80 | (cp & 0x3F));
                        }
                        break;
                    }
                    default: s += c;
                }
            } else {
                s += *p_++;
            }
        }
        if (p_ >= end_) bad("unterminated string");
        ++p_;
        return s;
    }

private:
    void ws() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\n' || *p_ == '\r' || *p_ == '\t')) ++p_;
    }
    // The four hex digits of a \u escape.
    unsigned hex4() {
        if (end_ - p_ < 4) bad("short \\u escape");
        unsigned v = 0;
        for (int k = 0; k < 4; ++k) {
            const char c = *p_++;
            v <<= 4;
            if (c >= '0' && c <= '9') v |= unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
            else bad("bad hex digit in a \\u escape");
        }
        return v;
    }
    const char *p_;
    const char *end_;
    const std::string &path_;
};

// One header entry as read: the fields a tensor needs, and whether each was well-formed.
struct SafetensorsEntry {
    bool has_dtype = false, has_shape = false, has_offsets = false;
    std::string dtype;
    size_t n_dims = 0, n_offsets = 0;
    bool dims_ok = true, offsets_ok = true;
    uint64_t dims[4] = {0, 0, 0, 0};
    uint64_t offsets[2] = {0, 0};
};
}  // namespace

void WeightFile::parse_safetensors() {
    const std::string &path = map_->path();
    const uint8_t *d = map_->data();
    const size_t fsize = map_->size();
    uint64_t hlen = 0;
    std::memcpy(&hlen, d, 8);
    if (hlen > fsize - 8 || hlen > (uint64_t(100) << 20)) {
        fail_file("%s: the safetensors header claims %llu bytes but the file has %zu; the file is truncated "
                  "or not a safetensors file",
                  path.c_str(), (unsigned long long)hlen, fsize);
    }
    JsonParser jp(reinterpret_cast<const char *>(d + 8), size_t(hlen), path);
    if (jp.peek() != '{') fail_file("%s: the safetensors header is not a JSON object", path.c_str());
    const size_t data_start = 8 + size_t(hlen);
    const size_t data_size = fsize - data_start;
    size_t metadata_bytes = 0, n_entries = 0;
    jp.object([&](const std::string &name) {
        check_entry_count(++n_entries, "entries or more", path);
        check_name_length(name, "entry", n_entries - 1, path);
        if (name == "__metadata__") {
            if (jp.peek() != '{') return jp.skip(1);
            size_t n_keys = 0;
            jp.object([&](const std::string &key) {
                check_entry_count(++n_keys, "metadata keys or more", path);
                check_name_length(key, "metadata key", n_keys - 1, path);
                if (jp.peek() != '"') return jp.skip(2);
                std::string value = jp.string();
                if (valid_utf8(key) && valid_utf8(value) && (metadata_bytes += value.size()) <= kMaxMetadataBytes)
                    metadata_[key] = std::move(value);
            });
            return;
        }
        SafetensorsEntry e;
        if (jp.peek() == '{') {
            jp.object([&](const std::string &field) {
                if (field == "dtype" && jp.peek() == '"') {
                    e.dtype = jp.string();
                    e.has_dtype = true;
                } else if (field == "shape" && jp.peek() == '[') {
                    e.has_shape = true;
                    jp.array([&] {
                        uint64_t v = 0;
                        if (!jp.at_number()) { e.dims_ok = false; return jp.skip(3); }
                        if (!jp.number(&v)) e.dims_ok = false;
                        if (e.n_dims < 4) e.dims[e.n_dims] = v;
                        ++e.n_dims;
                    });
                } else if (field == "data_offsets" && jp.peek() == '[') {
                    e.has_offsets = true;
                    jp.array([&] {
                        uint64_t v = 0;
                        if (!jp.at_number()) { e.offsets_ok = false; return jp.skip(3); }
                        if (!jp.number(&v)) e.offsets_ok = false;
                        if (e.n_offsets < 2) e.offsets[e.n_offsets] = v;
                        ++e.n_offsets;
                    });
                } else {
                    jp.skip(2);
                }
            });
        } else {
            jp.skip(1);
        }
        const std::string shown = printable(name);
        const char *pname = shown.c_str();
        if (!e.has_dtype || !e.has_shape || !e.has_offsets || e.n_offsets != 2)
            fail_file("%s: tensor '%s' has an incomplete safetensors entry (needs dtype, shape, data_offsets)",
                      path.c_str(), pname);
        TensorRef t;
        t.file_name = name;
        size_t esize = 0;
        const std::string &dt = e.dtype;
        if (dt == "F32") { t.type = GGML_TYPE_F32; esize = 4; }
        else if (dt == "F16") { t.type = GGML_TYPE_F16; esize = 2; }
        else if (dt == "BF16") { t.type = GGML_TYPE_BF16; esize = 2; }
        else {
            // Integer tables such as CLIP's position_ids are allowed as long as nothing uses them.
            t.type = GGML_TYPE_I32;
            t.supported = false;
            if (dt == "I64" || dt == "U64" || dt == "F64") esize = 8;
            else if (dt == "I32" || dt == "U32") esize = 4;
            else if (dt == "I16" || dt == "U16") esize = 2;
            else if (dt == "I8" || dt == "U8" || dt == "BOOL" || dt == "F8_E4M3" || dt == "F8_E5M2") esize = 1;
            else
                fail_file("%s: tensor '%s' has unknown dtype '%s'", path.c_str(), pname, printable(dt).c_str());
        }
        if (e.n_dims > 4)
            fail_file("%s: tensor '%s' has %zu dimensions (at most 4 are supported)", path.c_str(), pname, e.n_dims);
        t.n_dims = e.n_dims == 0 ? 1 : int(e.n_dims);
        size_t nel = 1;
        for (size_t k = 0; k < e.n_dims; ++k) {
            const uint64_t dim = e.dims[e.n_dims - 1 - k];
            if (!e.dims_ok || dim > (uint64_t(1) << 40))
                fail_file("%s: tensor '%s' has a bad shape entry", path.c_str(), pname);
            t.ne[k] = int64_t(dim);
            if (__builtin_mul_overflow(nel, size_t(dim), &nel))
                fail_file("%s: tensor '%s' has an impossible size", path.c_str(), pname);
        }
        const uint64_t b = e.offsets[0], end = e.offsets[1];
        if (!e.offsets_ok || end < b) fail_file("%s: tensor '%s' has bad data_offsets", path.c_str(), pname);
        size_t need = 0;
        if (__builtin_mul_overflow(nel, esize, &need) || end - b != need)
            fail_file("%s: tensor '%s' has %llu data bytes but its shape %s in %s needs %zu", path.c_str(), pname,
                      (unsigned long long)(end - b), t.shape_str().c_str(), printable(dt).c_str(), need);
        if (end > data_size)
            fail_file("%s: tensor '%s' lies past the end of the file (the file is truncated; download it again)",
                      path.c_str(), pname);
        t.data = d + data_start + size_t(b);
        t.nbytes = need;
        t.file = map_.get();
        tensors_.push_back(std::move(t));
    });
    jp.end();
    check_names_and_overlaps(tensors_, path);
}

// ---------------------------------------------------------------------------------------------
// Name normalisation: the one table of checkpoint prefixes and ignored tensors,
// python/fluxmini/data/names.txt, embedded at build time (names_table.h). The Python converter
// reads the same file (fluxmini/names.py, whose parser this one mirrors).

namespace {
int component_index(const std::string &name) {
    for (int c = 0; c < int(Component::Count); ++c)
        if (name == component_name(Component(c))) return c;
    return -1;
}

struct NameTable {
    struct Prefix {
        std::string prefix;
        Component component;
    };
    struct Ignore {
        int component;  // -1: every component
        char how;       // 's'uffix, 'p'refix, 'e'xact
        std::string text;
    };
    std::vector<std::vector<std::string>> rules;  // as written, for name_rules()
    std::vector<Prefix> prefixes;                 // longest first
    std::vector<Ignore> ignores;                  // duplicates' copies included (as exact names)

    explicit NameTable(const char *text) {
        std::istringstream in(text);
        std::string line;
        int number = 0;
        while (std::getline(in, line)) {
            ++number;
            line = line.substr(0, line.find('#'));
            std::istringstream words(line);
            std::vector<std::string> f;
            for (std::string w; words >> w;) f.push_back(w);
            if (f.empty()) continue;
            const std::string &kind = f[0];
            size_t arity = kind == "prefix" ? 3 : (kind == "layout" || kind == "ignore" || kind == "duplicate") ? 4 : 0;
            if (f.size() != arity) fail_runtime("names table line %d: cannot read '%s'", number, line.c_str());
            int comp = component_index(kind == "layout" ? f[2] : f[1]);
            if (comp < 0 && !(kind == "ignore" && f[1] == "*"))
                fail_runtime("names table line %d: unknown component '%s'", number, f[1].c_str());
            if (kind == "prefix") prefixes.push_back({f[2], Component(comp)});
            if (kind == "ignore") {
                if (f[2] != "suffix" && f[2] != "prefix" && f[2] != "exact")
                    fail_runtime("names table line %d: HOW must be suffix, prefix or exact", number);
                ignores.push_back({comp, f[2][0], f[3]});
            }
            if (kind == "duplicate") ignores.push_back({comp, 'e', f[2]});  // the loader uses the original
            rules.push_back(std::move(f));
        }
        std::stable_sort(prefixes.begin(), prefixes.end(),
                         [](const Prefix &a, const Prefix &b) { return a.prefix.size() > b.prefix.size(); });
    }

    bool ignored(int comp, const std::string &bare) const {
        for (const Ignore &r : ignores) {
            if (r.component >= 0 && r.component != comp) continue;
            size_t n = r.text.size();
            if ((r.how == 's' && bare.size() >= n && bare.compare(bare.size() - n, n, r.text) == 0) ||
                (r.how == 'p' && bare.compare(0, n, r.text) == 0) || (r.how == 'e' && bare == r.text))
                return true;
        }
        return false;
    }
};

const NameTable &name_table() {
    static const NameTable table(kNamesTable);
    return table;
}

bool starts(const std::string &s, const char *p) { return s.rfind(p, 0) == 0; }

// The component of a bare name (no prefix), or -1.
int classify_bare(const std::string &n) {
    if (starts(n, "double_blocks.") || starts(n, "single_blocks.") || starts(n, "img_in.") ||
        starts(n, "txt_in.") || starts(n, "time_in.") || starts(n, "vector_in.") || starts(n, "guidance_in.") ||
        starts(n, "final_layer."))
        return int(Component::Diffusion);
    if (starts(n, "text_model.") || starts(n, "embeddings.") || starts(n, "encoder.layers.") ||
        starts(n, "final_layer_norm."))
        return int(Component::ClipL);
    if (starts(n, "shared.") || starts(n, "encoder.block.") || starts(n, "encoder.final_layer_norm.") ||
        starts(n, "encoder.embed_tokens."))
        return int(Component::T5xxl);
    if (starts(n, "encoder.") || starts(n, "decoder.")) return int(Component::Vae);
    return -1;
}
}  // namespace

const TensorRef *ComponentWeights::find(const std::string &name) const {
    auto it = tensors.find(name);
    return it == tensors.end() ? nullptr : it->second;
}

const TensorRef &ComponentWeights::get(const std::string &name) const {
    const TensorRef *t = find(name);
    if (!t) {
        std::string from = sources.empty() ? std::string("the model files") : sources.front();
        fail_value("the %s weights lack the tensor '%s' (looked in %s); the file is incomplete or not a "
                   "FLUX.1-mini file; check it with `fluxmini info`",
                   component_name(component), name.c_str(), from.c_str());
    }
    return *t;
}

const TensorRef &ComponentWeights::get(const std::string &name, std::initializer_list<int64_t> ne) const {
    const TensorRef &t = get(name);
    bool ok = true;
    int k = 0;
    for (int64_t v : ne) {
        if (t.ne[k] != v) ok = false;
        ++k;
    }
    for (; k < 4; ++k)
        if (t.ne[k] != 1) ok = false;
    if (!ok) {
        std::string want = "[";
        std::vector<int64_t> v(ne);
        for (size_t i = v.size(); i-- > 0;) {
            want += std::to_string(v[i]);
            if (i) want += ", ";
        }
        want += "]";
        fail_value("%s tensor '%s' has shape %s but the architecture needs %s (inferred from the other tensors "
                   "of the file); the file is damaged or belongs to another model",
                   component_name(component), name.c_str(), t.shape_str().c_str(), want.c_str());
    }
    return t;
}

int ComponentWeights::count_indexed(const std::string &prefix) const {
    int n = 0;
    for (auto it = tensors.lower_bound(prefix); it != tensors.end() && starts(it->first, prefix.c_str()); ++it) {
        const char *p = it->first.c_str() + prefix.size();
        char *endp = nullptr;
        long v = std::strtol(p, &endp, 10);
        if (endp != p && *endp == '.' && v >= 0 && v < 100000) n = std::max(n, int(v) + 1);
    }
    return n;
}

WeightSet::WeightSet(const std::string &main, const std::string &clip_l, const std::string &t5xxl,
                     const std::string &vae) {
    for (int c = 0; c < int(Component::Count); ++c) comps_[c].component = Component(c);
    if (main.empty() && clip_l.empty() && t5xxl.empty() && vae.empty())
        fail_value("no model file given: pass the path of a FLUX.1-mini GGUF file");
    if (!main.empty()) add_file(main, -1);
    if (!clip_l.empty()) add_file(clip_l, int(Component::ClipL));
    if (!t5xxl.empty()) add_file(t5xxl, int(Component::T5xxl));
    if (!vae.empty()) add_file(vae, int(Component::Vae));
}

void WeightSet::add_file(const std::string &path, int forced) {
    files_.push_back(WeightFile::open(path));
    const WeightFile &f = *files_.back();
    // A component file given explicitly replaces that component of the main file.
    if (forced >= 0 && !comps_[forced].empty()) {
        log_info("%s replaces the %s weights of %s", path.c_str(), component_name(Component(forced)),
                 comps_[forced].sources.empty() ? "?" : comps_[forced].sources.front().c_str());
        comps_[forced].tensors.clear();
        comps_[forced].sources.clear();
    }
    bool contributed[int(Component::Count)] = {};
    for (const TensorRef &t : f.tensors()) {
        const std::string &n = t.file_name;
        int comp = -1;
        std::string bare;
        for (const NameTable::Prefix &r : name_table().prefixes) {
            if (n.compare(0, r.prefix.size(), r.prefix) == 0) {
                comp = int(r.component);
                bare = n.substr(r.prefix.size());
                break;
            }
        }
        if (comp < 0) {
            bare = n;
            comp = classify_bare(n);
        }
        // In a file given for one component, names that point to another component are ignored.
        if (forced >= 0) comp = (comp < 0 || comp == forced) ? forced : -1;
        // transformers 5.x saves CLIPTextModel without the "text_model." level.
        if (comp == int(Component::ClipL) && !starts(bare, "text_model.") &&
            (starts(bare, "embeddings.") || starts(bare, "encoder.layers.") || starts(bare, "final_layer_norm.")))
            bare = "text_model." + bare;
        // SD3-style files use cond_stage_model.1 for CLIP-G: only T5 content belongs to T5.
        if (comp == int(Component::T5xxl) && classify_bare(bare) != int(Component::T5xxl)) comp = -1;
        if (comp < 0 || name_table().ignored(comp, bare)) {
            ignored_.push_back(n);
            continue;
        }
        if (t.nelements() == 0)
            fail_value("%s: tensor '%s' is empty (shape %s); the file is damaged or belongs to another model",
                       path.c_str(), n.c_str(), t.shape_str().c_str());
        if (!t.supported)
            fail_value("%s: tensor '%s' has type %s, which fluxmini cannot compute with (supported: F32, F16, "
                       "BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K); requantize the file with "
                       "`fluxmini quantize`",
                       path.c_str(), n.c_str(), t.type == GGML_TYPE_I32 ? "integer" : ggml_type_name(t.type));
        auto &dst = comps_[comp].tensors;
        if (dst.count(bare))
            fail_value("tensor '%s' appears twice (in %s and again in %s); pass each component once", bare.c_str(),
                       dst[bare]->file->path().c_str(), path.c_str());
        dst[bare] = &t;
        contributed[comp] = true;
    }
    for (int c = 0; c < int(Component::Count); ++c)
        if (contributed[c]) comps_[c].sources.push_back(path);
    if (forced >= 0 && !contributed[forced])
        fail_value("%s holds no %s tensors (its tensor names were not recognised); pass the right file",
                   path.c_str(), component_name(Component(forced)));
}

std::vector<std::vector<std::string>> name_rules() { return name_table().rules; }

void WeightSet::release_pages(Component c, bool evict) const {
    for (auto &kv : comps_[int(c)].tensors) {
        const TensorRef &t = *kv.second;
        if (evict) t.file->evict_range(t.data, t.nbytes);
        else t.file->release_range(t.data, t.nbytes);
    }
}

}  // namespace fm
