// Flight recorder and watchdog. Every collective gets a per-group sequence number and a record
// (op, group, size, dtype, enqueue/start/end times) in a bounded ring; a watchdog thread
// tracks completion, publishes each group's progress to the store, and when a collective has
// not finished within the timeout it dumps the records, names the ranks that never reached
// the collective, aborts the communicators and ends the process with a clear error.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "titan/dist/communicator.h"

namespace c10d {
class Store;
}

namespace titan::dist {

struct CollectiveRecord {
  uint64_t id = 0;  // process-wide order
  std::string group;
  uint64_t group_seq = 0;  // the same on every member of the group
  const std::vector<int>* ranks = nullptr;
  std::string op;
  int64_t numel = 0;
  std::string dtype;
  double enqueue_s = 0, start_s = -1, end_s = -1;  // wall-clock seconds, -1 unknown
  WorkPtr work;                                    // held until completion is observed
  bool completed = false;
};

class FlightRecorder {
 public:
  explicit FlightRecorder(size_t capacity) : capacity_(capacity) {}
  // Opens a record; returns the group's sequence number.
  uint64_t begin(const std::string& group, const std::vector<int>* ranks, const char* op,
                 int64_t numel, const std::string& dtype);
  void attach(const std::string& group, uint64_t group_seq, WorkPtr work);
  // Updates start/end times of pending records (watchdog thread).
  void poll();
  // The oldest record not completed, if any.
  bool oldest_pending(CollectiveRecord& out);
  // Last sequence number begun, per group.
  std::map<std::string, uint64_t> progress();
  std::string dump_json(int rank);
  size_t size();

 private:
  std::mutex mu_;
  size_t capacity_;
  uint64_t next_id_ = 0;
  std::map<std::string, uint64_t> group_seq_;
  std::deque<CollectiveRecord> records_;
};

struct WatchdogOptions {
  int rank = 0;
  int world_size = 1;
  double timeout_s = 100;
  std::string dump_folder;            // <job.dump_folder>/<comm.save_traces_folder>
  std::string file_prefix = "rank_";  // comm.save_traces_file_prefix: <prefix><rank>.json
  double poll_interval_s = 0.5;
};

class Watchdog {
 public:
  // `store`: where progress is published (may be null for one process). `abort_all`: stops
  // every communicator.
  Watchdog(FlightRecorder& recorder, c10d::Store* store, WatchdogOptions options,
           std::function<void()> abort_all);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

 private:
  void loop();
  [[noreturn]] void fire(const CollectiveRecord& stuck);
  FlightRecorder& recorder_;
  c10d::Store* store_;
  WatchdogOptions options_;
  std::function<void()> abort_all_;
  std::map<std::string, uint64_t> published_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

double wall_seconds();
// The store key where a rank's watchdog publishes its heartbeat (wall time, every poll).
std::string heartbeat_key(int rank);

}  // namespace titan::dist
