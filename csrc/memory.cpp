#include "memory.h"

#include "common.h"

#include <algorithm>
#include <fstream>
#include <sstream>
#include <vector>

namespace fm {

namespace {
constexpr uint64_t kMiB = uint64_t(1) << 20;

bool read_text(const std::string &path, std::string *out) {
    std::ifstream f(path);
    if (!f) return false;
    std::ostringstream s;
    s << f.rdbuf();
    *out = s.str();
    return true;
}

std::string trim(const std::string &s) {
    size_t b = s.find_first_not_of(" \t\r\n"), e = s.find_last_not_of(" \t\r\n");
    return b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
}

std::vector<std::string> split(const std::string &s, char sep) {
    std::vector<std::string> out;
    std::string cur;
    for (char c : s) {
        if (c == sep) {
            out.push_back(cur);
            cur.clear();
        } else {
            cur += c;
        }
    }
    out.push_back(cur);
    return out;
}

// A path inside `root` (root "/" leaves it as it is).
std::string under(const std::string &root, const std::string &path) {
    if (root.empty() || root == "/") return path;
    std::string r = root;
    while (!r.empty() && r.back() == '/') r.pop_back();
    return r + path;
}

struct CgroupMount {
    int version;            // 1 or 2
    std::string mount_root;  // the cgroup path the mount shows at its top ("/" outside containers)
    std::string mount_point;
};

// The memory hierarchies of /proc/self/mountinfo: "id parent dev root mountpoint opts ... - fstype src superopts".
std::vector<CgroupMount> cgroup_mounts(const std::string &mountinfo) {
    std::vector<CgroupMount> out;
    std::istringstream in(mountinfo);
    std::string line;
    while (std::getline(in, line)) {
        std::istringstream words(line);
        std::vector<std::string> f;
        for (std::string w; words >> w;) f.push_back(w);
        auto dash = std::find(f.begin(), f.end(), "-");
        if (f.size() < 5 || dash == f.end() || dash + 1 == f.end()) continue;
        const std::string &fstype = *(dash + 1);
        const std::string super = dash + 3 < f.end() ? *(dash + 3) : std::string();
        if (fstype == "cgroup2") out.push_back({2, f[3], f[4]});
        else if (fstype == "cgroup") {
            for (const std::string &o : split(super, ','))
                if (o == "memory") out.push_back({1, f[3], f[4]});
        }
    }
    return out;
}
}  // namespace

uint64_t parse_cgroup_limit(const std::string &text) {
    const std::string t = trim(text);
    if (t.empty() || t == "max") return 0;
    uint64_t v = 0;
    for (char c : t) {
        if (c < '0' || c > '9') return 0;
        if (v > (UINT64_MAX - 9) / 10) return 0;
        v = v * 10 + uint64_t(c - '0');
    }
    // cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value.
    if (v >= (uint64_t(1) << 62)) return 0;
    return v;
}

uint64_t parse_mem_available(const std::string &meminfo) {
    std::istringstream in(meminfo);
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("MemAvailable:", 0) != 0) continue;
        std::istringstream words(line.substr(13));
        uint64_t kb = 0;
        std::string unit;
        if (words >> kb) {
            words >> unit;
            return unit == "kB" || unit.empty() ? kb * 1024 : 0;
        }
    }
    return 0;
}

MemoryLimits read_memory_limits(const std::string &root) {
    MemoryLimits lim;
    std::string text;
    if (read_text(under(root, "/proc/meminfo"), &text)) lim.available_bytes = parse_mem_available(text);
    std::string cgroups, mountinfo;
    if (!read_text(under(root, "/proc/self/cgroup"), &cgroups) ||
        !read_text(under(root, "/proc/self/mountinfo"), &mountinfo))
        return lim;
    // This process's path in each hierarchy: "0::/path" (v2), "N:memory,...:/path" (v1).
    std::string path_v1, path_v2;
    bool has_v1 = false, has_v2 = false;
    std::istringstream in(cgroups);
    std::string line;
    while (std::getline(in, line)) {
        const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
        if (b == std::string::npos) continue;
        const std::string id = line.substr(0, a), controllers = line.substr(a + 1, b - a - 1), p = line.substr(b + 1);
        if (id == "0" && controllers.empty()) {
            path_v2 = p;
            has_v2 = true;
        }
        for (const std::string &c : split(controllers, ','))
            if (c == "memory") {
                path_v1 = p;
                has_v1 = true;
            }
    }
    for (const CgroupMount &m : cgroup_mounts(mountinfo)) {
        if ((m.version == 1 && !has_v1) || (m.version == 2 && !has_v2)) continue;
        std::string rel = m.version == 1 ? path_v1 : path_v2;
        // Inside a container the mount shows a subtree: strip its root from our path.
        if (m.mount_root != "/" && rel.rfind(m.mount_root, 0) == 0) rel = rel.substr(m.mount_root.size());
        if (rel.empty() || rel[0] != '/') rel = "/" + rel;
        const char *file = m.version == 1 ? "memory.limit_in_bytes" : "memory.max";
        // Limits nest: the smallest of our cgroup and its ancestors (up to the mount's top) applies.
        std::string dir = rel;
        while (true) {
            const std::string d = m.mount_point + (dir == "/" ? std::string() : dir);
            std::string value;
            if (read_text(under(root, d + "/" + file), &value)) {
                const uint64_t v = parse_cgroup_limit(value);
                if (v && (!lim.cgroup_bytes || v < lim.cgroup_bytes)) {
                    lim.cgroup_bytes = v;
                    lim.cgroup_source = strfmt("cgroup v%d %s/%s", m.version, d.c_str(), file);
                }
            }
            if (dir == "/" || dir.empty()) break;
            const size_t slash = dir.find_last_of('/');
            dir = slash == 0 ? "/" : dir.substr(0, slash);
        }
    }
    return lim;
}

std::string MemoryPolicy::describe() const {
    std::string s = budget_bytes ? strfmt("budget %.0f MiB (%s)", budget_bytes / double(kMiB), source.c_str())
                                 : std::string("no memory budget");
    s += stream ? "; weights streamed block by block" : "; weights not streamed";
    if (evict) s += ", dropped from the page cache after use";
    if (release_compute) s += "; compute buffers released after each call";
    s += strfmt("; VAE compute up to %.0f MiB", vae_budget_bytes / double(kMiB));
    return s;
}

MemoryPolicy memory_policy(const EngineOptions &o, const MemoryLimits &lim, uint64_t weight_bytes) {
    MemoryPolicy p;
    if (o.max_memory_mb) {
        p.budget_bytes = uint64_t(o.max_memory_mb) * kMiB;
        p.source = "max_memory";
    } else if (lim.cgroup_bytes && (!lim.available_bytes || lim.cgroup_bytes <= lim.available_bytes)) {
        p.budget_bytes = lim.cgroup_bytes;
        p.source = lim.cgroup_source;
    } else if (lim.available_bytes) {
        p.budget_bytes = lim.available_bytes;
        p.source = "MemAvailable";
    } else {
        p.source = "none";
    }
    // Tight: the weight files and a compute headroom do not fit together, so pages must be given
    // back as soon as they were used (the kernel would otherwise have to find them itself, and
    // the page cache of a used component would crowd the next one's anonymous memory).
    const uint64_t headroom = uint64_t(1024) * kMiB;
    const bool tight = p.budget_bytes && p.budget_bytes < weight_bytes + headroom;
    p.stream = o.stream == StreamMode::On || o.stream == StreamMode::Auto;
    p.evict = tight;
    p.release_compute = tight;
    const uint64_t vae_cap = uint64_t(o.vae_budget_mb) * kMiB;
    // Under a tight budget the VAE gets what the process, the VAE weights and the latent leave.
    p.vae_budget_bytes = tight ? std::min(vae_cap, std::max<uint64_t>(p.budget_bytes / 2, 128 * kMiB)) : vae_cap;
    return p;
}

}  // namespace fm
