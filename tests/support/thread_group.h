// An in-process group of communicators for tests: each "rank" is a thread of one process, and
// collectives / point-to-point transfers exchange tensors through shared memory (synchronously,
// on CPU or on one GPU). Lets single-process tests (and single-GPU tests) run code written for a
// group, e.g. tensor parallelism's ring decompositions, rank by rank.
#pragma once

#include <functional>
#include <memory>
#include <vector>

#include "titan/dist/communicator.h"

namespace titan::test {

// Runs fn(rank, comm) on `size` threads, each with its member of one in-process group, and
// rethrows the first exception any thread raised.
void run_thread_group(int size, const std::function<void(int rank, dist::Communicator& comm)>& fn);

}  // namespace titan::test
