// parallel_range: every item once, in contiguous ranges, on several threads; serial when nested
// or with one thread; a body's exception reaches the caller.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <vector>

#include "titan/util/parallel.h"

namespace {

using titan::util::parallel_range;

// ATen's intra-op thread count for the scope of a test.
struct Threads {
  int before = at::get_num_threads();
  explicit Threads(int n) { at::set_num_threads(n); }
  ~Threads() { at::set_num_threads(before); }
};

TEST(ParallelRange, CoversEveryItemOnceInContiguousRangesOnSeveralThreads) {
  Threads threads(4);
  for (const int64_t n : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{1001}}) {
    SCOPED_TRACE(n);
    std::vector<std::atomic<int>> seen(static_cast<size_t>(n));
    std::mutex mu;
    std::set<std::thread::id> os_threads;
    std::set<int> numbers;
    parallel_range(n, 10, [&](int64_t begin, int64_t end, int thread) {
      EXPECT_LT(begin, end);
      EXPECT_TRUE(titan::util::in_parallel_range());
      for (int64_t i = begin; i < end; ++i) seen[static_cast<size_t>(i)]++;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));  // all threads overlap
      std::lock_guard<std::mutex> lock(mu);
      os_threads.insert(std::this_thread::get_id());
      numbers.insert(thread);
    });
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[static_cast<size_t>(i)].load(), 1) << i;
    // ceil(n / 10) ranges at most, on at most 4 threads: 1, 1, 4 and 4.
    const size_t want = n <= 10 ? 1u : 4u;
    EXPECT_EQ(os_threads.size(), want);
    EXPECT_EQ(numbers.size(), want);
    EXPECT_FALSE(titan::util::in_parallel_range());
  }
}

TEST(ParallelRange, NestedCallsAndOneThreadRunSerially) {
  Threads threads(4);
  std::atomic<int> inner_calls{0};
  parallel_range(4, 1, [&](int64_t, int64_t, int) {
    const auto outer = std::this_thread::get_id();
    parallel_range(100, 1, [&](int64_t begin, int64_t end, int thread) {
      EXPECT_EQ(begin, 0);
      EXPECT_EQ(end, 100);
      EXPECT_EQ(thread, 0);
      EXPECT_EQ(std::this_thread::get_id(), outer);
      inner_calls++;
    });
  });
  EXPECT_EQ(inner_calls.load(), 4);
  at::set_num_threads(1);
  int calls = 0;
  parallel_range(1000, 1, [&](int64_t begin, int64_t end, int) {
    EXPECT_EQ(end - begin, 1000);
    ++calls;
  });
  EXPECT_EQ(calls, 1);
}

TEST(ParallelRange, AnExceptionOnAnyThreadReachesTheCaller) {
  Threads threads(4);
  std::atomic<int> finished{0};
  EXPECT_THROW(parallel_range(4, 1,
                              [&](int64_t begin, int64_t, int) {
                                if (begin == 2) throw std::runtime_error("piece 2 failed");
                                finished++;
                              }),
               std::runtime_error);
  EXPECT_EQ(finished.load(), 3);  // the other threads ran to the end
}

}  // namespace
