// Flight recorder ring and the watchdog that turns a hang into an error.
#include "titan/dist/flight_recorder.h"
#include "titan/util/fs.h"

#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#include "titan/util/strings.h"

namespace titan::dist {

double wall_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

uint64_t FlightRecorder::begin(const std::string& group, const std::vector<int>* ranks,
                               const char* op, int64_t numel, const std::string& dtype) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t seq = ++group_seq_[group];
  CollectiveRecord r;
  r.id = next_id_++;
  r.group = group;
  r.group_seq = seq;
  r.ranks = ranks;
  r.op = op;
  r.numel = numel;
  r.dtype = dtype;
  r.enqueue_s = wall_seconds();
  records_.push_back(std::move(r));
  // Keep the ring bounded: drop the oldest completed records first.
  while (records_.size() > capacity_ && !records_.empty() && records_.front().completed) {
    records_.pop_front();
  }
  return seq;
}

void FlightRecorder::attach(const std::string& group, uint64_t group_seq, WorkPtr work) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = records_.rbegin(); it != records_.rend(); ++it) {
    if (it->group_seq == group_seq && it->group == group) {
      if (work) {
        it->work = std::move(work);
      } else {
        it->completed = true;
        it->end_s = wall_seconds();
      }
      return;
    }
  }
}

void FlightRecorder::poll() {
  std::lock_guard<std::mutex> lock(mu_);
  const double now = wall_seconds();
  for (auto& r : records_) {
    if (r.completed || !r.work) continue;
    if (r.start_s < 0 && r.work->started()) r.start_s = now;
    if (r.work->completed()) {
      if (r.start_s < 0) r.start_s = now;
      r.end_s = now;
      r.completed = true;
      r.work.reset();
    }
  }
  while (records_.size() > capacity_ && records_.front().completed) records_.pop_front();
}

bool FlightRecorder::oldest_pending(CollectiveRecord& out) {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& r : records_) {
    if (!r.completed) {
      out = r;
      out.work.reset();
      return true;
    }
  }
  return false;
}

std::map<std::string, uint64_t> FlightRecorder::progress() {
  std::lock_guard<std::mutex> lock(mu_);
  return group_seq_;
}

size_t FlightRecorder::size() {
  std::lock_guard<std::mutex> lock(mu_);
  return records_.size();
}

std::string FlightRecorder::dump_json(int rank) {
  std::lock_guard<std::mutex> lock(mu_);
  nlohmann::json j;
  j["rank"] = rank;
  j["dumped_at"] = wall_seconds();
  auto& entries = j["entries"] = nlohmann::json::array();
  for (const auto& r : records_) {
    nlohmann::json e;
    e["id"] = r.id;
    e["group"] = r.group;
    e["group_seq"] = r.group_seq;
    e["op"] = r.op;
    e["numel"] = r.numel;
    e["dtype"] = r.dtype;
    e["ranks"] = r.ranks ? *r.ranks : std::vector<int>{};
    e["enqueue_s"] = r.enqueue_s;
    e["start_s"] = r.start_s;
    e["end_s"] = r.end_s;
    e["state"] = r.completed ? "completed" : (r.start_s >= 0 ? "started" : "enqueued");
    entries.push_back(std::move(e));
  }
  return j.dump(1);
}

namespace {
std::string progress_key(const std::string& group, int rank) {
  return "titan/fr/" + group + "/" + std::to_string(rank);
}
}  // namespace

std::string heartbeat_key(int rank) {
  return "titan/alive/" + std::to_string(rank);
}

Watchdog::Watchdog(FlightRecorder& recorder, c10d::Store* store, WatchdogOptions options,
                   std::function<void()> abort_all)
    : recorder_(recorder),
      store_(store),
      options_(std::move(options)),
      abort_all_(std::move(abort_all)) {
  thread_ = std::thread([this] { loop(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Watchdog::loop() {
  const auto interval = std::chrono::duration<double>(options_.poll_interval_s);
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (cv_.wait_for(lock, interval, [&] { return stop_; })) return;
    }
    try {
      recorder_.poll();
      // Publish how far each group got, so a stuck peer can tell who never arrived, and a
      // heartbeat, so a failed peer can tell who died.
      if (store_) {
        const std::string beat = std::to_string(wall_seconds());
        store_->set(heartbeat_key(options_.rank), std::vector<uint8_t>(beat.begin(), beat.end()));
        for (const auto& [group, seq] : recorder_.progress()) {
          if (published_[group] == seq) continue;
          const std::string v = std::to_string(seq);
          store_->set(progress_key(group, options_.rank), std::vector<uint8_t>(v.begin(), v.end()));
          published_[group] = seq;
        }
      }
      CollectiveRecord oldest;
      if (recorder_.oldest_pending(oldest) &&
          wall_seconds() - oldest.enqueue_s > options_.timeout_s) {
        fire(oldest);
      }
    } catch (const std::exception& e) {
      // The store may be gone when a peer died; the timeout check still runs next time.
      std::fprintf(stderr, "[titan] [rank %d] watchdog: %s\n", options_.rank, e.what());
    }
  }
}

void Watchdog::fire(const CollectiveRecord& stuck) {
  // 1. Dump this rank's records.
  std::string dump_path;
  try {
    util::make_directories(util::path_str(options_.dump_folder));
    dump_path = (std::filesystem::path(options_.dump_folder) /
                 (options_.file_prefix + std::to_string(options_.rank) + ".json"))
                    .string();
    std::ofstream(dump_path) << recorder_.dump_json(options_.rank);
  } catch (const std::exception& e) {
    dump_path = std::string("(dump failed: ") + e.what() + ")";
  }
  // 2. Which members never began this collective?
  std::vector<std::string> missing;
  const std::vector<int> members = stuck.ranks ? *stuck.ranks : std::vector<int>{};
  if (store_) {
    for (int r : members) {
      if (r == options_.rank) continue;
      uint64_t seq = 0;
      try {
        const std::string key = progress_key(stuck.group, r);
        if (store_->check({key})) {
          auto v = store_->get(key);
          int64_t parsed = 0;
          util::parse_int(std::string(v.begin(), v.end()), parsed);
          seq = static_cast<uint64_t>(parsed);
        }
      } catch (const std::exception&) {
        seq = 0;
      }
      if (seq < stuck.group_seq) {
        missing.push_back(std::to_string(r) + " (last at #" + std::to_string(seq) + ")");
      }
    }
  }
  std::ostringstream msg;
  msg << "titan_train: error: [rank " << options_.rank << "] collective " << stuck.op << " #"
      << stuck.group_seq << " on group " << stuck.group << " (ranks "
      << util::join(
             [&] {
               std::vector<std::string> s;
               for (int r : members) s.push_back(std::to_string(r));
               return s;
             }(),
             ",")
      << "; " << stuck.numel << " " << stuck.dtype << " elements) did not finish within "
      << options_.timeout_s << " s (comm.train_timeout_seconds); ";
  if (!missing.empty()) {
    msg << "ranks that never reached it: " << util::join(missing, ", ");
  } else {
    msg << "every member reached it, so a peer or the network is stuck";
  }
  msg << "; flight recorder dump: " << dump_path;
  std::cerr << msg.str() << std::endl;
  // Rank 0 serves the store: it stays a little so the other ranks can still read who is
  // missing before the job goes down.
  if (options_.rank == 0 && options_.world_size > 1) {
    std::this_thread::sleep_for(std::chrono::duration<double>(4 * options_.poll_interval_s + 2));
  }
  // 3. Stop all communication and end the process. Aborting a communicator whose kernel is
  // stuck can itself block, so the process ends at a deadline whatever the abort does.
  std::thread([] {
    std::this_thread::sleep_for(std::chrono::seconds(5));
    std::fflush(nullptr);
    std::_Exit(4);
  }).detach();
  try {
    if (abort_all_) abort_all_();
  } catch (...) {
  }
  std::fflush(nullptr);
  std::_Exit(4);
}

}  // namespace titan::dist
