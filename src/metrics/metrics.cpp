// Metrics output: log line, JSONL records, TensorBoard scalars.
#include "titan/metrics/metrics.h"
#include "titan/util/fs.h"

#include <fcntl.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include <cmath>
#include <filesystem>

#include "titan/metrics/tensorboard.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::metrics {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char buf[64];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lldh %02lldm %02llds", static_cast<long long>(s / 3600),
                  static_cast<long long>((s / 60) % 60), static_cast<long long>(s % 60));
  } else if (s >= 60) {
    std::snprintf(buf, sizeof(buf), "%lldm %02llds", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%llds", static_cast<long long>(s));
  }
  return buf;
}

namespace {

// The records a resumed run keeps: whole lines (a line cut by a crash is dropped) that are not
// of steps after `start_step` (the interrupted run's tail, which this run logs again).
std::string kept_history(const std::string& text, int64_t start_step, size_t* dropped) {
  std::string out;
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t end = text.find('\n', pos);
    if (end == std::string::npos) {
      ++*dropped;  // no newline: a partial record
      break;
    }
    const std::string line = text.substr(pos, end - pos);
    pos = end + 1;
    bool keep = !util::trim(line).empty();
    if (keep) {
      try {
        const auto j = nlohmann::json::parse(line);
        if (start_step > 0 && j.contains("step") && !j.contains("event") &&
            j["step"].get<int64_t>() > start_step) {
          keep = false;
        }
      } catch (const nlohmann::json::exception&) {
        keep = false;
      }
    }
    if (keep) {
      out += line + "\n";
    } else if (!util::trim(line).empty()) {
      ++*dropped;
    }
  }
  return out;
}

std::string host_name() {
  char buf[256] = {0};
  if (::gethostname(buf, sizeof(buf) - 1) != 0) return "?";
  return buf;
}

}  // namespace

MetricsLogger::MetricsLogger(MetricsOptions options) : options_(std::move(options)) {
  if (options_.write_files) {
    util::make_directories(util::path_str(options_.dump_folder));
    const std::string name = options_.rank == 0
                                 ? "metrics.jsonl"
                                 : "metrics_rank" + std::to_string(options_.rank) + ".jsonl";
    const std::string path = (std::filesystem::path(options_.dump_folder) / name).string();
    jsonl_path_ = path;
    // A log kept across runs: earlier runs' records stay; a resume drops the interrupted
    // tail after its checkpoint's step (rewritten atomically) and records that it resumed.
    if (util::is_regular_file(path)) {
      std::ifstream in(path, std::ios::binary);
      std::stringstream buf;
      buf << in.rdbuf();
      size_t dropped = 0;
      const std::string kept = kept_history(buf.str(), options_.start_step, &dropped);
      if (dropped > 0) {
        util::write_file_atomically(path, kept);
        log::info("metrics: dropped {} record(s) of {} after step {} (logged again by this run)",
                  dropped, path, options_.start_step);
      }
    }
    jsonl_fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    TITAN_CHECK(jsonl_fd_ >= 0, "job.dump_folder: cannot write ", path, ": ", std::strerror(errno));
    nlohmann::json ev;
    ev["event"] = options_.start_step > 0 ? "resume" : "start";
    ev["step"] = options_.start_step;
    ev["time"] = static_cast<int64_t>(::time(nullptr));
    ev["host"] = host_name();
    ev["pid"] = static_cast<int64_t>(::getpid());
    write_record(ev.dump());
    if (options_.enable_tensorboard) {
      auto dir = std::filesystem::path(options_.dump_folder) / options_.tb_folder;
      if (options_.rank != 0) dir /= "rank_" + std::to_string(options_.rank);
      tb_ = std::make_unique<TensorBoardWriter>(dir.string());
    }
  }
}

MetricsLogger::~MetricsLogger() {
  if (jsonl_fd_ >= 0) ::close(jsonl_fd_);
}

void MetricsLogger::write_record(const std::string& record) {
  if (jsonl_fd_ < 0) return;
  const std::string line = record + "\n";
  // One write per record (O_APPEND): a record is whole or absent, never interleaved.
  const ssize_t n = ::write(jsonl_fd_, line.data(), line.size());
  if (n == static_cast<ssize_t>(line.size())) {
    failed_writes_ = 0;
    return;
  }
  const int err = n < 0 ? errno : ENOSPC;
  if (n > 0) {
    // A partial record: cut it off so the log stays line-structured.
    const off_t end = ::lseek(jsonl_fd_, 0, SEEK_END);
    if (end >= n && ::ftruncate(jsonl_fd_, end - n) != 0) {
      // The next resume drops the partial line.
    }
  }
  ++failed_writes_;
  TITAN_CHECK(failed_writes_ < 3, "metrics: cannot write ", jsonl_path_, ": ", std::strerror(err),
              " (", failed_writes_, " records in a row); free space or fix the dump folder");
  if (failed_writes_ == 1) {
    log::warn("metrics: cannot write {}: {}; the record is lost (the run stops if this persists)",
              jsonl_path_, std::strerror(err));
  }
}

void MetricsLogger::log_step(const StepMetrics& m) {
  const char* c = options_.color ? "\033[36m" : "";
  const char* r = options_.color ? "\033[39m" : "";
  std::string mfu = m.mfu_pct ? fmt::format("{:.2f}%", *m.mfu_pct) : std::string("n/a");
  log::info(
      "{}step: {:>5}{}  loss: {:8.4f}  grad_norm: {:7.4f}  lr: {:.3e}  memory: {:5.2f}GiB"
      "({:.2f}%)  tps: {}  tflops: {:.2f}  mfu: {}  data: {:.1f}ms  eta: {}",
      c, m.step, r, m.loss, m.grad_norm, m.lr, m.memory.max_reserved_gib, m.memory.max_reserved_pct,
      util::with_commas(std::llround(m.tokens_per_second)), m.tflops, mfu, m.data_seconds * 1e3,
      format_duration(m.eta_seconds));
  if (jsonl_fd_ >= 0) {
    nlohmann::json j;
    j["step"] = m.step;
    j["loss"] = m.loss;
    j["grad_norm"] = m.grad_norm;
    j["lr"] = m.lr;
    j["tps"] = m.tokens_per_second;
    j["tflops"] = m.tflops;
    j["mfu"] = m.mfu_pct ? nlohmann::json(*m.mfu_pct) : nlohmann::json(nullptr);
    j["max_memory_gib"] = m.memory.max_reserved_gib;
    j["max_active_memory_gib"] = m.memory.max_active_gib;
    j["step_seconds"] = m.step_seconds;
    j["data_seconds"] = m.data_seconds;
    write_record(j.dump());
  }
  if (tb_) {
    tb_->add_scalar("loss_metrics/global_avg_loss", m.loss, m.step);
    tb_->add_scalar("grad_norm", m.grad_norm, m.step);
    tb_->add_scalar("lr", m.lr, m.step);
    tb_->add_scalar("throughput(tps)", m.tokens_per_second, m.step);
    tb_->add_scalar("tflops", m.tflops, m.step);
    if (m.mfu_pct) tb_->add_scalar("mfu(%)", *m.mfu_pct, m.step);
    tb_->add_scalar("memory/max_reserved(GiB)", m.memory.max_reserved_gib, m.step);
    tb_->add_scalar("memory/max_active(GiB)", m.memory.max_active_gib, m.step);
    tb_->add_scalar("time_metrics/data_loading(s)", m.data_seconds, m.step);
    tb_->flush();
  }
}

void MetricsLogger::log_validation(int64_t step, double loss, double seconds) {
  log::info("validate step: {:>5}  loss: {:8.4f}  time: {:.2f}s", step, loss, seconds);
  if (jsonl_fd_ >= 0) {
    nlohmann::json j;
    j["step"] = step;
    j["validation_loss"] = loss;
    write_record(j.dump());
  }
  if (tb_) {
    tb_->add_scalar("validation_metrics/loss", loss, step);
    tb_->flush();
  }
}

}  // namespace titan::metrics
