// Step metrics: the rank-0 log line, <dump_folder>/metrics.jsonl, and TensorBoard scalars.
#pragma once

#include <cstdint>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include "titan/util/device.h"

namespace titan::metrics {

class TensorBoardWriter;

struct StepMetrics {
  int64_t step = 0;
  double loss = 0;
  double grad_norm = 0;
  double lr = 0;
  double tokens_per_second = 0;   // per device
  double tflops = 0;              // per device
  std::optional<double> mfu_pct;  // unknown peak: none
  MemoryStats memory;
  double step_seconds = 0;
  double data_seconds = 0;  // host time waiting for data per step
  double eta_seconds = 0;
};

struct MetricsOptions {
  std::string dump_folder;
  bool write_files = true;  // metrics.jsonl (rank 0, or every rank)
  bool enable_tensorboard = false;
  std::string tb_folder;  // under dump_folder
  bool color = true;
  int rank = 0;
  // The step the run continues after (0: a fresh start). metrics.jsonl is a log kept across
  // runs: records of later steps, from an interrupted run's tail, are dropped at a resume.
  int64_t start_step = 0;
};

class MetricsLogger {
 public:
  explicit MetricsLogger(MetricsOptions options);
  ~MetricsLogger();
  void log_step(const StepMetrics& m);
  void log_validation(int64_t step, double loss, double seconds);

 private:
  // Appends one whole line; write errors warn once and fail after three in a row.
  void write_record(const std::string& line);
  MetricsOptions options_;
  std::string jsonl_path_;
  int jsonl_fd_ = -1;
  int failed_writes_ = 0;
  std::unique_ptr<TensorBoardWriter> tb_;
};

// "1h 02m 03s" style.
std::string format_duration(double seconds);

}  // namespace titan::metrics
