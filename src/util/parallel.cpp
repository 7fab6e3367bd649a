// parallel_range: contiguous ranges of a loop on std::threads (see the header for why not
// at::parallel_for).
#include "titan/util/parallel.h"

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>

#include <algorithm>
#include <exception>
#include <thread>
#include <vector>

namespace titan::util {
namespace {

thread_local bool g_in_parallel = false;

// Marks the calling thread as inside a parallel body for its scope.
struct ParallelScope {
  bool before;
  ParallelScope() : before(g_in_parallel) { g_in_parallel = true; }
  ~ParallelScope() { g_in_parallel = before; }
};

}  // namespace

int intra_op_threads() {
  return std::max(1, at::get_num_threads());
}

bool in_parallel_range() {
  return g_in_parallel;
}

void parallel_range(int64_t n, int64_t grain,
                    const std::function<void(int64_t begin, int64_t end, int thread)>& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t most = (n + grain - 1) / grain;
  const int threads = static_cast<int>(std::min<int64_t>(intra_op_threads(), most));
  if (threads <= 1 || g_in_parallel) {
    ParallelScope scope;
    body(0, n, 0);
    return;
  }
  const int64_t per = (n + threads - 1) / threads;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(threads));
  auto run = [&](int t) {
    ParallelScope scope;
    // ATen operations inside run on this thread alone (no team of threads per worker).
    c10::ParallelGuard aten_serial(true);
    const int64_t begin = t * per, end = std::min(n, begin + per);
    if (begin >= end) return;
    try {
      body(begin, end, t);
    } catch (...) {
      errors[static_cast<size_t>(t)] = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(static_cast<size_t>(threads - 1));
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
  for (const auto& e : errors) {
    if (e) std::rethrow_exception(e);
  }
}

}  // namespace titan::util
