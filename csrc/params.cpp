#include "params.h"

#include "common.h"
#include "cpu_qmatmul.h"

#include <ggml-cpu.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <map>

namespace fm {

void convert_to_f32(ggml_type type, const void *src, float *dst, int64_t n) {
    if (type == GGML_TYPE_F32) {
        std::memcpy(dst, src, size_t(n) * 4);
        return;
    }
    const ggml_type_traits *tr = ggml_get_type_traits(type);
    if (!tr || !tr->to_float) fail_value("cannot convert tensor type %s to F32", ggml_type_name(type));
    tr->to_float(src, dst, n);
}

ParamStore::ParamStore(Backend &backend, const ComponentWeights &weights) : backend_(backend), weights_(weights) {
    ggml_init_params ip{ggml_tensor_overhead() * 4096, nullptr, true};
    ctx_ = ggml_init(ip);
}

ParamStore::~ParamStore() {
    release();
    if (ctx_) ggml_free(ctx_);
}

void ParamStore::release() {
    for (auto b : buffers_) ggml_backend_buffer_free(b);
    buffers_.clear();
    for (auto &e : entries_) {
        e.tensor->buffer = nullptr;
        e.tensor->data = nullptr;
    }
    materialized_ = false;
    bytes_ = bytes_in_place_ = bytes_repacked_ = 0;
}

static ggml_type runtime_type(const TensorRef &src, ParamKind kind) {
    switch (kind) {
        case ParamKind::F32: return GGML_TYPE_F32;
        case ParamKind::Conv: return src.type == GGML_TYPE_F32 ? GGML_TYPE_F32 : GGML_TYPE_F16;
        default: return src.type;
    }
}

ggml_tensor *ParamStore::declare(const std::string &name, ParamKind kind, std::initializer_list<int64_t> ne) {
    if (materialized_) fail_runtime("internal error: parameter '%s' declared after materialize()", name.c_str());
    const TensorRef &src = weights_.get(name, ne);
    ggml_type type = runtime_type(src, kind);
    // Rows of a block-quantized type must be whole blocks; a file that breaks this is damaged.
    if (ggml_blck_size(type) > 1 && src.ne[0] % ggml_blck_size(type) != 0)
        fail_value("tensor '%s' of type %s has rows of %lld values, not a multiple of its block size",
                   name.c_str(), ggml_type_name(type), (long long)src.ne[0]);
    if ((kind == ParamKind::Matmul || kind == ParamKind::Embedding) && src.type != GGML_TYPE_F32) all_f32_ = false;
    ggml_tensor *t = ggml_new_tensor(ctx_, type, std::max(1, int(ne.size())), src.ne);
    ggml_set_name(t, name.size() < GGML_MAX_NAME ? name.c_str() : name.substr(name.size() - GGML_MAX_NAME + 1).c_str());
    entries_.push_back({t, &src, kind});
    return t;
}

ggml_tensor *ParamStore::declare_optional(const std::string &name, ParamKind kind, std::initializer_list<int64_t> ne) {
    return weights_.has(name) ? declare(name, kind, ne) : nullptr;
}

const char *placement_name(Placement p) {
    switch (p) {
        case Placement::InPlace: return "in place";
        case Placement::Repacked: return "repacked";
        case Placement::Converted: return "converted";
        case Placement::Copied: return "copied";
        case Placement::Device: return "on device";
    }
    return "?";
}

Placement ParamStore::place(const Entry &e, std::string *reason) const {
    const bool same_type = e.tensor->type == e.src->type;
    const bool aligned = (reinterpret_cast<uintptr_t>(e.src->data) % 32) == 0;
    const bool own_kernel = backend_.own_qmatmul() && e.kind == ParamKind::Matmul && qmatmul_shape(e.tensor);
    std::string type_upper = ggml_type_name(e.src->type);  // "q4_0" -> "Q4_0", as the docs write types
    for (char &ch : type_upper) ch = char(std::toupper(static_cast<unsigned char>(ch)));
    const char *src_type = type_upper.c_str();
    if (!backend_.is_cpu()) {
        *reason = strfmt("copied to the %s device", backend_.name().c_str());
        return Placement::Device;
    }
    if (e.kind == ParamKind::Matmul && same_type && e.src->n_dims == 2 && !own_kernel &&
        backend_.can_repack(e.tensor->type, e.tensor->ne[0], e.tensor->ne[1])) {
        *reason = strfmt("%s matmul weights in ggml's repacked layout (no fluxmini kernel for %s here%s)", src_type,
                         src_type, backend_.own_qmatmul() ? "" : ", or FLUXMINI_KERNELS=ggml");
        return Placement::Repacked;
    }
    if (!same_type) {
        if (e.kind == ParamKind::Conv)
            *reason = strfmt("%s convolution kernels widened to F16 (the convolution takes F16 or F32)", src_type);
        else
            *reason = strfmt("%s biases, norms and small tables converted to F32 (computed in F32)", src_type);
        return Placement::Converted;
    }
    if (!aligned) {
        *reason = strfmt("%s tensors not 32-byte aligned in the file", src_type);
        return Placement::Copied;
    }
    *reason = "used from the file mapping";
    return Placement::InPlace;
}

std::vector<PlacementRow> ParamStore::placement() const {
    std::vector<PlacementRow> rows;
    std::string reason;
    for (const Entry &e : entries_) {
        const Placement where = place(e, &reason);
        const int64_t bytes = int64_t(where == Placement::InPlace ? e.src->nbytes : ggml_nbytes(e.tensor));
        auto it = std::find_if(rows.begin(), rows.end(),
                               [&](const PlacementRow &r) { return r.where == where && r.reason == reason; });
        if (it == rows.end()) it = rows.insert(rows.end(), PlacementRow{where, reason, 0, 0});
        it->count += 1;
        it->bytes += bytes;
    }
    return rows;
}

void ParamStore::materialize() {
    if (materialized_) return;
    GgmlAbortGuard guard;
    // Sort each parameter into where it will live.
    std::vector<Entry *> in_place, repack, copied;
    std::string reason;
    for (auto &e : entries_) {
        switch (place(e, &reason)) {
            case Placement::Repacked: repack.push_back(&e); break;
            case Placement::InPlace: in_place.push_back(&e); break;
            default: copied.push_back(&e); break;
        }
    }
    // In place: one CPU buffer over each file mapping, tensors pointing into it (no copy).
    std::map<const MappedFile *, ggml_backend_buffer_t> file_bufs;
    for (Entry *e : in_place) {
        const MappedFile *f = e->src->file;
        auto it = file_bufs.find(f);
        if (it == file_bufs.end()) {
            ggml_backend_buffer_t b = ggml_backend_cpu_buffer_from_ptr(const_cast<uint8_t *>(f->data()), f->size());
            if (!b) fail_runtime("could not wrap the mapping of %s", f->path().c_str());
            buffers_.push_back(b);
            it = file_bufs.emplace(f, b).first;
        }
        if (ggml_backend_tensor_alloc(it->second, e->tensor, const_cast<uint8_t *>(e->src->data)) != GGML_STATUS_SUCCESS)
            fail_runtime("could not place tensor '%s' in memory", ggml_get_name(e->tensor));
        bytes_in_place_ += e->src->nbytes;
    }
    // Allocated groups: repacked CPU weights, and everything converted or uploaded.
    auto alloc_group = [&](std::vector<Entry *> &group, ggml_backend_buffer_type_t buft, bool is_repack) {
        if (group.empty()) return;
        const size_t align = ggml_backend_buft_get_alignment(buft);
        size_t total = 0;
        for (Entry *e : group) total += (ggml_backend_buft_get_alloc_size(buft, e->tensor) + align - 1) / align * align;
        ggml_backend_buffer_t buf = ggml_backend_buft_alloc_buffer(buft, total);
        if (!buf)
            fail_runtime("out of memory: could not allocate %.1f MiB for the %s weights on %s", total / 1048576.0,
                         component_name(weights_.component), ggml_backend_buft_name(buft));
        buffers_.push_back(buf);
        ggml_backend_buffer_set_usage(buf, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        uint8_t *base = static_cast<uint8_t *>(ggml_backend_buffer_get_base(buf));
        size_t off = 0;
        std::vector<float> f32;
        std::vector<uint8_t> conv;
        for (Entry *e : group) {
            ggml_tensor *t = e->tensor;
            if (ggml_backend_tensor_alloc(buf, t, base + off) != GGML_STATUS_SUCCESS)
                fail_runtime("could not place tensor '%s' in memory", ggml_get_name(t));
            off += (ggml_backend_buft_get_alloc_size(buft, t) + align - 1) / align * align;
            const int64_t n = ggml_nelements(t);
            if (t->type == e->src->type) {
                ggml_backend_tensor_set(t, e->src->data, 0, e->src->nbytes);
            } else {
                f32.resize(size_t(n));
                convert_to_f32(e->src->type, e->src->data, f32.data(), n);
                if (t->type == GGML_TYPE_F32) {
                    ggml_backend_tensor_set(t, f32.data(), 0, size_t(n) * 4);
                } else if (t->type == GGML_TYPE_F16) {
                    conv.resize(size_t(n) * 2);
                    ggml_fp32_to_fp16_row(f32.data(), reinterpret_cast<ggml_fp16_t *>(conv.data()), n);
                    ggml_backend_tensor_set(t, conv.data(), 0, conv.size());
                } else {
                    fail_runtime("internal error: no conversion to %s", ggml_type_name(t->type));
                }
            }
            if (is_repack) bytes_repacked_ += ggml_nbytes(t);
            // The copy is what we compute with now: drop the file's pages from our resident set.
            e->src->file->release_range(e->src->data, e->src->nbytes);
        }
        bytes_ += total;
    };
    alloc_group(repack, backend_.repack_buft(), true);
    ggml_backend_buffer_type_t main_buft = ggml_backend_get_default_buffer_type(backend_.main());
    alloc_group(copied, main_buft, false);
    bytes_ += bytes_in_place_;
    materialized_ = true;
    log_info("%s: %zu parameters, %.1f MiB (%.1f MiB in place from the file, %.1f MiB repacked)",
             component_name(weights_.component), entries_.size(), bytes_ / 1048576.0, bytes_in_place_ / 1048576.0,
             bytes_repacked_ / 1048576.0);
}

}  // namespace fm
