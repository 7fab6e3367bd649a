// Packing loader with a prefetch thread and checkpointable state.
#include "titan/data/dataloader.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstring>

#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::data {

std::string LoaderState::to_json() const {
  nlohmann::json j;
  j["epoch"] = position.epoch;
  j["file"] = position.file;
  j["offset"] = position.offset;
  j["doc"] = position.doc;
  j["carry"] = carry;
  j["windows"] = windows;
  return j.dump();
}

LoaderState LoaderState::from_json(const std::string& text) {
  try {
    auto j = nlohmann::json::parse(text);
    LoaderState s;
    s.position.epoch = j.at("epoch").get<int64_t>();
    s.position.file = j.at("file").get<int64_t>();
    s.position.offset = j.at("offset").get<int64_t>();
    s.position.doc = j.at("doc").get<int64_t>();
    s.carry = j.at("carry").get<std::vector<int32_t>>();
    s.windows = j.at("windows").get<int64_t>();
    return s;
  } catch (const nlohmann::json::exception& e) {
    fail("data loader state is malformed: ", util::json_error_text(e.what()));
  }
}

DataLoader::DataLoader(std::unique_ptr<DocumentSource> source, LoaderOptions options)
    : source_(std::move(source)), options_(options) {
  TITAN_INTERNAL_CHECK(options_.batch_size >= 1 && options_.seq_len >= 1 && options_.dp_size >= 1 &&
                           options_.dp_rank >= 0 && options_.dp_rank < options_.dp_size,
                       "bad loader batch/seq/dp");
  description_ = source_->describe();
  cursor_.position = source_->position();
  consumed_ = cursor_;
  start_thread();
}

DataLoader::~DataLoader() {
  stop_thread();
}

DataLoader::Item DataLoader::produce() {
  const int64_t window = options_.seq_len + 1;
  const size_t need = static_cast<size_t>(options_.batch_size * options_.dp_size * window);
  bool read_any_this_epoch = false;
  while (cursor_.carry.size() < need) {
    const size_t before = cursor_.carry.size();
    if (source_->next(cursor_.carry)) {
      read_any_this_epoch |= cursor_.carry.size() > before;
      continue;
    }
    // End of an epoch.
    const auto pos = source_->position();
    if (!options_.infinite) {
      cursor_.position = pos;
      return Item{at::Tensor(), cursor_};
    }
    TITAN_CHECK(read_any_this_epoch || cursor_.windows > 0 || !cursor_.carry.empty(), "dataset ",
                description_, " yields no tokens for this rank");
    // A dataset smaller than a batch ends many epochs per batch: say so once, then count.
    ++epochs_logged_;
    if (small_warned_) {
      // counted only
    } else if (epochs_logged_ == 1 || cursor_.windows > windows_at_last_log_) {
      log::info("dataset {}: epoch {} finished after {} windows; re-looping", description_,
                pos.epoch, cursor_.windows);
      windows_at_last_log_ = cursor_.windows;
    } else {
      small_warned_ = true;
      log::warn(
          "dataset {} holds less than one batch ({} tokens per step across data-parallel ranks): "
          "it is repeated within every batch; further epochs are counted, not logged",
          description_, need);
    }
    read_any_this_epoch = false;
  }
  auto opts = at::TensorOptions().dtype(at::kLong).pinned_memory(options_.pin_memory);
  at::Tensor batch = at::empty({options_.batch_size, window}, opts);
  int64_t* dst = batch.data_ptr<int64_t>();
  const size_t mine = static_cast<size_t>(options_.batch_size * window);
  const size_t first = static_cast<size_t>(options_.dp_rank) * mine;
  for (size_t i = 0; i < mine; ++i) dst[i] = cursor_.carry[first + i];
  cursor_.carry.erase(cursor_.carry.begin(), cursor_.carry.begin() + static_cast<long>(need));
  cursor_.windows += options_.batch_size * options_.dp_size;
  cursor_.position = source_->position();
  return Item{batch, cursor_};
}

void DataLoader::start_thread() {
  if (options_.prefetch_batches <= 0) return;
  stop_ = false;
  thread_ = std::thread([this] { worker(); });
}

void DataLoader::stop_thread() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void DataLoader::worker() {
  try {
    while (true) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] {
          return stop_ || queue_.size() < static_cast<size_t>(options_.prefetch_batches);
        });
        if (stop_) return;
      }
      Item item = produce();
      const bool end = !item.batch.defined();
      {
        std::lock_guard<std::mutex> lock(mu_);
        queue_.push_back(std::move(item));
      }
      cv_.notify_all();
      if (end) return;
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = std::current_exception();
    cv_.notify_all();
  }
}

at::Tensor DataLoader::next() {
  const auto t0 = std::chrono::steady_clock::now();
  Item item;
  if (options_.prefetch_batches <= 0) {
    item = produce();
  } else {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return !queue_.empty() || error_; });
    if (queue_.empty() && error_) std::rethrow_exception(error_);
    item = std::move(queue_.front());
    if (item.batch.defined()) queue_.pop_front();  // keep the end marker for later calls
    lock.unlock();
    cv_.notify_all();
  }
  last_wait_s_ = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (item.batch.defined()) consumed_ = item.state;
  return item.batch;
}

LoaderState DataLoader::state() const {
  return consumed_;
}

void DataLoader::load_state(const LoaderState& state) {
  stop_thread();
  queue_.clear();
  error_ = nullptr;
  source_->seek(state.position);
  cursor_ = state;
  consumed_ = state;
  start_thread();
}

}  // namespace titan::data
