// Metrics output: log line, JSONL records, TensorBoard scalars.
#include "titan/metrics/metrics.h"
#include "titan/util/fs.h"

#include <nlohmann/json.hpp>

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

MetricsLogger::MetricsLogger(MetricsOptions options) : options_(std::move(options)) {
  if (options_.write_files) {
    util::make_directories(util::path_str(options_.dump_folder));
    const std::string name = options_.rank == 0
                                 ? "metrics.jsonl"
                                 : "metrics_rank" + std::to_string(options_.rank) + ".jsonl";
    const std::string path = (std::filesystem::path(options_.dump_folder) / name).string();
    jsonl_.open(path, std::ios::out | std::ios::trunc);
    TITAN_CHECK(jsonl_.good(), "job.dump_folder: cannot write ", path);
    if (options_.enable_tensorboard) {
      auto dir = std::filesystem::path(options_.dump_folder) / options_.tb_folder;
      if (options_.rank != 0) dir /= "rank_" + std::to_string(options_.rank);
      tb_ = std::make_unique<TensorBoardWriter>(dir.string());
    }
  }
}

MetricsLogger::~MetricsLogger() = default;

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
  if (jsonl_.is_open()) {
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
    jsonl_ << j.dump() << "\n";
    jsonl_.flush();
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
  if (jsonl_.is_open()) {
    nlohmann::json j;
    j["step"] = step;
    j["validation_loss"] = loss;
    jsonl_ << j.dump() << "\n";
    jsonl_.flush();
  }
  if (tb_) {
    tb_->add_scalar("validation_metrics/loss", loss, step);
    tb_->flush();
  }
}

}  // namespace titan::metrics
