// CUDA caching-allocator history and snapshots (pickle format of torch.cuda.memory).
#include <filesystem>
#include <fstream>

#include "titan/metrics/profiler.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"

#ifdef TITAN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <torch/csrc/cuda/memory_snapshot.h>
#endif

namespace titan::metrics {

#ifdef TITAN_WITH_CUDA
bool write_memory_snapshot(const std::string& path) {
  util::make_directories(util::path_str(std::filesystem::path(path).parent_path()));
  const std::string bytes = torch::cuda::_memory_snapshot_pickled();
  std::ofstream(path, std::ios::binary) << bytes;
  return true;
}

void start_memory_history(const std::string& oom_folder, int rank) {
  torch::cuda::_record_memory_history(std::optional<std::string>("all"),
                                      std::optional<std::string>("all"), "python", 100000);
  c10::cuda::CUDACachingAllocator::attachOutOfMemoryObserver(
      [oom_folder, rank](int64_t device, size_t allocated, size_t device_total,
                         size_t device_free) {
        const std::string path = (std::filesystem::path(oom_folder) /
                                  ("rank" + std::to_string(rank) + "_oom_snapshot.pickle"))
                                     .string();
        log::error("out of memory on cuda:{} ({} bytes allocated, {} free of {}); writing {}",
                   device, allocated, device_free, device_total, path);
        write_memory_snapshot(path);
      });
}
#else
bool write_memory_snapshot(const std::string&) {
  return false;
}
void start_memory_history(const std::string&, int) {}
#endif

}  // namespace titan::metrics
