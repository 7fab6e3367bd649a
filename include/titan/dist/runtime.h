// The distributed runtime of one process: rendezvous through a c10d TCPStore on
// MASTER_ADDR:MASTER_PORT, the world communicator (NCCL for CUDA devices, Gloo for CPU), the
// device mesh and its groups, the flight recorder and the watchdog.
#pragma once

#include <c10/core/Device.h>

#include <memory>
#include <string>

#include "titan/config/job_config.h"
#include "titan/dist/communicator.h"
#include "titan/dist/device_mesh.h"
#include "titan/dist/flight_recorder.h"
#include "titan/dist/launch.h"

namespace c10d {
class Store;
}

namespace titan::dist {

class Runtime {
 public:
  // For world size 1 nothing is started and every group is absent.
  Runtime(const LaunchEnv& env, const config::JobConfig& config, c10::Device device);
  ~Runtime();

  const LaunchEnv& env() const { return env_; }
  const DeviceMesh& mesh() const { return *mesh_; }
  Communicator* world() const { return world_.get(); }
  FlightRecorder& recorder() { return recorder_; }
  c10d::Store* store() const;
  // Switches the watchdog from the start-up timeout to comm.train_timeout_seconds.
  void enter_training();

 private:
  void abort_all();
  LaunchEnv env_;
  const config::JobConfig& config_;
  FlightRecorder recorder_;
  struct StoreHolder;
  std::unique_ptr<StoreHolder> store_;
  std::unique_ptr<Communicator> world_;
  std::unique_ptr<DeviceMesh> mesh_;
  std::unique_ptr<Watchdog> watchdog_;
};

// Connects to (rank 0: serves) the TCPStore and waits until every rank arrived; a missing peer
// becomes a titan::Error naming the ranks that did not arrive within `timeout_s`.
// Exposed for tests; Runtime calls it.
struct Rendezvous;
std::shared_ptr<Rendezvous> rendezvous(const LaunchEnv& env, double timeout_s);
c10d::Store* rendezvous_store(const Rendezvous& r);

}  // namespace titan::dist
