// The distributed runtime of one process: rendezvous through a c10d TCPStore on
// MASTER_ADDR:MASTER_PORT, the world communicator (NCCL for CUDA devices, Gloo for CPU), the
// device mesh and its groups, the flight recorder and the watchdog.
#pragma once

#include <c10/core/Device.h>

#include <chrono>
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
  // Rank 0's `value` on every rank (through the store; `value` itself for world size 1).
  std::string share_from_rank0(const std::string& key, const std::string& value) const;
  // Switches the watchdog from the start-up timeout to comm.train_timeout_seconds.
  void enter_training();
  // How long a rank waits for its peers now: comm.init_timeout_seconds until training starts,
  // comm.train_timeout_seconds after; `key` names it for messages.
  std::chrono::seconds wait_timeout() const;
  const char* wait_timeout_key() const;

 private:
  void abort_all();
  // Which of `members` stopped publishing heartbeats (died): for failed transfers.
  std::string dead_peers(const std::vector<int>& members) const;
  LaunchEnv env_;
  const config::JobConfig& config_;
  bool training_ = false;
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
// `identity`: what every rank must agree on (JSON with the world size, titan's version and a
// digest of the resolved config); rank 0 compares each rank's with its own and names the first
// that differs.
struct Rendezvous;
std::shared_ptr<Rendezvous> rendezvous(const LaunchEnv& env, double timeout_s,
                                       const std::string& identity = "");
// The identity of this process for rendezvous(): world size, version, config digest.
std::string rendezvous_identity(const LaunchEnv& env, const config::JobConfig& config);
c10d::Store* rendezvous_store(const Rendezvous& r);

}  // namespace titan::dist
