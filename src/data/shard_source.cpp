// Pre-tokenized shards as a DocumentSource: rank r of n reads the r-th contiguous part of
// every file, in chunks of at most kShardDocumentTokens tokens; resumable at any token.
#include "sources.h"
#include "titan/data/token_shard.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::data {
namespace {

class ShardSource : public DocumentSource {
 public:
  ShardSource(std::vector<std::string> paths, const DatasetOptions& o, std::string label)
      : rank_(o.dp_rank), size_(o.dp_size), vocab_size_(o.vocab_size) {
    int64_t total = 0, mine = 0;
    bool warned = false;
    for (auto& p : paths) {
      const ShardHeader h = read_shard_header(p);
      TITAN_CHECK(h.vocab_size <= vocab_size_, "token shard ", p,
                  " was written with a tokenizer of ", h.vocab_size,
                  " ids but the model's vocabulary holds ", vocab_size_,
                  "; pick a model flavor with a larger vocab_size");
      if (o.tokenizer_vocab_size > 0 && h.vocab_size != o.tokenizer_vocab_size && !warned) {
        warned = true;
        log::warn(
            "token shard {} was written with a tokenizer of {} ids, but the job's tokenizer "
            "(model.tokenizer_path / model.hf_assets_path) has {}: the shards' ids are used as "
            "written; is it the tokenizer they were made with?",
            p, h.vocab_size, o.tokenizer_vocab_size);
      }
      File f{std::move(p), h.tokens, h.tokens * rank_ / size_, h.tokens * (rank_ + 1) / size_};
      total += f.tokens;
      mine += f.end - f.begin;
      files_.push_back(std::move(f));
    }
    TITAN_CHECK(total > 0, "dataset ", label, ": the token shards hold no tokens");
    label_ = label + " (" + util::with_commas(total) + " tokens";
    if (size_ > 1) {
      label_ += "; rank " + std::to_string(rank_) + " of " + std::to_string(size_) + " reads " +
                util::with_commas(mine);
    }
    label_ += ")";
  }

  bool next(std::vector<int32_t>& out) override {
    while (pos_.file < static_cast<int64_t>(files_.size())) {
      const File& f = files_[static_cast<size_t>(pos_.file)];
      if (pos_.offset < f.begin) pos_.offset = f.begin;
      if (pos_.offset >= f.end) {
        ++pos_.file;
        pos_.offset = 0;
        continue;
      }
      if (open_file_ != pos_.file) {
        reader_.open(f.path);
        open_file_ = pos_.file;
      }
      const int64_t count = std::min(kShardDocumentTokens, f.end - pos_.offset);
      const size_t base = out.size();
      reader_.read(pos_.offset, count, out);
      for (size_t i = base; i < out.size(); ++i) {
        if (out[i] < 0 || out[i] >= vocab_size_) {
          const int64_t at = pos_.offset + static_cast<int64_t>(i - base);
          const uint32_t id = static_cast<uint32_t>(out[i]);
          out.resize(base);
          fail("token shard ", f.path, ": token id ", id, " at position ", at,
               " is outside the model's vocabulary (vocab_size ", vocab_size_, ")");
        }
      }
      pos_.offset += count;
      ++pos_.doc;
      return true;
    }
    pos_ = SourcePosition{pos_.epoch + 1, 0, 0, 0};
    return false;
  }

  SourcePosition position() const override { return pos_; }

  void seek(const SourcePosition& pos) override {
    const bool fits = pos.file >= 0 && pos.file <= static_cast<int64_t>(files_.size()) &&
                      pos.offset >= 0 && pos.doc >= 0 && pos.epoch >= 0 &&
                      (pos.file == static_cast<int64_t>(files_.size()) ||
                       pos.offset <= files_[static_cast<size_t>(pos.file)].tokens);
    TITAN_CHECK(fits, "data loader state (file ", pos.file, ", token ", pos.offset,
                ") does not fit dataset ", label_, "; the shards changed since the checkpoint");
    pos_ = pos;
  }

  std::string describe() const override { return label_; }

 private:
  struct File {
    std::string path;
    int64_t tokens;
    int64_t begin, end;  // this rank's token range
  };
  std::vector<File> files_;
  int64_t rank_, size_, vocab_size_;
  std::string label_;
  SourcePosition pos_;
  ShardReader reader_;
  int64_t open_file_ = -1;
};

}  // namespace

std::unique_ptr<DocumentSource> make_shard_source(std::vector<std::string> files,
                                                  const DatasetOptions& options,
                                                  std::string label) {
  return std::make_unique<ShardSource>(std::move(files), options, std::move(label));
}

}  // namespace titan::data
