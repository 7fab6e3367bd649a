// Rendezvous, communicator and mesh construction, watchdog wiring.
#include "titan/dist/runtime.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <thread>

#include "titan/dist/backends.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::dist {

struct Rendezvous {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

c10d::Store* rendezvous_store(const Rendezvous& r) {
  return r.store.get();
}

namespace {

std::vector<uint8_t> bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}
std::string text(const std::vector<uint8_t>& b) {
  return std::string(b.begin(), b.end());
}

// c10 errors carry a C++ backtrace after the message; users need only the first line.
std::string short_what(const std::exception& e) {
  std::string w = e.what();
  const size_t cut = w.find("\nException raised from");
  return util::trim(cut == std::string::npos ? w : w.substr(0, cut));
}

}  // namespace

std::shared_ptr<Rendezvous> rendezvous(const LaunchEnv& env, double timeout_s) {
  auto r = std::make_shared<Rendezvous>();
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  c10d::TCPStoreOptions opts;
  opts.port = static_cast<uint16_t>(env.master_port);
  opts.isServer = env.rank == 0;
  opts.numWorkers = std::nullopt;  // arrival is checked below, with names
  opts.waitWorkers = false;
  opts.timeout = timeout;
  opts.useLibUV = false;  // Debian's LibTorch is built without libuv
  try {
    r->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, opts);
  } catch (const std::exception& e) {
    if (env.rank == 0) {
      fail("rank 0 could not serve the rendezvous on port ", env.master_port,
           " (MASTER_PORT): ", short_what(e));
    }
    fail("rank ", env.rank, " could not reach the rendezvous at ", env.master_addr, ":",
         env.master_port, " (MASTER_ADDR:MASTER_PORT, served by rank 0) within ", timeout_s,
         " s (comm.init_timeout_seconds): ", short_what(e));
  }
  r->store->set("titan/arrived/" + std::to_string(env.rank), bytes("1"));
  const std::string done_key = "titan/rendezvous_done";
  if (env.rank == 0) {
    // Rank 0 waits for everyone and publishes the outcome, so every rank reports the same.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::vector<int> missing;
    while (true) {
      missing.clear();
      for (int i = 0; i < env.world_size; ++i) {
        if (!r->store->check({"titan/arrived/" + std::to_string(i)})) missing.push_back(i);
      }
      if (missing.empty() || std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    std::string outcome = "ok";
    if (!missing.empty()) {
      std::vector<std::string> names;
      for (int m : missing) names.push_back(std::to_string(m));
      outcome = "ranks " + util::join(names, ", ") + " of " + std::to_string(env.world_size) +
                " did not arrive at " + env.master_addr + ":" + std::to_string(env.master_port) +
                " within " + std::to_string(static_cast<int64_t>(timeout_s)) +
                " s (comm.init_timeout_seconds)";
    }
    r->store->set(done_key, bytes(outcome));
    if (outcome != "ok") {
      // Keep serving a moment so the ranks that did arrive can read why the job stops.
      const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
      for (int i = 1; i < env.world_size; ++i) {
        const std::string ack = "titan/outcome_read/" + std::to_string(i);
        if (std::find(missing.begin(), missing.end(), i) != missing.end()) continue;
        while (!r->store->check({ack}) && std::chrono::steady_clock::now() < until) {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    }
    TITAN_CHECK(outcome == "ok", "rendezvous failed: ", outcome);
  } else {
    std::string outcome;
    try {
      r->store->wait({done_key}, timeout + std::chrono::seconds(5));
      outcome = text(r->store->get(done_key));
      r->store->set("titan/outcome_read/" + std::to_string(env.rank), bytes("1"));
    } catch (const std::exception& e) {
      fail("rank ", env.rank, ": rendezvous did not complete within ", timeout_s,
           " s (comm.init_timeout_seconds): ", short_what(e));
    }
    TITAN_CHECK(outcome == "ok", "rendezvous failed: ", outcome);
  }
  return r;
}

struct Runtime::StoreHolder {
  std::shared_ptr<Rendezvous> rdzv;
};

Runtime::Runtime(const LaunchEnv& env, const config::JobConfig& config, c10::Device device)
    : env_(env),
      config_(config),
      recorder_(static_cast<size_t>(std::max<int64_t>(1, config.comm.trace_buf_size))) {
  const auto dims = ParallelDims::from_config(config.parallelism, env.world_size);
  if (env.world_size > 1) {
    const double init_s = static_cast<double>(config.comm.init_timeout_seconds);
    store_ = std::make_unique<StoreHolder>();
    store_->rdzv = rendezvous(env, init_s);
    c10d::Store* store = rendezvous_store(*store_->rdzv);
    WatchdogOptions wopts;
    wopts.rank = env.rank;
    wopts.world_size = env.world_size;
    wopts.timeout_s = init_s;
    wopts.dump_folder =
        (std::filesystem::path(config.job.dump_folder) / config.comm.save_traces_folder).string();
    wopts.file_prefix = config.comm.save_traces_file_prefix;
    if (device.is_cuda()) {
      world_ = make_nccl_world(store, env.rank, env.world_size, device, &recorder_);
    } else {
      // Gloo's own timeout stays above the watchdog's so the watchdog reports first.
      const auto gloo_timeout = std::chrono::seconds(
          std::max(config.comm.init_timeout_seconds, config.comm.train_timeout_seconds) + 60);
      world_ = make_gloo_world(store, env.rank, env.world_size, gloo_timeout, &recorder_);
    }
    watchdog_ = std::make_unique<Watchdog>(recorder_, store, wopts, [this] { abort_all(); });
  }
  mesh_ = std::make_unique<DeviceMesh>(dims, env.rank, world_.get());
}

void Runtime::abort_all() {
  if (mesh_) mesh_->abort_all();
  if (world_) world_->abort();
}

Runtime::~Runtime() {
  watchdog_.reset();
  mesh_.reset();
  world_.reset();
}

c10d::Store* Runtime::store() const {
  return store_ ? rendezvous_store(*store_->rdzv) : nullptr;
}

void Runtime::enter_training() {
  if (!watchdog_) return;
  WatchdogOptions wopts;
  wopts.rank = env_.rank;
  wopts.world_size = env_.world_size;
  wopts.timeout_s = static_cast<double>(config_.comm.train_timeout_seconds);
  wopts.dump_folder =
      (std::filesystem::path(config_.job.dump_folder) / config_.comm.save_traces_folder).string();
  wopts.file_prefix = config_.comm.save_traces_file_prefix;
  watchdog_ = std::make_unique<Watchdog>(recorder_, store(), wopts, [this] { abort_all(); });
}

}  // namespace titan::dist
