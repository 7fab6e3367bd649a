// Device description and memory statistics (CUDA caching allocator, or process RSS on CPU).
#include "titan/util/device.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <unistd.h>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <mutex>
#include <string>

#include "titan/util/error.h"

#ifdef TITAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace titan {
namespace {

[[maybe_unused]] double peak_bf16_for(const std::string& name) {
  // Dense bf16 peaks (SXM parts); the H100/H200 number matches the reference trainer's.
  if (name.find("H100") != std::string::npos || name.find("H200") != std::string::npos ||
      name.find("H800") != std::string::npos || name.find("GH200") != std::string::npos) {
    return 989e12;
  }
  if (name.find("B200") != std::string::npos) return 2250e12;
  if (name.find("A100") != std::string::npos || name.find("A800") != std::string::npos) {
    return 312e12;
  }
  if (name.find("L40S") != std::string::npos) return 362e12;
  return 0;
}

int64_t read_status_kib(const char* key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(std::string(key).size()));
  }
  return 0;
}

}  // namespace

int cuda_device_count() {
#ifdef TITAN_WITH_CUDA
  return static_cast<int>(c10::cuda::device_count());
#else
  return 0;
#endif
}

DeviceInfo describe_device(const c10::Device& device) {
  DeviceInfo info;
  info.device = device;
#ifdef TITAN_WITH_CUDA
  if (device.is_cuda()) {
    const auto* prop = at::cuda::getDeviceProperties(device.index());
    info.name = prop->name;
    info.total_memory_bytes = static_cast<int64_t>(prop->totalGlobalMem);
    info.peak_flops = peak_bf16_for(info.name);
    return info;
  }
#endif
  info.name = "CPU (" + std::to_string(sysconf(_SC_NPROCESSORS_ONLN)) + " cores)";
  info.total_memory_bytes =
      static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
  return info;
}

MemoryStats memory_stats(const c10::Device& device) {
  MemoryStats m;
  constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
#ifdef TITAN_WITH_CUDA
  if (device.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const size_t agg = 0;  // StatType::AGGREGATE (its namespace moved between LibTorch versions)
    // allocated_bytes, not active_bytes: active also counts freed blocks still waiting for a
    // communication stream to finish with them.
    m.max_active_gib = static_cast<double>(stats.allocated_bytes[agg].peak) / kGiB;
    m.max_reserved_gib = static_cast<double>(stats.reserved_bytes[agg].peak) / kGiB;
    const auto* prop = at::cuda::getDeviceProperties(device.index());
    m.max_reserved_pct = 100.0 * static_cast<double>(stats.reserved_bytes[agg].peak) /
                         static_cast<double>(prop->totalGlobalMem);
    return m;
  }
#endif
  (void)device;
  const double hwm = static_cast<double>(read_status_kib("VmHWM:")) * 1024.0;
  m.max_active_gib = hwm / kGiB;
  m.max_reserved_gib = hwm / kGiB;
  const double total =
      static_cast<double>(sysconf(_SC_PHYS_PAGES)) * static_cast<double>(sysconf(_SC_PAGE_SIZE));
  m.max_reserved_pct = 100.0 * hwm / total;
  return m;
}

void reset_peak_memory(const c10::Device& device) {
#ifdef TITAN_WITH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#else
  (void)device;
#endif
}

void synchronize(const c10::Device& device) {
#ifdef TITAN_WITH_CUDA
  if (device.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)device;
#endif
}

namespace {
std::mutex oom_mutex;
OomContext& oom_context() {
  static OomContext context;
  return context;
}
}  // namespace

void set_oom_context(OomContext context) {
  std::lock_guard<std::mutex> lock(oom_mutex);
  oom_context() = std::move(context);
}

std::string out_of_memory_report(const std::string& allocator_message) {
  OomContext c;
  {
    std::lock_guard<std::mutex> lock(oom_mutex);
    c = oom_context();
  }
  // The allocator's first sentence says what it tried and what was free; the rest is advice
  // for Python users (PYTORCH_CUDA_ALLOC_CONF, ...), replaced by titan's own.
  std::string what = allocator_message;
  const size_t cut = what.find(" If reserved but unallocated");
  if (cut != std::string::npos) what = what.substr(0, cut);
  while (!what.empty() && (what.back() == '\n' || what.back() == ' ')) what.pop_back();
  std::string out = "out of memory" + (c.device.empty() ? "" : " on " + c.device) + ": " + what;
  if (!c.estimate.empty()) out += "\n  this plan needs about " + c.estimate;
  if (!c.snapshot_path.empty()) {
    out += "\n  memory snapshot: " + c.snapshot_path + " (open it at pytorch.org/memory_viz)";
  }
  out +=
      "\n  to fit: shard over more GPUs (parallelism.data_parallel_shard_degree), checkpoint "
      "activations (activation_checkpoint.mode = \"full\" or \"selective\"), lower "
      "training.local_batch_size or training.seq_len, or keep the optimizer state in host memory "
      "(training.enable_cpu_offload = true)";
  return out;
}

at::Tensor page_locked_host_bytes(size_t bytes) {
#ifdef TITAN_WITH_CUDA
  const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t size = std::max(page, (bytes + page - 1) / page * page);
  const double gib = std::round(static_cast<double>(size) / 1073741824.0 * 100) / 100;
  void* p = nullptr;
  TITAN_CHECK(posix_memalign(&p, page, size) == 0 && p != nullptr, "cannot allocate ", gib,
              " GiB of host memory");
  auto* base = static_cast<char*>(p);
  const auto pages = static_cast<int64_t>(size / page);
  at::parallel_for(0, pages, int64_t(1) << 14, [&](int64_t begin, int64_t end) {
    std::memset(base + static_cast<size_t>(begin) * page, 0,
                static_cast<size_t>(end - begin) * page);
  });
  const cudaError_t err = cudaHostRegister(p, size, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    std::free(p);
    fail("cannot page-lock ", gib, " GiB of host memory: ", cudaGetErrorString(err));
  }
  return at::from_blob(
      p, {static_cast<int64_t>(bytes)},
      [](void* q) {
        (void)cudaHostUnregister(q);
        (void)cudaGetLastError();
        std::free(q);
      },
      at::TensorOptions().dtype(at::kByte));
#else
  return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
#endif
}

}  // namespace titan
