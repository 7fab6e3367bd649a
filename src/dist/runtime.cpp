// Rendezvous, communicator and mesh construction, watchdog wiring.
#include "titan/dist/runtime.h"

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <future>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>

#include "titan/dist/backends.h"
#include "titan/util/crc32c.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"
#include "titan/util/version.h"

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

std::string rendezvous_identity(const LaunchEnv& env, const config::JobConfig& config) {
  config::JobConfig c = config;
  c.job.config_file.clear();  // the same job may be read from different paths
  const std::string text = config::to_toml(c);
  return nlohmann::json{{"world", env.world_size},
                        {"version", titan_version()},
                        {"config_crc32c", util::crc32c(text.data(), text.size())}}
      .dump();
}

namespace {

// How `theirs` differs from `mine` (rendezvous identities), in words; "" when they agree.
std::string identity_difference(const std::string& mine, const std::string& theirs, int rank) {
  if (mine.empty() || theirs.empty() || mine == theirs) return "";
  try {
    const auto a = nlohmann::json::parse(mine), b = nlohmann::json::parse(theirs);
    const std::string r = "rank " + std::to_string(rank);
    if (a["world"] != b["world"]) {
      return r + " has WORLD_SIZE " + b["world"].dump() + " where rank 0 has " + a["world"].dump();
    }
    if (a["version"] != b["version"]) {
      return r + " runs titan " + b["version"].get<std::string>() + ", rank 0 " +
             a["version"].get<std::string>() + " (the same build must run on every rank)";
    }
    if (a["config_crc32c"] != b["config_crc32c"]) {
      return r +
             " resolved a different job config than rank 0 (other overrides or another "
             "config file content); every rank must run the same job";
    }
  } catch (const std::exception&) {
    return "rank " + std::to_string(rank) + " sent an unreadable identity";
  }
  return "";
}

}  // namespace

namespace {

// MASTER_ADDR must resolve within the init timeout: a resolver that hangs (a name no DNS server
// answers for) would otherwise hold the rank far longer than comm.init_timeout_seconds.
void check_resolvable(const std::string& host, double timeout_s) {
  auto result = std::make_shared<std::promise<std::string>>();
  std::future<std::string> done = result->get_future();
  std::thread([host, result] {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* info = nullptr;
    const int rc = ::getaddrinfo(host.c_str(), nullptr, &hints, &info);
    if (info) ::freeaddrinfo(info);
    result->set_value(rc == 0 ? std::string() : std::string(::gai_strerror(rc)));
  }).detach();
  const auto wait = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  TITAN_CHECK(done.wait_for(wait) == std::future_status::ready, "MASTER_ADDR ", host,
              " could not be resolved within ", timeout_s, " s (comm.init_timeout_seconds)");
  const std::string err = done.get();
  TITAN_CHECK(err.empty(), "MASTER_ADDR ", host, " cannot be resolved: ", err);
}

}  // namespace

std::shared_ptr<Rendezvous> rendezvous(const LaunchEnv& env, double timeout_s,
                                       const std::string& identity) {
  auto r = std::make_shared<Rendezvous>();
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  // Every rank, rank 0 too: its own store client connects through MASTER_ADDR.
  check_resolvable(env.master_addr, timeout_s);
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
  r->store->set("titan/hello/" + std::to_string(env.rank), bytes(identity));
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
    for (int i = 1; i < env.world_size && missing.empty() && outcome == "ok"; ++i) {
      const std::string diff =
          identity_difference(identity, text(r->store->get("titan/hello/" + std::to_string(i))), i);
      if (!diff.empty()) outcome = diff;
    }
    if (!missing.empty()) {
      std::vector<std::string> names;
      for (int m : missing) names.push_back(std::to_string(m));
      outcome = (names.size() == 1 ? "rank " : "ranks ") + util::join(names, ", ") + " of " +
                std::to_string(env.world_size) + " did not arrive at " + env.master_addr + ":" +
                std::to_string(env.master_port) + " within " +
                std::to_string(static_cast<int64_t>(timeout_s)) + " s (comm.init_timeout_seconds)";
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
    // A rank beyond rank 0's world (another WORLD_SIZE) was never checked by it: compare here.
    const std::string diff =
        identity_difference(text(r->store->get("titan/hello/0")), identity, env.rank);
    TITAN_CHECK(diff.empty(), "rendezvous failed: ", diff);
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
    store_->rdzv = rendezvous(env, init_s, rendezvous_identity(env, config));
    c10d::Store* store = rendezvous_store(*store_->rdzv);
    set_peer_diagnosis([this](const std::vector<int>& members) { return dead_peers(members); });
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

std::string Runtime::dead_peers(const std::vector<int>& members) const {
  c10d::Store* s = store();
  if (!s) return "";
  auto read = [&](int r) -> std::string {
    const std::string key = heartbeat_key(r);
    if (!s->check({key})) return "";
    return text(s->get(key));
  };
  std::map<int, std::string> before;
  try {
    for (int r : members) {
      if (r != env_.rank) before[r] = read(r);
    }
    // Heartbeats come every half second: a rank whose value does not move in two seconds is
    // gone.
    std::this_thread::sleep_for(std::chrono::seconds(2));
    std::vector<std::string> dead;
    for (const auto& [r, v] : before) {
      if (read(r) == v) dead.push_back(std::to_string(r));
    }
    if (dead.empty()) return "";
    return "rank " + util::join(dead, ", rank ") + (dead.size() == 1 ? " stopped" : " stopped") +
           " (no heartbeat for 2 s): it died or was killed";
  } catch (const std::exception&) {
    // The store lives in rank 0's process: unreachable means rank 0 is gone.
    return "rank 0 (which serves the rendezvous store) is unreachable: it died or was killed";
  }
}

Runtime::~Runtime() {
  set_peer_diagnosis(nullptr);
  watchdog_.reset();
  mesh_.reset();
  world_.reset();
}

c10d::Store* Runtime::store() const {
  return store_ ? rendezvous_store(*store_->rdzv) : nullptr;
}

std::string Runtime::share_from_rank0(const std::string& key, const std::string& value) const {
  c10d::Store* s = store();
  if (s == nullptr) return value;
  const std::string k = "titan/shared/" + key;
  if (env_.rank == 0) {
    s->set(k, bytes(value));
    return value;
  }
  return text(s->get(k));
}

std::chrono::seconds Runtime::wait_timeout() const {
  return std::chrono::seconds(training_ ? config_.comm.train_timeout_seconds
                                        : config_.comm.init_timeout_seconds);
}

const char* Runtime::wait_timeout_key() const {
  return training_ ? "comm.train_timeout_seconds" : "comm.init_timeout_seconds";
}

void Runtime::enter_training() {
  training_ = true;
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
