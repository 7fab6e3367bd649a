// Kineto-based step profiler and the memory-snapshot schedule.
#include "titan/metrics/profiler.h"
#include "titan/util/device.h"
#include "titan/util/fs.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <filesystem>

#include "titan/util/log.h"

namespace titan::metrics {
namespace {

namespace prof = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

ProfilerConfig kineto_config() {
  return ProfilerConfig(ProfilerState::KINETO, false, false, false);
}

std::set<ActivityType> activities(bool cuda) {
  std::set<ActivityType> a{ActivityType::CPU};
  if (cuda) a.insert(ActivityType::CUDA);
  return a;
}

}  // namespace

Profiler::Profiler(const config::JobConfig& config, int rank, bool cuda)
    : cfg_(config.profiling), rank_(rank), cuda_(cuda) {
  trace_root_ = (std::filesystem::path(config.job.dump_folder) / cfg_.save_traces_folder).string();
  snapshot_root_ =
      (std::filesystem::path(config.job.dump_folder) / cfg_.save_memory_snapshot_folder).string();
  if (cfg_.enable_profiling) {
    util::ensure_writable_directory(util::path_str(trace_root_),
                                    "profiling.save_traces_folder (under job.dump_folder)");
  }
  if (cfg_.enable_memory_snapshot) {
    util::ensure_writable_directory(
        util::path_str(snapshot_root_),
        "profiling.save_memory_snapshot_folder (under job.dump_folder)");
  }
  if (cfg_.enable_memory_snapshot) {
    if (cuda_) {
      start_memory_history(snapshot_root_, rank_);
    } else {
      log::info("profiling.enable_memory_snapshot: CPU run, no CUDA allocator to snapshot");
    }
  }
}

Profiler::~Profiler() {
  if (active_) {
    try {
      prof::disableProfiler();
    } catch (...) {
    }
  }
}

void Profiler::step_begin(int64_t step) {
  if (!cfg_.enable_profiling) return;
  const int64_t freq = cfg_.profile_freq;
  const int64_t pos = (step - 1) % freq + 1;  // 1..freq inside the window
  const int64_t active_first = freq - cfg_.profiler_active + 1;
  const int64_t warm_first = std::max<int64_t>(1, active_first - cfg_.profiler_warmup);
  if (!prepared_ && pos >= warm_first && pos < active_first + cfg_.profiler_active) {
    prof::prepareProfiler(kineto_config(), activities(cuda_));
    prepared_ = true;
  }
  if (!active_ && pos == std::max<int64_t>(1, active_first)) {
    if (!prepared_) prof::prepareProfiler(kineto_config(), activities(cuda_));
    prepared_ = true;
    // The previous steps' kernels may still be running (the host runs ahead): they would land
    // in the window, which then holds more than its steps (as the stop below waits for the
    // last step's).
    if (cuda_) synchronize(c10::Device(c10::kCUDA));
    prof::enableProfiler(kineto_config(), activities(cuda_));
    active_ = true;
  }
}

void Profiler::step_end(int64_t step) {
  const bool window_end = step % cfg_.profile_freq == 0;
  if (active_ && window_end) {
    // The step's kernels are still running (nothing in a step waits for the GPU); stopping now
    // would drop the ones that end later (the tail of a pipeline step, the optimizer).
    if (cuda_) synchronize(c10::Device(c10::kCUDA));
    auto result = prof::disableProfiler();
    active_ = false;
    prepared_ = false;
    const auto dir = std::filesystem::path(trace_root_) / ("iteration_" + std::to_string(step));
    util::make_directories(util::path_str(dir));
    const std::string path = (dir / ("rank" + std::to_string(rank_) + "_trace.json")).string();
    result->save(path);
    log::info("profiler: wrote {} (steps {}-{})", path, step - cfg_.profiler_active + 1, step);
  }
  if (cfg_.enable_memory_snapshot && cuda_ && window_end) dump_memory_snapshot(step);
}

void Profiler::dump_memory_snapshot(int64_t step) {
  const auto dir = std::filesystem::path(snapshot_root_) / ("iteration_" + std::to_string(step));
  util::make_directories(util::path_str(dir));
  const std::string path =
      (dir / ("rank" + std::to_string(rank_) + "_memory_snapshot.pickle")).string();
  if (write_memory_snapshot(path)) log::info("memory snapshot: wrote {}", path);
}

}  // namespace titan::metrics
