// Constructors of the concrete communicator backends (NCCL in CUDA builds, Gloo where
// LibTorch ships its headers). Internal to the dist module and its tests.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
#include <memory>

#include "titan/dist/communicator.h"

namespace c10d {
class Store;
}

namespace titan::dist {

bool gloo_available();
bool nccl_available();

// World communicators over `store` (every rank calls this once).
std::unique_ptr<Communicator> make_gloo_world(c10d::Store* store, int rank, int size,
                                              std::chrono::milliseconds timeout,
                                              FlightRecorder* recorder);
std::unique_ptr<Communicator> make_nccl_world(c10d::Store* store, int rank, int size,
                                              c10::Device device, FlightRecorder* recorder);

}  // namespace titan::dist
