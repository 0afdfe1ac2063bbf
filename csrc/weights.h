// Model files: mmap, GGUF and safetensors parsing with full validation, and the mapping of
// checkpoint names to the four components (one table, python/fluxmini/data/names.txt, embedded at build time).
#pragma once

#include <ggml.h>

#include <map>
#include <memory>
#include <string>
#include <vector>

namespace fm {

enum class Component { Diffusion = 0, ClipL = 1, T5xxl = 2, Vae = 3, Count = 4 };
const char *component_name(Component c);

// A read-only memory map of a whole file. Pages are loaded lazily by the OS.
class MappedFile {
public:
    explicit MappedFile(const std::string &path);
    ~MappedFile();
    MappedFile(const MappedFile &) = delete;
    MappedFile &operator=(const MappedFile &) = delete;

    const uint8_t *data() const { return base_; }
    size_t size() const { return size_; }
    const std::string &path() const { return path_; }
    // Tell the OS the pages of [ptr, ptr+n) are no longer needed (drops them from our RSS; the
    // page cache keeps them, so the next use is a minor fault).
    void release_range(const void *ptr, size_t n) const;
    // release_range() and drop the pages from the page cache too (the next use reads the disk).
    void evict_range(const void *ptr, size_t n) const;
    // Start reading [ptr, ptr+n) into the page cache now (asynchronous readahead).
    void prefetch_range(const void *ptr, size_t n) const;
    bool contains(const void *ptr) const {
        const uint8_t *p = static_cast<const uint8_t *>(ptr);
        return base_ && p >= base_ && p < base_ + size_;
    }
    // The live mapping that holds `ptr`, or nullptr (weights used in place point into one).
    static const MappedFile *containing(const void *ptr);

private:
    std::string path_;
    uint8_t *base_ = nullptr;
    size_t size_ = 0;
    int fd_ = -1;  // kept open for posix_fadvise
};

// One tensor as stored in a file: ggml order dims (ne[0] fastest), raw bytes in the mapping.
struct TensorRef {
    std::string file_name;  // name as stored in the file
    ggml_type type = GGML_TYPE_F32;
    int n_dims = 0;
    int64_t ne[4] = {1, 1, 1, 1};
    const uint8_t *data = nullptr;
    size_t nbytes = 0;
    const MappedFile *file = nullptr;
    bool supported = true;  // a type the engine computes with (others are fine if unused)

    int64_t nelements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
    std::string shape_str() const;  // PyTorch order, e.g. [3072, 64]
};

class WeightFile {
public:
    static std::unique_ptr<WeightFile> open(const std::string &path);

    const std::string &path() const { return map_->path(); }
    const char *format() const { return format_; }
    const std::vector<TensorRef> &tensors() const { return tensors_; }
    const std::map<std::string, std::string> &metadata() const { return metadata_; }
    const MappedFile &map() const { return *map_; }

private:
    void parse_gguf();
    void parse_safetensors();

    std::unique_ptr<MappedFile> map_;
    const char *format_ = "";
    std::vector<TensorRef> tensors_;
    std::map<std::string, std::string> metadata_;
};

// The tensors of one component under their normalised (bare) names.
struct ComponentWeights {
    Component component = Component::Diffusion;
    std::map<std::string, const TensorRef *> tensors;
    std::vector<std::string> sources;  // files that contributed

    bool empty() const { return tensors.empty(); }
    const TensorRef *find(const std::string &name) const;
    bool has(const std::string &name) const { return find(name) != nullptr; }
    // The tensor, or a FluxMiniValueError naming what is missing and what to do.
    const TensorRef &get(const std::string &name) const;
    // Checks ne (ggml order) exactly; a clear error otherwise.
    const TensorRef &get(const std::string &name, std::initializer_list<int64_t> ne) const;
    // Largest N over names "<prefix>N." (count = N + 1), 0 if none.
    int count_indexed(const std::string &prefix) const;
};

// Every file the user gave, merged into the four components.
class WeightSet {
public:
    // main: all-in-one file or diffusion-only; the others optional split files.
    WeightSet(const std::string &main, const std::string &clip_l, const std::string &t5xxl,
              const std::string &vae);

    const ComponentWeights &component(Component c) const { return comps_[int(c)]; }
    ComponentWeights &component(Component c) { return comps_[int(c)]; }
    const std::vector<std::string> &ignored() const { return ignored_; }
    const std::vector<std::unique_ptr<WeightFile>> &files() const { return files_; }
    // Drop the file pages of a component from memory (after its weights were released); with
    // `evict` from the page cache too.
    void release_pages(Component c, bool evict = false) const;

private:
    void add_file(const std::string &path, int forced /* -1 or Component */);

    std::vector<std::unique_ptr<WeightFile>> files_;
    ComponentWeights comps_[int(Component::Count)];
    std::vector<std::string> ignored_;
};

bool is_supported_type(ggml_type t);

// The rules of the embedded names table (python/fluxmini/data/names.txt) as parsed by the loader,
// one list of fields per rule in file order: tests compare them with the Python parse.
std::vector<std::vector<std::string>> name_rules();

}  // namespace fm
