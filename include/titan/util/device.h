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

// `bytes` bytes of host memory (a kByte tensor), page-locked where CUDA is, so that copies from
// a device into it run without the host: an ordinary allocation whose pages several threads
// touch, then registered with CUDA in one call (the caching host allocator would round the size
// up to a power of two and map the pages on one thread). Unregistered and freed with the
// tensor. Without CUDA, ordinary memory. Throws titan::Error when the memory cannot be had.
at::Tensor page_locked_host_bytes(size_t bytes);

// Out-of-memory reporting. The trainer registers what it knows before the first step (the
// plan's memory estimate, where a snapshot goes); out_of_memory_report() turns the allocator's
// message into one paragraph for the user: what ran out, needed vs free, and what to change.
struct OomContext {
  std::string device;         // "cuda:0 (NVIDIA H200, 139.8 GiB)"
  std::string estimate;       // "parameters + gradients + optimizer 114.3 GiB, ..." or empty
  std::string snapshot_path;  // where the out-of-memory snapshot is written, or empty
};
void set_oom_context(OomContext context);
std::string out_of_memory_report(const std::string& allocator_message);

}  // namespace titan
