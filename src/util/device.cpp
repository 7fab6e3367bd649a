// Device description and memory statistics (CUDA caching allocator, or process RSS on CPU).
#include "titan/util/device.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>

#include "titan/util/error.h"
#include "titan/util/parallel.h"

#ifdef TITAN_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace titan {
namespace {

[[maybe_unused]] double peak_bf16_for(const std::string& name) {
  // Dense bf16 peaks, as torchtitan's get_peak_flops: SXM parts, and the H100's PCIe and NVL
  // cards at their lower clocks.
  if (name.find("H100") != std::string::npos && name.find("NVL") != std::string::npos) {
    return 835e12;
  }
  if (name.find("H100") != std::string::npos && name.find("PCIe") != std::string::npos) {
    return 756e12;
  }
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

// A cgroup memory limit file's value; 0 for "max", a missing file or an unset (huge) v1 value.
int64_t cgroup_limit(const std::string& path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return 0;
  try {
    const long long v = std::stoll(text);
    return v > 0 && v < (int64_t{1} << 60) ? static_cast<int64_t>(v) : 0;
  } catch (const std::exception&) {
    return 0;
  }
}

}  // namespace

int64_t cgroup_memory_limit(const std::string& root, const std::string& proc_self_cgroup) {
  namespace fs = std::filesystem;
  int64_t limit = 0;
  auto take = [&](const fs::path& file) {
    const int64_t v = cgroup_limit(file.string());
    if (v > 0 && (limit == 0 || v < limit)) limit = v;
  };
  // The group's file and each ancestor's up to the mount's root (which is also a container's
  // own group when the listed path is not visible inside it).
  auto take_up = [&](const fs::path& base, const std::string& group, const char* file) {
    const fs::path top = base.lexically_normal();
    fs::path dir = (base / fs::path(group).relative_path()).lexically_normal();
    const std::string under = top.string() + "/";
    for (int depth = 0; depth < 64 && dir.string().rfind(under, 0) == 0; ++depth) {
      take(dir / file);
      dir = dir.parent_path();
    }
    take(top / file);
  };
  std::istringstream in(proc_self_cgroup);
  std::string line;
  while (std::getline(in, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    const std::string group = line.substr(b + 1);
    if (controllers.empty()) {  // v2: "0::/path"
      take_up(fs::path(root), group, "memory.max");
    } else if (("," + controllers + ",").find(",memory,") != std::string::npos) {
      take_up(fs::path(root) / "memory", group, "memory.limit_in_bytes");
    }
  }
  return limit;
}

int64_t HostMemory::bytes() const {
  return process_bytes > 0 && process_bytes < shared_bytes ? process_bytes : shared_bytes;
}

std::string HostMemory::bound() const {
  return process_bytes > 0 && process_bytes < shared_bytes ? "ulimit -v" : shared_bound;
}

const HostMemory& host_memory() {
  static const HostMemory memory = [] {
    HostMemory m;
    m.shared_bytes = static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) *
                     static_cast<int64_t>(sysconf(_SC_PAGE_SIZE));
    m.shared_bound = "physical memory";
    std::ifstream in("/proc/self/cgroup");
    std::stringstream text;
    text << in.rdbuf();
    if (const int64_t cg = cgroup_memory_limit("/sys/fs/cgroup", text.str());
        cg > 0 && cg < m.shared_bytes) {
      m.shared_bytes = cg;
      m.shared_bound = "cgroup limit";
    }
    struct rlimit as {};
    if (getrlimit(RLIMIT_AS, &as) == 0 && as.rlim_cur != RLIM_INFINITY) {
      m.process_bytes = static_cast<int64_t>(as.rlim_cur);
    }
    return m;
  }();
  return memory;
}

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
  info.total_memory_bytes = host_memory().bytes();
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
  m.max_reserved_pct = 100.0 * hwm / static_cast<double>(host_memory().bytes());
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

namespace {

OomContext current_oom_context() {
  std::lock_guard<std::mutex> lock(oom_mutex);
  return oom_context();
}

void trim_end(std::string& s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == ' ')) s.pop_back();
}

}  // namespace

std::string out_of_memory_report(const std::string& allocator_message) {
  const OomContext c = current_oom_context();
  // The allocator's first sentence says what it tried and what was free; the rest is advice
  // for Python users (PYTORCH_CUDA_ALLOC_CONF, ...), replaced by titan's own.
  std::string what = allocator_message;
  const size_t cut = what.find(" If reserved but unallocated");
  if (cut != std::string::npos) what = what.substr(0, cut);
  trim_end(what);
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

bool is_host_allocation_failure(const std::string& message) {
  return message.find("DefaultCPUAllocator: can't allocate memory") != std::string::npos ||
         message.find("DefaultCPUAllocator: not enough memory") != std::string::npos;
}

std::string host_out_of_memory_report(const std::string& allocator_message) {
  const OomContext c = current_oom_context();
  // From ATen's own words on (its "[enforce fail at ...]" prefix is for ATen's developers).
  std::string what = allocator_message;
  const size_t start = what.find("DefaultCPUAllocator");
  if (start != std::string::npos) what = what.substr(start);
  trim_end(what);
  std::string out = "out of host memory: " + what;
  if (!c.estimate.empty()) {
    out += "\n  this plan needs about " + c.estimate;
    if (!c.host.empty()) out += " (host memory: " + c.host + ")";
  }
  // Far below the bound, the request itself may be wrong rather than the plan too large.
  out += fmt::format("\n  this process held {:.1f} GiB at its peak",
                     static_cast<double>(read_status_kib("VmHWM:")) / (1024.0 * 1024.0));
  if (c.device.empty()) {
    out +=
        "\n  to fit: a smaller model.flavor, a lower training.local_batch_size or "
        "training.seq_len, checkpointed activations (activation_checkpoint.mode = \"full\"), "
        "fewer processes on this host, or more hosts sharing the model "
        "(parallelism.data_parallel_shard_degree)";
  } else if (c.cpu_offload) {
    out +=
        "\n  training.enable_cpu_offload keeps the weights, gradients and optimizer state in "
        "host memory: shard them over more ranks (parallelism.data_parallel_shard_degree), run "
        "fewer ranks per host, or turn the offload off where the GPUs can hold the state";
  } else {
    out += "\n  free host memory, or run fewer ranks per host";
  }
  return out;
}

namespace {

constexpr size_t kHugePageBytes = size_t{2} << 20;

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

double gib_of(size_t bytes) {
  return std::round(static_cast<double>(bytes) / 1073741824.0 * 100) / 100;
}

// `size` bytes (a multiple of 2 MiB) at a 2 MiB boundary, huge pages asked for, populated.
void* map_populated(size_t size) {
  // Mapped with one huge page to spare, then trimmed to a 2 MiB boundary: transparent huge
  // pages need aligned 2 MiB ranges.
  const size_t padded = size + kHugePageBytes;
  void* raw = mmap(nullptr, padded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TITAN_CHECK(raw != MAP_FAILED, "cannot allocate ", gib_of(size), " GiB of host memory (",
              std::strerror(errno), ")");
  const auto start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = (start + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
  if (aligned > start) munmap(raw, aligned - start);
  if (const size_t tail = start + padded - (aligned + size); tail > 0) {
    munmap(reinterpret_cast<void*>(aligned + size), tail);
  }
  auto* base = reinterpret_cast<char*>(aligned);
  (void)madvise(base, size, MADV_HUGEPAGE);  // a kernel without THP keeps 4 KiB pages
  // Populated in 64 MiB pieces by all threads; a kernel before 5.14 has no POPULATE_WRITE,
  // and the pieces are touched instead.
  constexpr size_t kPiece = size_t{64} << 20;
  const auto pieces = static_cast<int64_t>((size + kPiece - 1) / kPiece);
  std::atomic<int> out_of_memory{0};
  util::parallel_range(pieces, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      char* p = base + static_cast<size_t>(i) * kPiece;
      const size_t n = std::min(kPiece, size - static_cast<size_t>(i) * kPiece);
      if (madvise(p, n, MADV_POPULATE_WRITE) == 0) continue;
      if (errno == ENOMEM || errno == EFAULT) {
        out_of_memory = 1;
        return;
      }
      const auto page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
      for (size_t k = 0; k < n; k += page) p[k] = 0;
    }
  });
  if (out_of_memory) {
    munmap(base, size);
    fail("cannot allocate ", gib_of(size), " GiB of host memory: the host is out of memory");
  }
  return base;
}

}  // namespace

at::Tensor large_host_bytes(size_t bytes) {
  const size_t size =
      std::max(kHugePageBytes, (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes);
  void* p = map_populated(size);
  return at::from_blob(
      p, {static_cast<int64_t>(bytes)}, [size](void* q) { munmap(q, size); },
      at::TensorOptions().dtype(at::kByte));
}

at::Tensor page_locked_host_bytes(size_t bytes) {
#ifdef TITAN_WITH_CUDA
  const size_t size =
      std::max(kHugePageBytes, (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes);
  void* p = map_populated(size);
  const cudaError_t err = cudaHostRegister(p, size, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    munmap(p, size);
    fail("cannot page-lock ", gib_of(size), " GiB of host memory: ", cudaGetErrorString(err));
  }
  return at::from_blob(
      p, {static_cast<int64_t>(bytes)},
      [size](void* q) {
        (void)cudaHostUnregister(q);
        (void)cudaGetLastError();
        munmap(q, size);
      },
      at::TensorOptions().dtype(at::kByte));
#else
  return large_host_bytes(bytes);
#endif
}

}  // namespace titan
