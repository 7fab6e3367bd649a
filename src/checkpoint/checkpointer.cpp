// Sharded, reshardable, atomic, optionally asynchronous checkpoints.
#include "titan/checkpoint/checkpointer.h"
#include "titan/util/fs.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <fcntl.h>
#include <unistd.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <numeric>
#include <regex>
#include <thread>

#include "titan/checkpoint/box.h"
#include "titan/checkpoint/hf.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/checkpoint/verified_read.h"
#include "titan/data/dataloader.h"
#include "titan/dist/communicator.h"
#include "titan/dist/runtime.h"
#include "titan/parallel/fsdp.h"
#include "titan/train/optimizer.h"
#include "titan/util/crc32c.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/parallel.h"
#include "titan/util/progress.h"
#include "titan/util/strings.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace titan::checkpoint {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

void fsync_path(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::string step_name(int64_t step) {
  return "step-" + std::to_string(step);
}

std::vector<uint8_t> to_bytes(const std::string& s) {
  return std::vector<uint8_t>(s.begin(), s.end());
}

// Which state kinds a checkpoint tensor name belongs to.
const char* kModel = "model";
const char* kExpAvg = "optim.exp_avg";
const char* kExpAvgSq = "optim.exp_avg_sq";
bool kind_is_model(const std::string& k) {
  return k == kModel;
}

// Whether a step folder's index records finite weights (indexes of older titan versions carry
// no flag and count as finite: those versions saved whatever the weights were, but only
// diverged runs produced non-finite ones, and a resume checks again).
bool index_says_finite(const std::string& dir) {
  try {
    std::ifstream in((fs::path(dir) / "metadata.json").string());
    const json meta = json::parse(in);
    return meta.value("finite", true);
  } catch (const std::exception&) {
    return false;
  }
}

bool index_says_model_only(const std::string& dir) {
  try {
    std::ifstream in((fs::path(dir) / "metadata.json").string());
    return json::parse(in).value("model_only", false);
  } catch (const std::exception&) {
    return false;
  }
}

json rope_scaling_json(const model::LlamaArgs& a) {
  if (a.rope_scaling_factor <= 0) return json(nullptr);
  return {{"rope_type", "llama3"},
          {"factor", a.rope_scaling_factor},
          {"low_freq_factor", a.rope_low_freq_factor},
          {"high_freq_factor", a.rope_high_freq_factor},
          {"original_max_position_embeddings", a.rope_original_max_positions}};
}

// The RoPE and norm arguments an index records; indexes written before titan recorded RoPE
// scaling describe unscaled models.
model::LlamaArgs recorded_args(const json& m, model::LlamaArgs a) {
  a.rope_theta = m.value("rope_theta", a.rope_theta);
  a.norm_eps = m.value("norm_eps", a.norm_eps);
  a.rope_scaling_factor = 0;
  if (m.contains("rope_scaling") && m["rope_scaling"].is_object()) {
    const json& rs = m["rope_scaling"];
    a.rope_scaling_factor = rs.at("factor").get<double>();
    a.rope_low_freq_factor = rs.at("low_freq_factor").get<double>();
    a.rope_high_freq_factor = rs.at("high_freq_factor").get<double>();
    a.rope_original_max_positions = rs.at("original_max_position_embeddings").get<int64_t>();
  }
  return a;
}

// The model dims an index records must be this job's.
void check_same_shape(const json& m, const model::LlamaArgs& a, const std::string& step_dir,
                      const std::string& flavor) {
  TITAN_CHECK(m["dim"] == a.dim && m["n_layers"] == a.n_layers && m["n_heads"] == a.n_heads &&
                  m["n_kv_heads"] == a.n_kv_heads && m["vocab_size"] == a.vocab_size,
              "checkpoint ", step_dir, " holds a different model (", m.dump(),
              ") than this job's flavor ", flavor, " (dim ", a.dim, ", n_layers ", a.n_layers,
              ", n_heads ", a.n_heads, ", n_kv_heads ", a.n_kv_heads, ", vocab_size ", a.vocab_size,
              "); set model.flavor to the checkpoint's");
}

}  // namespace

void adopt_checkpoint_model_args(const std::string& step_dir, model::LlamaArgs& args,
                                 const std::string& flavor) {
  const std::string meta_path = (fs::path(step_dir) / "metadata.json").string();
  try {
    std::ifstream in(meta_path);
    if (!in.good()) return;  // load() reports a missing index
    const json meta = json::parse(in);
    if (!meta.contains("model")) return;
    check_same_shape(meta["model"], args, step_dir, flavor);
    const model::LlamaArgs b = recorded_args(meta["model"], args);
    if (model::describe_rope(b) != model::describe_rope(args) || b.norm_eps != args.norm_eps) {
      log::info(
          "model: RoPE {} and norm_eps {} from checkpoint {} (the configured model has {}, {})",
          model::describe_rope(b), b.norm_eps, step_dir, model::describe_rope(args), args.norm_eps);
    }
    args = b;
  } catch (const json::exception& e) {
    fail("checkpoint index ", meta_path, " is malformed: ", util::json_error_text(e.what()));
  }
}

struct Checkpointer::Snapshot {
  struct Entry {
    std::string kind;            // model / optim.exp_avg / optim.exp_avg_sq
    std::string param;           // parameter name
    std::vector<int64_t> shape;  // the whole parameter
    Box box;                     // the part of it this rank holds (tensor parallel)
    bool partial_box = false;    // box is not the whole parameter
    int64_t offset = 0;          // first flat element of the box held here
    int64_t numel = 0;
    at::Tensor source;  // view of the live state (device), copied at write time (sync)
    at::Tensor host;    // host copy taken at snapshot time (async)
    std::string key() const { return kind + "/" + param + "/" + std::to_string(offset); }
  };
  int64_t step = 0;
  int64_t save_index = 0;
  bool model_only = false;
  at::ScalarType dtype = at::kFloat;
  std::vector<Entry> entries;
  std::vector<std::pair<std::string, at::Tensor>> rng;  // host tensors
  std::string loader_state;
  int64_t optimizer_steps = 0;
  Clock::time_point started;
  // Weights are saved in `dtype`, the optimizer moments in fp32.
  at::ScalarType saved_dtype(const Entry& e) const {
    return kind_is_model(e.kind) ? dtype : at::kFloat;
  }
  size_t saved_bytes(const Entry& e) const {
    return static_cast<size_t>(e.numel) * c10::elementSize(saved_dtype(e));
  }
};

namespace {

// The learning-rate schedule a run trains with, as its checkpoints record it.
json schedule_json(const config::JobConfig& c) {
  const auto& s = c.lr_scheduler;
  return {{"lr", c.optimizer.lr},
          {"warmup_steps", s.warmup_steps},
          {"steps", s.total_steps.value_or(c.training.steps)},
          {"decay_ratio", s.decay_ratio ? json(*s.decay_ratio) : json(nullptr)},
          {"decay_type", s.decay_type},
          {"min_lr_factor", s.min_lr_factor}};
}

}  // namespace

Checkpointer::Checkpointer(const config::JobConfig& config, dist::Runtime& runtime,
                           TrainerState state)
    : config_(config), runtime_(runtime), state_(std::move(state)) {
  folder_ = (fs::path(config.job.dump_folder) / config.checkpoint.folder).string();
  // Found unusable now rather than at the first save, possibly hours in.
  if (config.checkpoint.enable) {
    util::ensure_writable_directory(util::path_str(folder_),
                                    "checkpoint.folder (under job.dump_folder)");
  }
}

Checkpointer::~Checkpointer() {
  try {
    wait();
  } catch (const std::exception& e) {
    log::error("checkpoint: {}", e.what());
  }
}

std::string Checkpointer::older_steps_note(const std::string& step_dir) {
  const std::string folder = fs::path(step_dir).parent_path().string();
  std::vector<std::string> older;
  for (const auto& [step, path] : complete_steps(folder)) {
    if (fs::path(path) != fs::path(step_dir)) older.push_back(std::to_string(step));
  }
  if (older.empty()) return "";
  return "\n(if " + step_dir + " is damaged: older checkpoints in " + folder + ": step " +
         util::join(older, ", ") + "; set checkpoint.load_step to resume from one of them)";
}

std::vector<std::pair<int64_t, std::string>> Checkpointer::complete_steps(
    const std::string& folder) {
  std::vector<std::pair<int64_t, std::string>> out;
  if (!util::is_directory(util::path_str(folder))) return out;
  static const std::regex re("^step-([0-9]+)$");
  for (const auto& name : util::list_directory(folder)) {
    std::smatch m;
    const std::string path = util::join_path(folder, name);
    if (util::is_directory(path) && std::regex_match(name, m, re) &&
        util::path_exists(util::join_path(path, "metadata.json"))) {
      out.emplace_back(std::stoll(m[1]), path);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

void Checkpointer::barrier(const std::string& key, int64_t save_index) {
  c10d::Store* store = runtime_.store();
  if (!store) return;
  const std::string k = "titan/ckpt/" + std::to_string(save_index) + "/" + key;
  if (runtime_.env().rank == 0) {
    store->set(k, to_bytes("1"));
    return;
  }
  try {
    store->wait({k}, runtime_.wait_timeout());
  } catch (const std::exception&) {
    fail("checkpoint save: rank 0 did not reach \"", key, "\" within ",
         runtime_.wait_timeout().count(), " s (", runtime_.wait_timeout_key(),
         "); it died or hangs, so this save is abandoned");
  }
}

void Checkpointer::check_background() {
  if (writer_.joinable() && writer_done_.load()) wait();
}

std::unique_ptr<Checkpointer::Snapshot> Checkpointer::snapshot(int64_t step, bool model_only,
                                                               at::ScalarType dtype, bool pinned) {
  static int64_t save_counter = 0;
  auto snap = std::make_unique<Snapshot>();
  snap->step = step;
  snap->save_index = save_counter++;
  snap->model_only = model_only;
  snap->dtype = dtype;
  snap->started = Clock::now();
  const bool writes_tensors = runtime_.mesh().coordinate("dp_replicate") == 0;
  // Tensor-parallel ranks hold parts of the split parameters and copies of the others (norms):
  // the copies are written by tp rank 0 only.
  const bool writes_replicated = runtime_.mesh().coordinate("tp") == 0;
  auto& fsdp = *state_.model;
  std::vector<std::pair<std::string, std::vector<at::Tensor>*>> kinds;
  std::vector<at::Tensor> masters = fsdp.master_shards();
  kinds.emplace_back(kModel, &masters);
  if (!model_only && state_.optimizer) {
    kinds.emplace_back(kExpAvg, &state_.optimizer->exp_avg());
    kinds.emplace_back(kExpAvgSq, &state_.optimizer->exp_avg_sq());
  }
  if (writes_tensors) {
    const auto slices = fsdp.shard_slices();
    for (const auto& [kind, tensors] : kinds) {
      for (const auto& s : slices) {
        if (s.param->tp.replicated() && !writes_replicated) continue;
        Snapshot::Entry e;
        e.kind = kind;
        e.param = s.param->name;
        e.shape = s.param->global_shape;
        e.box = {s.param->box_offset(), s.param->shape};
        e.partial_box = s.param->shape != s.param->global_shape;
        e.offset = s.param_offset;
        e.numel = s.numel;
        e.source = (*tensors)[s.unit].narrow(0, s.shard_offset, s.numel);
        snap->entries.push_back(std::move(e));
      }
    }
  }
  // Host copies for asynchronous writes: the training loop may change the state right after.
  const bool async = config_.checkpoint.async_mode != "disabled";
  if (async) {
    // async_with_pinned_mem stages into one page-locked buffer, taken at the first save and
    // kept for the run (as torchtitan keeps its staging memory); entries start 64-byte
    // aligned. Plain async takes ordinary memory for each save.
    auto aligned = [](size_t n) { return (n + 63) / 64 * 64; };
    size_t staged = 0;
    for (const auto& e : snap->entries) {
      staged += aligned(snap->saved_bytes(e));
    }
    if (pinned && staged > 0 &&
        (!staging_.defined() || static_cast<size_t>(staging_.numel()) < staged)) {
      staging_ = at::Tensor();  // the old buffer goes before the larger one is taken
      const double gib = static_cast<double>(staged) / 1073741824.0;
      const bool device = snap->entries.front().source.is_cuda();
      try {
        staging_ = device ? page_locked_host_bytes(staged)
                          : at::empty({static_cast<int64_t>(staged)}, at::kByte);
        log::info(
            "checkpoint: {:.2f} GiB of {}host memory staged for asynchronous saves (kept "
            "for the run)",
            gib, device ? "page-locked " : "");
      } catch (const Error& e) {
        // Saves still work from ordinary memory; only the device copies wait for the host.
        log::warn(
            "checkpoint: {}; staging asynchronous saves in {:.2f} GiB of ordinary host "
            "memory instead (kept for the run; each snapshot stalls training longer)",
            e.what(), gib);
        try {
          staging_ = at::empty({static_cast<int64_t>(staged)}, at::kByte);
        } catch (const c10::Error& alloc) {
          if (!is_host_allocation_failure(alloc.what_without_backtrace())) throw;
          fail("checkpoint.async_mode = \"async_with_pinned_mem\" cannot stage ", gib,
               " GiB of this rank's state in host memory: the host is out of memory; use "
               "async_mode = \"disabled\" (saves write from the device in chunks)");
        }
      }
    }
    size_t offset = 0;
    for (auto& e : snap->entries) {
      const at::ScalarType t = snap->saved_dtype(e);
      if (pinned) {
        const size_t n = snap->saved_bytes(e);
        e.host = staging_.narrow(0, static_cast<int64_t>(offset), static_cast<int64_t>(n)).view(t);
        offset += aligned(n);
      } else {
        e.host = at::empty({e.numel}, at::TensorOptions().dtype(t));
      }
      e.host.copy_(e.source, /*non_blocking=*/pinned);
    }
    if (!snap->entries.empty() && snap->entries.front().source.is_cuda()) {
      synchronize(snap->entries.front().source.device());
    }
  }
  snap->rng.emplace_back("rng/cpu", at::detail::getDefaultCPUGenerator().get_state());
  if (state_.loader) snap->loader_state = state_.loader->state().to_json();
  if (state_.optimizer) snap->optimizer_steps = state_.optimizer->step_count();
  return snap;
}

int64_t Checkpointer::nonfinite_elements(const std::vector<at::Tensor>& tensors) {
  // A finite sum means every element is finite (a NaN or an infinity never sums to a finite
  // value): one read per tensor, no temporaries, one synchronization for all of them. Only a
  // tensor with a non-finite sum (or one that overflowed) counts its elements, through
  // isfinite's full-size temporaries (seconds on a CPU for a few hundred million elements).
  std::vector<at::Tensor> held, sums;
  for (const auto& t : tensors) {
    if (!t.defined()) continue;
    held.push_back(t);
    sums.push_back(t.sum().to(at::kFloat).to(held.front().device()));
  }
  at::Tensor count;
  if (!held.empty()) {
    const at::Tensor finite = at::isfinite(at::stack(sums)).to(at::kCPU);
    for (size_t i = 0; i < held.size(); ++i) {
      if (finite[static_cast<int64_t>(i)].item<bool>()) continue;
      at::Tensor c = at::logical_not(at::isfinite(held[i])).sum().to(at::kDouble);
      count = count.defined() ? count + c : c;
    }
  }
  if (!count.defined()) count = at::zeros({}, at::kDouble);
  at::Tensor total = count.to(at::kFloat).reshape({1});
  if (auto* world = runtime_.world()) {
    if (world->backend() == "nccl") total = total.to(state_.model->device());
    world->all_reduce(total, dist::ReduceOp::Sum);
  }
  return static_cast<int64_t>(total.item<double>());
}

void Checkpointer::check_finite_after_load(const std::string& step_dir,
                                           const std::vector<at::Tensor>& masters) {
  const int64_t bad = nonfinite_elements(masters);
  if (bad == 0) return;
  TITAN_CHECK(config_.checkpoint.allow_nonfinite_load, "checkpoint ", step_dir, " holds ", bad,
              " non-finite (NaN/Inf) weight elements: it was saved after training diverged. "
              "Resume from an earlier step (checkpoint.load_step), or set "
              "checkpoint.allow_nonfinite_load = true to load it anyway");
  log::warn(
      "checkpoint: {} holds {} non-finite weight elements; loaded anyway "
      "(checkpoint.allow_nonfinite_load)",
      step_dir, bad);
}

bool Checkpointer::same_data(const std::string& step_dir, const json& meta) {
  if (!meta.contains("data") || state_.data_identity.empty()) return true;
  const json now = json::parse(state_.data_identity);
  const json& then = meta["data"];
  std::vector<std::string> changed;
  for (const char* part : {"tokenizer", "dataset"}) {
    if (then.contains(part) && now.contains(part) && then[part] != now[part]) {
      changed.push_back(std::string(part) + ": the checkpoint's " + then[part].dump() +
                        ", this run's " + now[part].dump());
    }
  }
  if (changed.empty()) return true;
  TITAN_CHECK(config_.checkpoint.allow_data_change, "checkpoint ", step_dir,
              " was trained on other data, and its data position would be applied to this "
              "run's: ",
              util::join(changed, "; "),
              ". Use the same tokenizer and dataset, or set checkpoint.allow_data_change = true "
              "if the change is intended");
  log::warn(
      "checkpoint: resuming with other data (checkpoint.allow_data_change): {}; the new data is "
      "read from its beginning",
      util::join(changed, "; "));
  return false;
}

void Checkpointer::save(int64_t step, bool model_only, at::ScalarType dtype) {
  wait();  // one save at a time
  // Never save a non-finite state: it would replace the last good checkpoints.
  std::vector<at::Tensor> state = state_.model->master_shards();
  if (!model_only && state_.optimizer) {
    for (const auto& t : state_.optimizer->exp_avg()) state.push_back(t);
    for (const auto& t : state_.optimizer->exp_avg_sq()) state.push_back(t);
  }
  const int64_t bad = nonfinite_elements(state);
  // Test-only: save what an older titan would have saved (reliability tests need such
  // checkpoints).
  finite_ = bad == 0;
  if (bad > 0 && !std::getenv("TITAN_TEST_ALLOW_NONFINITE_SAVE")) {
    const auto steps = complete_steps(folder_);
    fail("training diverged: the state of step ", step, " holds ", bad,
         " non-finite (NaN/Inf) elements, so it was not saved",
         steps.empty() ? std::string()
                       : "; the newest checkpoint, " + steps.back().second + ", is untouched",
         ". Try a lower optimizer.lr or training.max_norm");
  }
  const auto t0 = Clock::now();
  const std::string& mode = config_.checkpoint.async_mode;
  auto snap = snapshot(step, model_only, dtype, mode == "async_with_pinned_mem");
  if (mode == "disabled") {
    write(std::move(snap));
    last_.stall_seconds = since(t0);
    log::info("checkpoint: saved step {} to {} in {:.2f}s ({:.1f} MiB from this rank)", step,
              folder_, last_.stall_seconds, last_.bytes / 1048576.0);
    return;
  }
  last_.stall_seconds = since(t0);
  writer_error_ = nullptr;
  writer_done_ = false;
  writer_ = std::thread([this, s = std::move(snap)]() mutable {
    try {
      write(std::move(s));
    } catch (...) {
      writer_error_ = std::current_exception();
    }
    writer_done_ = true;
  });
  log::info("checkpoint: step {} snapshot taken in {:.2f}s; writing in the background", step,
            last_.stall_seconds);
}

void Checkpointer::wait() {
  if (writer_.joinable()) {
    writer_.join();
    if (writer_error_) {
      auto e = writer_error_;
      writer_error_ = nullptr;
      std::rethrow_exception(e);
    }
    log::info("checkpoint: background save committed ({:.2f}s to write)", last_.write_seconds);
  }
}

void Checkpointer::write(std::unique_ptr<Snapshot> snap) {
  const std::string staging = (fs::path(folder_) / step_name(snap->step)).string() + ".partial";
  try {
    write_files(*snap);
  } catch (...) {
    // A failed save (full disk, a dead peer) leaves nothing behind: its partial folder would
    // hold the space until the next start.
    if (runtime_.env().rank == 0) {
      try {
        util::remove_tree(util::path_str(staging));
      } catch (const std::exception& e) {
        log::warn("checkpoint: could not remove {}: {}", staging, e.what());
      }
    }
    throw;
  }
}

void Checkpointer::write_files(Snapshot& snap_ref) {
  Snapshot* snap = &snap_ref;
  const auto t0 = Clock::now();
  const auto& env = runtime_.env();
  const std::string final_dir = (fs::path(folder_) / step_name(snap->step)).string();
  const std::string staging = final_dir + ".partial";
  if (env.rank == 0) {
    util::make_directories(util::path_str(folder_));
    util::remove_tree(util::path_str(staging));
    util::make_directories(util::path_str(staging));
  }
  barrier("staging_ready", snap->save_index);

  // This rank's shard file.
  char fname[64];
  std::snprintf(fname, sizeof(fname), "shard-%05d-of-%05d.safetensors", env.rank, env.world_size);
  std::vector<std::pair<std::string, TensorInfo>> decl;
  for (const auto& e : snap->entries) {
    TensorInfo info;
    info.dtype = safetensors_dtype(snap->saved_dtype(e));
    info.shape = {e.numel};
    decl.emplace_back(e.key(), info);
  }
  for (const auto& [name, t] : snap->rng) {
    TensorInfo info;
    info.dtype = "U8";
    info.shape = {t.numel()};
    decl.emplace_back(name, info);
  }
  const std::string path = (fs::path(staging) / fname).string();
  SafetensorsWriter writer(
      path, decl, {{"format", "titan-checkpoint-shard"}, {"rank", std::to_string(env.rank)}});
  std::vector<TensorToWrite> saved;
  double total_bytes = 0;  // of the tensors written below (the RNG states are a few bytes)
  for (const auto& e : snap->entries) {
    saved.push_back({e.key(), e.host.defined() ? e.host : e.source, snap->saved_dtype(e)});
    total_bytes += static_cast<double>(snap->saved_bytes(e));
  }
  util::Progress progress("checkpoint: writing step " + std::to_string(snap->step), total_bytes,
                          "GiB", 1073741824.0);
  // A device's state comes to the host in chunks while the chunk before is written.
  write_pipelined(writer, saved, int64_t(32) * kCrcBlockBytes,
                  [&](int64_t bytes) { progress.advance(static_cast<double>(bytes)); });
  progress.finish();
  for (const auto& [name, t] : snap->rng) writer.write(name, t.contiguous());
  const int64_t bytes = writer.close();
  // Test-only hook (tests/integration/checkpoint_test.cpp): holds the save between the shard
  // file and the commit so a test can kill the process while step-N.partial exists.
  if (const char* delay = std::getenv("TITAN_TEST_SAVE_DELAY_MS")) {
    std::this_thread::sleep_for(std::chrono::milliseconds(std::atoll(delay)));
  }

  json report;
  report["rank"] = env.rank;
  report["file"] = fname;
  report["bytes"] = bytes;
  // The RNG states are verified on load like the tensors.
  for (const auto& [name, t] : snap->rng) {
    report["rng_crc32c"][name] = writer.block_crcs().at(name);
  }
  auto& chunks = report["chunks"] = json::array();
  for (const auto& e : snap->entries) {
    json c = {{"kind", e.kind},
              {"param", e.param},
              {"shape", e.shape},
              {"offset", e.offset},
              {"numel", e.numel},
              {"key", e.key()},
              {"crc32c", writer.block_crcs().at(e.key())}};
    if (e.partial_box) c["box"] = {{"offset", e.box.offset}, {"shape", e.box.shape}};
    chunks.push_back(std::move(c));
  }
  last_.bytes = bytes;
  test_fault_point(env.rank, "save");
  if (const char* fail_at = std::getenv("TITAN_TEST_FAIL_SAVE")) {
    // Test-only hook: a save that fails after its shard files, before its commit (as a full
    // disk would).
    if (std::to_string(snap->step) == fail_at) fail("checkpoint: test hook failed the save");
  }
  if (c10d::Store* store = runtime_.store()) {
    store->set(
        "titan/ckpt/" + std::to_string(snap->save_index) + "/report/" + std::to_string(env.rank),
        to_bytes(report.dump()));
  }
  if (env.rank == 0) commit(*snap, report.dump());
  last_.write_seconds = since(t0);
}

void Checkpointer::commit(const Snapshot& snap, const std::string& own_report) {
  const auto& env = runtime_.env();
  const std::string final_dir = (fs::path(folder_) / step_name(snap.step)).string();
  const std::string staging = final_dir + ".partial";
  json meta;
  meta["format"] = "titan-checkpoint";
  meta["version"] = 1;
  meta["step"] = snap.step;
  meta["model_only"] = snap.model_only;
  meta["dtype"] = safetensors_dtype(snap.dtype);
  const auto& a = state_.args;
  meta["model"] = {{"name", "llama3"},
                   {"flavor", state_.flavor},
                   {"dim", a.dim},
                   {"n_layers", a.n_layers},
                   {"n_heads", a.n_heads},
                   {"n_kv_heads", a.n_kv_heads},
                   {"vocab_size", a.vocab_size},
                   {"ffn_hidden_dim", a.ffn_hidden_dim()},
                   {"rope_theta", a.rope_theta},
                   {"norm_eps", a.norm_eps},
                   {"rope_scaling", rope_scaling_json(a)}};
  const auto& d = runtime_.mesh().dims();
  meta["mesh"] = {{"world", d.world},       {"pp", d.pp}, {"dp_replicate", d.dp_replicate},
                  {"dp_shard", d.dp_shard}, {"cp", d.cp}, {"tp", d.tp}};
  meta["train_state"] = {{"step", snap.step}};
  meta["optimizer"] = {{"name", config_.optimizer.name}, {"steps", snap.optimizer_steps}};
  meta["lr_scheduler"] = {{"last_step", snap.step - lr_offset_steps_},
                          {"schedule", schedule_json(config_)}};
  if (!snap.loader_state.empty()) meta["dataloader"] = json::parse(snap.loader_state);
  auto& tensors = meta["tensors"] = json::object();
  auto& files = meta["files"] = json::object();
  auto add_report = [&](const json& r) {
    auto& f = files[r["file"].get<std::string>()] = {{"bytes", r["bytes"]}, {"rank", r["rank"]}};
    if (r.contains("rng_crc32c")) f["crc32c"] = r["rng_crc32c"];
    for (const auto& c : r["chunks"]) {
      const std::string name =
          c["kind"].get<std::string>() == kModel
              ? c["param"].get<std::string>()
              : c["kind"].get<std::string>() + "/" + c["param"].get<std::string>();
      auto& t = tensors[name];
      t["shape"] = c["shape"];
      t["dtype"] = c["kind"].get<std::string>() == kModel ? safetensors_dtype(snap.dtype) : "F32";
      // offset/numel: a flat range of the box (the whole tensor when there is no "box").
      json chunk = {{"file", r["file"]},
                    {"key", c["key"]},
                    {"offset", c["offset"]},
                    {"numel", c["numel"]},
                    {"crc32c_block_bytes", kCrcBlockBytes},
                    {"crc32c", c["crc32c"]}};
      if (c.contains("box")) chunk["box"] = c["box"];
      t["chunks"].push_back(std::move(chunk));
    }
  };
  add_report(json::parse(own_report));
  if (c10d::Store* store = runtime_.store()) {
    const std::string prefix = "titan/ckpt/" + std::to_string(snap.save_index) + "/report/";
    std::vector<std::string> keys;
    for (int r = 1; r < env.world_size; ++r) keys.push_back(prefix + std::to_string(r));
    try {
      store->wait(keys, runtime_.wait_timeout());
    } catch (const std::exception&) {
      std::vector<std::string> missing;
      for (int r = 1; r < env.world_size; ++r) {
        if (!store->check({prefix + std::to_string(r)})) missing.push_back(std::to_string(r));
      }
      fail("checkpoint save of step ", snap.step, ": rank(s) ", util::join(missing, ", "),
           " did not finish writing within ", runtime_.wait_timeout().count(), " s (",
           runtime_.wait_timeout_key(), "); they died or hang, so this save is abandoned");
    }
    for (const auto& key : keys) {
      auto v = store->get(key);
      add_report(json::parse(std::string(v.begin(), v.end())));
    }
  }
  for (auto& [name, t] : tensors.items()) {
    auto& chunks = t["chunks"];
    auto order = [](const json& c) {
      auto key = c.contains("box") ? c["box"]["offset"].get<std::vector<int64_t>>()
                                   : std::vector<int64_t>{};
      key.push_back(c["offset"].get<int64_t>());
      return key;
    };
    std::sort(chunks.begin(), chunks.end(),
              [&](const json& x, const json& y) { return order(x) < order(y); });
  }
  meta["rng"] = {{"cpu", "rng/cpu in each rank's shard file"},
                 {"seed", config_.debug.seed.value_or(-1)}};
  // Only finite states are saved (the trainer checks before saving); the flag lets retention
  // and resumes tell them from checkpoints of older titan versions.
  meta["finite"] = finite_;
  if (!state_.data_identity.empty()) meta["data"] = json::parse(state_.data_identity);
  // The index's own checksum: over its compact text without this field.
  meta["index_crc32c"] = util::crc32c(meta.dump().data(), meta.dump().size());
  // The index is written last: its presence is what makes the folder a checkpoint.
  const std::string tmp = (fs::path(staging) / "metadata.json.tmp").string();
  {
    std::ofstream out(tmp);
    out << meta.dump(1);
    out.flush();
    TITAN_CHECK(out.good(), "checkpoint: cannot write ", tmp);
  }
  fsync_path(tmp);
  util::rename_path(util::path_str(tmp), util::path_str(fs::path(staging) / "metadata.json"));
  fsync_path(staging);
  if (util::path_exists(util::path_str(final_dir))) {
    const std::string old = final_dir + ".old";
    util::remove_tree(util::path_str(old));
    util::rename_path(util::path_str(final_dir), util::path_str(old));
    util::rename_path(util::path_str(staging), util::path_str(final_dir));
    util::remove_tree(util::path_str(old));
  } else {
    util::rename_path(util::path_str(staging), util::path_str(final_dir));
  }
  fsync_path(folder_);
  // Retention: only complete checkpoints count, and only older ones go.
  const int64_t keep = config_.checkpoint.keep_latest_k;
  if (keep > 0) {
    auto steps = complete_steps(folder_);
    // The newest checkpoint known to hold finite weights is never removed, whatever k says.
    std::string newest_finite;
    for (const auto& [step, dir] : steps) {
      if (index_says_finite(dir)) newest_finite = dir;
    }
    for (size_t i = 0; i + static_cast<size_t>(keep) < steps.size(); ++i) {
      if (steps[i].second == newest_finite) {
        log::info("checkpoint: keeping {}, the newest with finite weights", steps[i].second);
        continue;
      }
      util::remove_tree(util::path_str(steps[i].second));
      log::info("checkpoint: removed {} (keep_latest_k = {})", steps[i].second, keep);
    }
  }
}

int64_t Checkpointer::load(const std::string& step_dir, const std::vector<std::string>& what) {
  const auto t0 = Clock::now();
  double staging_s = 0, read_s = 0, device_copy_s = 0;  // the load's phases, logged
  // Reading threads: how many took pieces, and their busy seconds in all (a sum near read_s x
  // threads is parallel reading; near read_s, one thread did the work).
  std::vector<double> thread_busy_s(static_cast<size_t>(util::intra_op_threads()), 0.0);
  auto wants = [&](const char* k) { return std::find(what.begin(), what.end(), k) != what.end(); };
  const std::string meta_path = (fs::path(step_dir) / "metadata.json").string();
  json meta;
  try {
    std::ifstream in(meta_path);
    TITAN_CHECK(in.good(), "cannot open ", meta_path);
    meta = json::parse(in);
    TITAN_CHECK(meta.value("format", "") == "titan-checkpoint", meta_path,
                " is not a titan checkpoint index");
    if (meta.contains("index_crc32c")) {
      json body = meta;
      body.erase("index_crc32c");
      const std::string text = body.dump();
      TITAN_CHECK(util::crc32c(text.data(), text.size()) == meta["index_crc32c"].get<uint32_t>(),
                  "checkpoint index ", meta_path,
                  " is corrupted: its content does not match its CRC-32C");
    } else {
      log::warn("checkpoint: {} carries no checksum of its own (written by an older titan)",
                meta_path);
    }
    // The folder's step and the index's must agree (a renamed or copied folder).
    const std::string base = fs::path(step_dir).filename().string();
    if (base.rfind("step-", 0) == 0 && meta.contains("step")) {
      int64_t folder_step = -1;
      if (util::parse_int(base.substr(5), folder_step)) {
        TITAN_CHECK(folder_step == meta["step"].get<int64_t>(), "checkpoint ", step_dir,
                    " holds step ", meta["step"].get<int64_t>(), " according to its index, but ",
                    "the folder is named for step ", folder_step);
      }
    }
  } catch (const json::exception& e) {
    fail("checkpoint index ", meta_path, " is malformed: ", util::json_error_text(e.what()));
  }
  std::vector<std::string> loaded;
  // An index that parses but lacks or mistypes an entry is malformed too (not an internal
  // error).
  try {
    // The model must be the same shape.
    const auto& a = state_.args;
    const auto& m = meta["model"];
    check_same_shape(m, a, step_dir, state_.flavor);
    if (wants("model")) {
      const model::LlamaArgs rec = recorded_args(m, a);
      TITAN_CHECK(
          model::describe_rope(rec) == model::describe_rope(a) && rec.norm_eps == a.norm_eps,
          "checkpoint ", step_dir, " was trained with RoPE ", model::describe_rope(rec),
          " and norm_eps ", rec.norm_eps, ", but this model has ", model::describe_rope(a), " and ",
          a.norm_eps, " (model.rope_scaling)");
    }
    // Files: present and of the recorded size (truncation shows here).
    std::map<std::string, std::unique_ptr<SafetensorsReader>> readers;
    auto reader = [&](const std::string& file) -> const SafetensorsReader& {
      auto it = readers.find(file);
      if (it != readers.end()) return *it->second;
      const std::string path = (fs::path(step_dir) / file).string();
      TITAN_CHECK(util::path_exists(util::path_str(path)), "checkpoint ", step_dir,
                  " misses its file ", file);
      const int64_t want = meta["files"][file]["bytes"].get<int64_t>();
      const int64_t have = util::file_size(util::path_str(path));
      TITAN_CHECK(have == want, "checkpoint file ", path, " is truncated or damaged: ", have,
                  " bytes, the index says ", want);
      std::unique_ptr<SafetensorsReader> r;
      try {
        r = std::make_unique<SafetensorsReader>(path);
      } catch (const Error& e) {
        fail("checkpoint file ", path, " is corrupted: ", e.what());
      }
      return *(readers[file] = std::move(r));
    };
    auto chunks_of = [&](const std::string& name, const std::vector<int64_t>& shape) {
      std::vector<Chunk> out;
      if (!meta["tensors"].contains(name)) return out;
      const auto& t = meta["tensors"][name];
      const auto recorded = t["shape"].get<std::vector<int64_t>>();
      TITAN_CHECK(recorded == shape, "checkpoint ", step_dir, " holds ", name, " of shape ",
                  json(recorded).dump(), ", this model's is ", json(shape).dump());
      for (const auto& c : t["chunks"]) {
        Chunk k;
        k.file = c["file"];
        k.key = c["key"];
        k.box = c.contains("box") ? Box{c["box"]["offset"].get<std::vector<int64_t>>(),
                                        c["box"]["shape"].get<std::vector<int64_t>>()}
                                  : Box::whole(shape);
        k.offset = c["offset"];
        k.numel = c["numel"];
        TITAN_CHECK(k.box.offset.size() == shape.size() && k.box.shape.size() == shape.size() &&
                        k.offset >= 0 && k.numel >= 0 && k.offset + k.numel <= k.box.numel(),
                    "checkpoint index ", meta_path, " is corrupted: a chunk of ", name,
                    " lies outside its tensor");
        for (size_t d = 0; d < shape.size(); ++d) {
          TITAN_CHECK(k.box.offset[d] >= 0 && k.box.offset[d] + k.box.shape[d] <= shape[d],
                      "checkpoint index ", meta_path, " is corrupted: a chunk box of ", name,
                      " lies outside its tensor");
        }
        k.block_bytes = c.value("crc32c_block_bytes", kCrcBlockBytes);
        k.crcs = c["crc32c"].get<std::vector<uint32_t>>();
        out.push_back(std::move(k));
      }
      return out;
    };
    // Fills `dsts` (this rank's shard of every unit, device tensors) from tensors named by
    // `prefix`. The pieces to read are planned first; then the threads take them one by one
    // (reads, CRCs and copies in parallel), and the error of the first piece in plan order is
    // the one reported.
    // Device shards are filled through one host staging buffer, taken once for every fill
    // (large_host_bytes: present and in huge pages, so the reading threads take no page
    // faults); host shards are filled in place.
    at::Tensor staging;
    auto in_place = [](const at::Tensor& d) {
      return d.is_cpu() && d.scalar_type() == at::kFloat && d.is_contiguous();
    };
    auto fill = [&](const std::string& prefix, std::vector<at::Tensor>& dsts) {
      auto& fsdp = *state_.model;
      std::vector<at::Tensor> hosts;
      int64_t staged = 0;
      for (size_t i = 0; i < fsdp.num_units(); ++i) {
        if (!in_place(dsts[i])) staged += fsdp.unit(i).shard_numel;
      }
      if (staged > 0 && (!staging.defined() || staging.numel() < staged)) {
        // Page-locked for device shards: the copies then run at the link's speed.
        const auto t_staging = Clock::now();
        const size_t bytes = static_cast<size_t>(staged) * sizeof(float);
        staging = at::Tensor();
        if (dsts.front().is_cuda()) {
          try {
            staging = page_locked_host_bytes(bytes).view(at::kFloat);
          } catch (const Error& e) {
            log::warn("checkpoint: {}; loading through ordinary host memory", e.what());
          }
        }
        if (!staging.defined()) staging = large_host_bytes(bytes).view(at::kFloat);
        staging_s += since(t_staging);
      }
      int64_t offset = 0;
      for (size_t i = 0; i < fsdp.num_units(); ++i) {
        if (in_place(dsts[i])) {
          hosts.push_back(dsts[i]);
        } else {
          // The pieces cover every parameter element (checked below while planning); the FSDP
          // padding at a shard's end stays as mapped (zero).
          hosts.push_back(staging.narrow(0, offset, fsdp.unit(i).shard_numel));
          offset += fsdp.unit(i).shard_numel;
        }
      }
      struct Target {
        at::Tensor dst;
        Box box;
        int64_t param_offset = 0;
        std::vector<Chunk> chunks;
      };
      struct Piece {
        size_t target, chunk;
        Rect both;
      };
      std::vector<Target> targets;
      std::vector<Piece> pieces;
      // Each slice and chunk is a flat range of a box: their rectangles meet in rectangles,
      // copied through strided views (any tensor-parallel layout onto any other). Large
      // rectangles are cut into bands of rows, so no thread waits on one big tensor.
      constexpr int64_t kPieceElems = int64_t{16} << 20;
      for (const auto& sl : fsdp.shard_slices()) {
        const std::string name = prefix.empty() ? sl.param->name : prefix + "/" + sl.param->name;
        Target t{hosts[sl.unit].narrow(0, sl.shard_offset, sl.numel),
                 Box{sl.param->box_offset(), sl.param->shape}, sl.param_offset,
                 chunks_of(name, sl.param->global_shape)};
        TITAN_CHECK(!t.chunks.empty(), "checkpoint ", step_dir, " has no tensor ", name);
        int64_t covered = 0;
        for (const Rect& want : flat_range_rects(t.box, sl.param_offset, sl.numel)) {
          for (size_t k = 0; k < t.chunks.size(); ++k) {
            reader(t.chunks[k].file);  // opened (and its size checked) before the threads start
            for (const Rect& have :
                 flat_range_rects(t.chunks[k].box, t.chunks[k].offset, t.chunks[k].numel)) {
              const Rect both = intersect(want, have);
              if (both.empty()) continue;
              covered += both.numel();
              const int64_t band = std::max<int64_t>(1, kPieceElems / (both.c1 - both.c0));
              for (int64_t r = both.r0; r < both.r1; r += band) {
                pieces.push_back(
                    {targets.size(), k, Rect{r, std::min(both.r1, r + band), both.c0, both.c1}});
              }
            }
          }
        }
        TITAN_CHECK(covered == sl.numel, "checkpoint ", step_dir, " covers ", covered, " of the ",
                    sl.numel, " elements of ", name, " this rank needs");
        targets.push_back(std::move(t));
      }
      const auto t_read = Clock::now();
      std::atomic<size_t> next{0};
      std::vector<std::exception_ptr> errors(pieces.size());
      util::parallel_range(util::intra_op_threads(), 1, [&](int64_t, int64_t, int thread) {
        at::Tensor scratch;  // this thread's read buffer, reused for all its pieces
        const auto t_thread = Clock::now();
        bool took = false;
        for (size_t i = next++; i < pieces.size(); i = next++) {
          took = true;
          try {
            const Piece& p = pieces[i];
            const Target& t = targets[p.target];
            const Chunk& c = t.chunks[p.chunk];
            const int64_t s = box_flat_index(c.box, p.both.r0, p.both.c0);
            const int64_t e = box_flat_index(c.box, p.both.r1 - 1, p.both.c1 - 1) + 1;
            at::Tensor dst = rect_view(t.dst, t.box, t.param_offset, p.both);
            const SafetensorsReader& r = reader(c.file);
            if (dst.is_cpu() && dst.is_contiguous() && e - s == dst.numel() && r.has(c.key) &&
                scalar_type_of(r.info(c.key).dtype) == dst.scalar_type()) {
              // The same layout and dtype on both sides: read straight into the destination.
              read_verified_into(r, c, s - c.offset, e - s, static_cast<char*>(dst.data_ptr()),
                                 scratch);
            } else {
              at::Tensor part = read_verified(r, c, s - c.offset, e - s, &scratch);
              dst.copy_(rect_view(part, c.box, s, p.both));
            }
          } catch (...) {
            errors[i] = std::current_exception();
          }
        }
        if (took) thread_busy_s[static_cast<size_t>(thread)] += since(t_thread);
      });
      read_s += since(t_read);
      for (const auto& e : errors) {
        if (e) std::rethrow_exception(e);
      }
      const auto t_device = Clock::now();
      for (size_t i = 0; i < fsdp.num_units(); ++i) {
        if (!hosts[i].is_same(dsts[i])) dsts[i].copy_(hosts[i]);
      }
      device_copy_s += since(t_device);
    };
    if (wants("model")) {
      std::vector<at::Tensor> masters = state_.model->master_shards();
      fill("", masters);
      state_.model->refresh_shadows();
      loaded.push_back("model");
      check_finite_after_load(step_dir, masters);
    }
    if (wants("optimizer") && state_.optimizer) {
      if (meta.value("model_only", false)) {
        log::info("checkpoint: {} holds weights only; the optimizer starts fresh", step_dir);
      } else {
        fill(kExpAvg, state_.optimizer->exp_avg());
        fill(kExpAvgSq, state_.optimizer->exp_avg_sq());
        state_.optimizer->set_step_count(meta["optimizer"]["steps"].get<int64_t>());
        loaded.push_back("optimizer");
      }
    }
    if (wants("dataloader") && state_.loader && meta.contains("dataloader")) {
      if (same_data(step_dir, meta)) {
        state_.loader->load_state(data::LoaderState::from_json(meta["dataloader"].dump()));
        loaded.push_back("dataloader");
      }
    }
    // RNG: restored when this rank wrote a file with the same world size.
    const auto& env = runtime_.env();
    if (meta["mesh"]["world"].get<int64_t>() == env.world_size) {
      char fname[64];
      std::snprintf(fname, sizeof(fname), "shard-%05d-of-%05d.safetensors", env.rank,
                    env.world_size);
      if (meta["files"].contains(fname)) {
        const auto& r = reader(fname);
        const json& f = meta["files"][fname];
        if (r.has("rng/cpu")) {
          at::Tensor state;
          if (f.contains("crc32c") && f["crc32c"].contains("rng/cpu")) {
            Chunk c;
            c.file = fname;
            c.key = "rng/cpu";
            c.numel = r.info(c.key).numel();
            c.crcs = f["crc32c"]["rng/cpu"].get<std::vector<uint32_t>>();
            state = read_verified(r, c, 0, c.numel);
          } else {
            state = r.read("rng/cpu");  // written before the index recorded RNG checksums
          }
          at::Generator gen = at::detail::getDefaultCPUGenerator();
          std::lock_guard<std::mutex> lock(gen.mutex());
          gen.set_state(state);
        }
      }
    }
    const int64_t step = meta["train_state"]["step"].get<int64_t>();
    if (wants("train_state")) loaded.push_back("train_state (step " + std::to_string(step) + ")");
    // The schedule's position: steps taken on it (as torchtitan's scheduler counts them), which
    // differs from the training step once a resume excluded lr_scheduler. Not loaded: 0.
    loaded_lr_position_ = 0;
    if (wants("lr_scheduler")) {
      const json& lr = meta.contains("lr_scheduler") ? meta["lr_scheduler"] : json();
      loaded_lr_position_ =
          lr.is_object() && lr.contains("last_step") ? lr["last_step"].get<int64_t>() : step;
      loaded.push_back("lr_scheduler (position " + std::to_string(loaded_lr_position_) + ")");
    }
    // A resume continues the lr schedule of the config, as torchtitan's does; say so when it
    // is not the one the checkpoint was trained with (a longer training.steps changes it).
    const json& sched = meta.contains("lr_scheduler") ? meta["lr_scheduler"] : json();
    if (wants("train_state") && runtime_.env().rank == 0 && sched.is_object() &&
        sched.contains("schedule")) {
      const json now = schedule_json(config_);
      static const std::map<std::string, std::string> keys = {
          {"lr", "optimizer.lr"},
          {"warmup_steps", "lr_scheduler.warmup_steps"},
          {"steps", "lr_scheduler.total_steps (else training.steps)"},
          {"decay_ratio", "lr_scheduler.decay_ratio"},
          {"decay_type", "lr_scheduler.decay_type"},
          {"min_lr_factor", "lr_scheduler.min_lr_factor"}};
      std::vector<std::string> changed;
      for (const auto& [key, name] : keys) {
        const json& was = sched["schedule"].contains(key) ? sched["schedule"][key] : json();
        if (was != now[key]) changed.push_back(name + " " + was.dump() + " -> " + now[key].dump());
      }
      if (!changed.empty()) {
        log::warn(
            "checkpoint: {} was trained with another learning-rate schedule ({}); the steps "
            "after {} follow the new one. To keep the saved schedule's shape when training "
            "longer, set lr_scheduler.total_steps",
            step_dir, util::join(changed, ", "), step);
      }
    }
    const auto busy_threads =
        std::count_if(thread_busy_s.begin(), thread_busy_s.end(), [](double b) { return b > 0; });
    log::info(
        "checkpoint: loaded {} ({}) in {:.2f}s (host staging {:.2f}s, reading and verifying "
        "{:.2f}s on {} threads: {} took pieces, {:.2f}s busy in all; copies to the device "
        "{:.2f}s)",
        step_dir, loaded.empty() ? std::string("nothing") : util::join(loaded, ", "), since(t0),
        staging_s, read_s, util::intra_op_threads(), busy_threads,
        std::accumulate(thread_busy_s.begin(), thread_busy_s.end(), 0.0), device_copy_s);
    return step;
  } catch (const json::exception& e) {
    fail("checkpoint index ", meta_path, " is malformed: ", util::json_error_text(e.what()));
  }
}

void Checkpointer::repair_folder(const config::JobConfig& config, dist::Runtime& runtime) {
  const std::string folder = (fs::path(config.job.dump_folder) / config.checkpoint.folder).string();
  // Saves that never finished are not checkpoints: clean them up.
  if (runtime.env().rank == 0 && util::is_directory(util::path_str(folder))) {
    // A re-save of an existing step renames step-N to step-N.old, then step-N.partial to
    // step-N. A crash between the two renames leaves no step-N: finish (a complete .partial
    // has its index) or undo (bring .old back) that commit first.
    for (const auto& name : util::list_directory(folder)) {
      if (name.size() <= 4 || name.substr(name.size() - 4) != ".old") continue;
      const std::string base = util::join_path(folder, name.substr(0, name.size() - 4));
      const std::string old = util::join_path(folder, name);
      if (util::path_exists(base)) {
        util::remove_tree(old);
      } else if (util::path_exists(util::join_path(base + ".partial", "metadata.json"))) {
        util::rename_path(base + ".partial", base);
        util::remove_tree(old);
        log::warn("checkpoint: finished the interrupted commit of {}", base);
      } else {
        util::rename_path(old, base);
        log::warn("checkpoint: restored {} after an interrupted re-save", base);
      }
    }
    for (const auto& name : util::list_directory(folder)) {
      if (name.size() > 8 && name.substr(name.size() - 8) == ".partial") {
        const std::string path = util::join_path(folder, name);
        log::warn("checkpoint: removing {}, left by a save that did not finish", path);
        util::remove_tree(path);
      }
    }
  }
  // Every rank lists the folder after rank 0 repaired it: otherwise a rank could miss the step
  // an interrupted re-save left as step-N.old and resume an older one than its peers.
  runtime.share_from_rank0("checkpoint_folder_repaired", "1");
}

int64_t Checkpointer::load_at_start() {
  const auto& ck = config_.checkpoint;
  repair_folder(config_, runtime_);
  std::vector<std::string> what = {"model", "optimizer", "lr_scheduler", "dataloader",
                                   "train_state"};
  for (const auto& x : ck.exclude_from_loading) {
    TITAN_CHECK(x == "model" || x == "optimizer" || x == "dataloader" || x == "train_state" ||
                    x == "lr_scheduler",
                "checkpoint.exclude_from_loading: unknown entry \"", x,
                "\"; expected model, optimizer, lr_scheduler, dataloader or train_state");
    what.erase(std::remove(what.begin(), what.end(), x), what.end());
  }
  auto steps = complete_steps(folder_);
  // An explicit step must not silently become a fresh start.
  TITAN_CHECK(!ck.enable || ck.load_step < 0 || !steps.empty(),
              "checkpoint.load_step = ", ck.load_step, ": no complete checkpoint in ", folder_,
              " (have: none)");
  // Folders that look like checkpoints but cannot be one are named, never skipped silently.
  if (runtime_.env().rank == 0 && util::is_directory(util::path_str(folder_))) {
    for (const auto& name : util::list_directory(folder_)) {
      const std::string path = util::join_path(folder_, name);
      if (name.rfind("step-", 0) == 0 && util::is_directory(path) &&
          name.find('.') == std::string::npos &&
          !util::path_exists(util::join_path(path, "metadata.json"))) {
        log::warn(
            "checkpoint: skipping {}: it has no metadata.json (its index was deleted or "
            "never written)",
            path);
      }
    }
  }
  const std::string dir = start_dir(config_);
  if (!steps.empty() && ck.enable) {
    if (ck.load_step < 0 && dir != steps.back().second) {
      log::warn(
          "checkpoint: {} holds weights only (a finished run's final save); resuming from {}, "
          "the newest full checkpoint, so the optimizer state and data position are exact (the "
          "steps after it are trained again)",
          steps.back().second, dir);
    }
    if (dir.empty()) {
      std::vector<std::string> have;
      for (const auto& s : steps) have.push_back(std::to_string(s.first));
      fail("checkpoint.load_step = ", ck.load_step, ": no complete checkpoint of that step in ",
           folder_, " (have: ", util::join(have, ", "), ")");
    }
    int64_t step = 0;
    try {
      step = load(dir, what);
    } catch (const Error& e) {
      if (ck.load_step >= 0) throw;
      fail(e.what(), older_steps_note(dir));
    }
    const bool continues = std::find(what.begin(), what.end(), "train_state") != what.end();
    const int64_t resumed = continues ? step : 0;
    lr_offset_steps_ = resumed - loaded_lr_position_;
    if (lr_offset_steps_ != 0 && runtime_.env().rank == 0) {
      log::info(
          "checkpoint: the lr schedule continues from its step {} while training continues "
          "after step {} (checkpoint.exclude_from_loading: {})",
          loaded_lr_position_, resumed, util::join(ck.exclude_from_loading, ", "));
    }
    return resumed;
  }
  if (ck.initial_load_in_hf) {
    const std::string hf = hf_initial_folder(config_);
    if (ck.initial_load_path.empty()) {
      log::info(
          "checkpoint: loading Hugging Face weights from model.hf_assets_path = {} "
          "(checkpoint.initial_load_in_hf with no initial_load_path, as torchtitan)",
          hf);
    }
    import_hf(hf, state_);
    return 0;
  }
  if (!ck.initial_load_path.empty()) {
    TITAN_CHECK(util::path_exists(util::path_str(ck.initial_load_path)),
                "checkpoint.initial_load_path: ", ck.initial_load_path, " does not exist",
                util::relative_note(ck.initial_load_path));
    TITAN_CHECK(!dir.empty(), "checkpoint.initial_load_path: ", ck.initial_load_path,
                " is neither a checkpoint step folder nor a folder holding one");
    std::vector<std::string> init_what = {"model"};
    if (!ck.initial_load_model_only) init_what = what;
    load(dir, init_what);
  }
  return 0;
}

std::string Checkpointer::hf_initial_folder(const config::JobConfig& config) {
  const auto& ck = config.checkpoint;
  if (!ck.initial_load_in_hf) return "";
  return ck.initial_load_path.empty() ? config.model.hf_assets_path : ck.initial_load_path;
}

std::string Checkpointer::start_dir(const config::JobConfig& config) {
  const auto& ck = config.checkpoint;
  const auto steps = complete_steps((fs::path(config.job.dump_folder) / ck.folder).string());
  if (ck.enable && !steps.empty()) {
    if (ck.load_step < 0) {
      // A finished run's final save may hold weights only: continuing from it would restart
      // the optimizer. The newest full checkpoint is the one to extend the run from.
      for (auto it = steps.rbegin(); it != steps.rend(); ++it) {
        if (!index_says_model_only(it->second)) return it->second;
      }
      return steps.back().second;
    }
    for (const auto& s : steps) {
      if (s.first == ck.load_step) return s.second;
    }
    return "";
  }
  if (ck.initial_load_path.empty() || ck.initial_load_in_hf) return "";
  // A step folder, or a checkpoint folder holding step folders (the newest is taken).
  if (util::path_exists(util::path_str(fs::path(ck.initial_load_path) / "metadata.json"))) {
    return ck.initial_load_path;
  }
  const auto inner = complete_steps(ck.initial_load_path);
  return inner.empty() ? "" : inner.back().second;
}

bool Checkpointer::due(int64_t step, bool last_step) const {
  const auto& ck = config_.checkpoint;
  if (!ck.enable || ck.load_only) return false;
  return last_step || step % ck.interval == 0 || (step == 1 && ck.enable_first_step_checkpoint);
}

void Checkpointer::maybe_save(int64_t step, bool last_step) {
  const auto& ck = config_.checkpoint;
  if (!due(step, last_step)) return;
  const bool due = step % ck.interval == 0 || (step == 1 && ck.enable_first_step_checkpoint);
  if (last_step) {
    if (ck.last_save_in_hf) {
      wait();
      export_hf((fs::path(folder_) / (step_name(step) + "-hf")).string(), state_, runtime_,
                ck.export_dtype);
      return;
    }
    if (ck.last_save_model_only) {
      const at::ScalarType dt = ck.export_dtype == "bfloat16"  ? at::kBFloat16
                                : ck.export_dtype == "float16" ? at::kHalf
                                                               : at::kFloat;
      save(step, /*model_only=*/true, dt);
      return;
    }
  }
  if (due || last_step) save(step, /*model_only=*/false, at::kFloat);
}

}  // namespace titan::checkpoint
