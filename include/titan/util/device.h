// The compute device: what it is, its peak rate for MFU, memory statistics, synchronization.
#pragma once

#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace at {
class Tensor;
}

namespace titan {

struct DeviceInfo {
  c10::Device device{c10::kCPU};
  std::string name;
  double peak_flops = 0;  // dense bf16 FLOP/s, 0 when unknown (no MFU then)
  int64_t total_memory_bytes = 0;
};

// The host memory this process may use: the physical memory or its control group's limit
// (cgroup v2 memory.max or v1 memory.limit_in_bytes, the tightest of its group and the groups
// above: Slurm's --mem, a container's or a systemd slice's limit), shared with the other
// processes there, and its own address-space limit (ulimit -v). Read once.
struct HostMemory {
  int64_t shared_bytes = 0;
  std::string shared_bound;   // "physical memory" or "cgroup limit"
  int64_t process_bytes = 0;  // ulimit -v; 0 when unlimited
  // The tighter of the two for this process alone.
  int64_t bytes() const;
  std::string bound() const;
};
const HostMemory& host_memory();
// The tightest cgroup memory limit over the groups listed in `proc_self_cgroup` (the text of
// /proc/self/cgroup) and their ancestors, under the hierarchy mounted at `root`
// (/sys/fs/cgroup); 0 for none.
int64_t cgroup_memory_limit(const std::string& root, const std::string& proc_self_cgroup);

int cuda_device_count();
DeviceInfo describe_device(const c10::Device& device);

struct MemoryStats {
  double max_active_gib = 0;    // peak memory held by tensors (allocated bytes, as
                                // torch.cuda.max_memory_allocated reports)
  double max_reserved_gib = 0;  // peak memory held by the caching allocator (CUDA) or RSS (CPU)
  double max_reserved_pct = 0;  // of the device's total
};
MemoryStats memory_stats(const c10::Device& device);
void reset_peak_memory(const c10::Device& device);
void synchronize(const c10::Device& device);

// `bytes` bytes of host memory (a kByte tensor) for large staging buffers, present before it
// is returned: an anonymous mapping that asks for transparent huge pages, populated by all
// threads. One process takes its page faults nearly one at a time: 16 GiB in 4 KiB pages is 4
// million faults (about 9 s measured on an H100 machine's host, whatever the thread count),
// in 2 MiB pages 8 thousand. Unmapped with the tensor. Throws titan::Error when the memory
// cannot be had (also when it runs out while populating, where the kernel reports it).
at::Tensor large_host_bytes(size_t bytes);

// large_host_bytes, page-locked where CUDA is (registered with CUDA in one call; the caching
// host allocator would round the size up to a power of two and map the pages on one thread),
// so that copies from a device into it run without the host. Unregistered and unmapped with
// the tensor. Without CUDA, large_host_bytes.
at::Tensor page_locked_host_bytes(size_t bytes);

// Out-of-memory reporting. The trainer registers what it knows before the first step (the
// plan's memory estimate, where a snapshot goes); out_of_memory_report() turns the allocator's
// message into one paragraph for the user: what ran out, needed vs free, and what to change.
struct OomContext {
  std::string device;         // "cuda:0 (NVIDIA H200, 139.8 GiB)"; empty for a CPU run
  std::string estimate;       // "parameters + gradients + optimizer 114.3 GiB, ..." or empty
  std::string snapshot_path;  // where the out-of-memory snapshot is written, or empty
  std::string host;           // "23.4 GiB, 2 rank(s) on this host"; empty before it is known
  bool cpu_offload = false;   // training.enable_cpu_offload (state kept in host memory)
};
void set_oom_context(OomContext context);
std::string out_of_memory_report(const std::string& allocator_message);
// Whether an error message is a host allocation failure (ATen's CPU allocator).
bool is_host_allocation_failure(const std::string& message);
// The same for host memory: what failed, the plan's estimate, and how to fit.
std::string host_out_of_memory_report(const std::string& allocator_message);

}  // namespace titan
