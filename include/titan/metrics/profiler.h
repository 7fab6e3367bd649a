// Step profiling: LibTorch's Kineto profiler records CPU ops and CUDA kernels of chosen steps
// (profiling.profile_freq / profiler_warmup / profiler_active) and writes a Chrome trace per
// rank to <dump_folder>/<save_traces_folder>/iteration_<step>/rank<r>_trace.json; titan's own
// scopes (forward, backward, optimizer, data, communication) appear as user annotations.
// CUDA memory snapshots (profiling.enable_memory_snapshot) go to
// <dump_folder>/<save_memory_snapshot_folder>/iteration_<step>/rank<r>_memory_snapshot.pickle
// at the same steps and on out-of-memory (open them at pytorch.org/memory_viz).
#pragma once

#include <cstdint>
#include <string>

#include "titan/config/job_config.h"

namespace titan::metrics {

class Profiler {
 public:
  Profiler(const config::JobConfig& config, int rank, bool cuda);
  ~Profiler();
  // Brackets each training step.
  void step_begin(int64_t step);
  void step_end(int64_t step);
  bool active() const { return active_; }

 private:
  void dump_memory_snapshot(int64_t step);
  const config::ProfilingSection& cfg_;
  std::string trace_root_, snapshot_root_;
  int rank_;
  bool cuda_;
  bool prepared_ = false;
  bool active_ = false;
};

// Writes the CUDA caching-allocator snapshot (pickle, as torch.cuda.memory._dump_snapshot).
// Returns false where no CUDA allocator history exists (CPU builds).
bool write_memory_snapshot(const std::string& path);
// Starts recording allocation history (and installs the out-of-memory dump into `oom_folder`).
void start_memory_history(const std::string& oom_folder, int rank);

}  // namespace titan::metrics
