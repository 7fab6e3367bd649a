// The data loader: packs a rank's documents into [batch, seq_len + 1] token windows (inputs
// are [:, :-1], labels [:, 1:]), on a background thread, with a resumable state.
#pragma once

#include <ATen/core/Tensor.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "titan/data/dataset.h"

namespace titan::data {

// Everything needed to continue exactly at the next token.
struct LoaderState {
  SourcePosition position;     // source position after the documents read so far
  std::vector<int32_t> carry;  // tokens read but not yet emitted in a window
  int64_t windows = 0;         // windows emitted so far
  std::string to_json() const;
  static LoaderState from_json(const std::string& json);  // throws titan::Error
};

// Data parallelism deals windows, not documents: every rank reads the same global stream and
// keeps its slice [dp_rank * batch, (dp_rank + 1) * batch) of each group of dp_size * batch
// windows. The global batch is therefore the same for any number of ranks (a 4-rank run sees
// exactly the tokens of a 1-rank run with 4x the batch), and the loader state is the same on
// every rank. The cost is that each rank packs the whole stream; pre-tokenized shards
// (titan_tokenize) make that a memory copy.
struct LoaderOptions {
  int64_t batch_size = 8;  // per rank
  int64_t dp_rank = 0;
  int64_t dp_size = 1;
  int64_t seq_len = 2048;
  bool infinite = true;      // re-loop over epochs (training); false stops (validation)
  int prefetch_batches = 2;  // 0: no background thread
  bool pin_memory = false;   // page-locked host batches for async H2D copies
};

class DataLoader {
 public:
  DataLoader(std::unique_ptr<DocumentSource> source, LoaderOptions options);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // Next batch, int64 [batch, seq_len + 1] on the host; undefined tensor when a finite
  // loader has no full batch left.
  at::Tensor next();
  // State after the last batch returned by next().
  LoaderState state() const;
  // Continue from `state` (drops prefetched batches).
  void load_state(const LoaderState& state);
  // Seconds the last next() call waited for data.
  double last_wait_seconds() const { return last_wait_s_; }
  const std::string& describe() const { return description_; }

 private:
  struct Item {
    at::Tensor batch;  // undefined: end of data
    LoaderState state;
  };
  Item produce();  // builds one batch from the source (caller holds no lock)
  void start_thread();
  void stop_thread();
  void worker();

  std::unique_ptr<DocumentSource> source_;
  LoaderOptions options_;
  std::string description_;
  LoaderState cursor_;               // producer-side state (source position + carry)
  int64_t epochs_logged_ = 0;        // epochs ended so far (small datasets loop often)
  int64_t windows_at_last_log_ = 0;  // windows produced when an epoch end was last logged
  bool small_warned_ = false;
  LoaderState consumed_;  // state after the last batch handed out
  double last_wait_s_ = 0;

  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Item> queue_;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace titan::data
