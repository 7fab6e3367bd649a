// Work split over threads for titan's own CPU loops (checkpoint reads and CRC checks, host weight
// initialization, populating staging memory). ATen's at::parallel_for runs serially in code not
// compiled with OpenMP, as titan is (a pip wheel's OpenMP runtime is its own), so titan runs
// these loops on std::threads, as many as ATen's intra-op thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace titan::util {

// Calls body(begin, end, thread) on contiguous ranges covering [0, n), each of at least `grain`
// items (the last may be shorter), on up to intra_op_threads() threads; the caller is thread 0
// and the others are started for the call. Runs serially (one call, thread 0) with one thread,
// for n <= grain, and inside another parallel_range. The first exception thrown on any thread
// is rethrown after every thread has finished. ATen operations in a body on several threads run
// serially on their thread (ATen's own parallel region guard).
void parallel_range(int64_t n, int64_t grain,
                    const std::function<void(int64_t begin, int64_t end, int thread)>& body);

// ATen's intra-op thread count (OMP_NUM_THREADS, torch.set_num_threads), at least 1.
int intra_op_threads();

// Whether the calling thread is running a parallel_range body.
bool in_parallel_range();

}  // namespace titan::util
