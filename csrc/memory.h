// The memory policy: how much memory the engine may use (EngineOptions::max_memory_mb, else the
// process's cgroup limit, v1 or v2, capped by MemAvailable) and what it does to stay under it:
// stream weights block by block, drop pages from the page cache, release compute buffers, tile
// the VAE. docs/ARCHITECTURE.md ("Memory") explains the rules.
#pragma once

#include "options.h"

#include <cstddef>
#include <cstdint>
#include <string>

namespace fm {

// What the system says about memory. 0 means "no limit" / "unknown".
struct MemoryLimits {
    uint64_t cgroup_bytes = 0;   // the smallest limit of this process's memory cgroup and its ancestors
    std::string cgroup_source;   // e.g. "cgroup v2 /sys/fs/cgroup/user.slice/memory.max"
    uint64_t available_bytes = 0;  // MemAvailable of /proc/meminfo
};

// A cgroup limit file's value: v2 memory.max ("max" or bytes), v1 memory.limit_in_bytes (bytes;
// a value near 2^63 means no limit). 0 for "no limit" and for text that is not a number.
uint64_t parse_cgroup_limit(const std::string &text);
// MemAvailable of a /proc/meminfo text in bytes (0 if absent).
uint64_t parse_mem_available(const std::string &meminfo);
// Reads the limits of this process under `root` ("/" normally; tests pass a directory laid out
// like one: proc/self/cgroup, proc/self/mountinfo, proc/meminfo, sys/fs/cgroup/...).
MemoryLimits read_memory_limits(const std::string &root = "/");

struct MemoryPolicy {
    uint64_t budget_bytes = 0;  // 0: no budget (nothing limits the engine)
    std::string source;         // where the budget comes from ("max_memory", "cgroup v1 ...", "MemAvailable", "none")
    bool stream = false;        // drop each block's mapped pages from the process after it ran, read the next ahead
    bool evict = false;         // also drop a component's pages from the page cache (a tight budget)
    bool release_compute = false;  // free compute buffers when a call ends (a tight budget)
    uint64_t vae_budget_bytes = 0;  // compute memory one VAE pass may take
    std::string describe() const;
};

// The policy for a model whose weight files hold `weight_bytes` (all components).
MemoryPolicy memory_policy(const EngineOptions &options, const MemoryLimits &limits, uint64_t weight_bytes);

}  // namespace fm
