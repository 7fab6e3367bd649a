// Plain-text and JSON-lines files as a DocumentSource: documents numbered in file order and
// dealt round-robin over data-parallel ranks; resumable at any document boundary.
#include "sources.h"
#include "titan/util/error.h"
#include "titan/util/log.h"

namespace titan::data {
namespace {

constexpr int64_t kLoggedBadLines = 50;  // per epoch; the rest are only counted

class TextSource : public DocumentSource {
 public:
  TextSource(std::vector<TextFile> files, const DatasetOptions& o,
             std::shared_ptr<const Tokenizer> tok, std::string label)
      : reader_(std::move(files), o.text_field),
        tok_(std::move(tok)),
        rank_(o.dp_rank),
        size_(o.dp_size),
        label_(std::move(label)) {}

  bool next(std::vector<int32_t>& out) override {
    while (reader_.next(doc_)) {
      const int64_t index = pos_.doc++;
      if (index % size_ != rank_) continue;  // another rank's document: not even parsed
      if (!reader_.extract(doc_, problem_)) {
        skip_bad_line();
        continue;
      }
      ++good_;
      out.push_back(tok_->bos_id());
      const auto ids = tok_->encode(doc_.text);
      out.insert(out.end(), ids.begin(), ids.end());
      out.push_back(tok_->eos_id());
      return true;
    }
    return end_epoch();
  }

  SourcePosition position() const override {
    SourcePosition p = pos_;
    p.file = reader_.file();
    p.offset = reader_.offset();
    return p;
  }

  void seek(const SourcePosition& pos) override {
    TITAN_CHECK(pos.doc >= 0 && pos.epoch >= 0, "data loader state (epoch ", pos.epoch,
                ", document ", pos.doc, ") is malformed");
    reader_.seek(pos.file, pos.offset);
    pos_ = pos;
    good_ = bad_ = 0;
    first_problem_.clear();
    from_epoch_start_ = pos.file == 0 && pos.offset == 0 && pos.doc == 0;
  }

  std::string describe() const override {
    std::string d = label_;
    if (size_ > 1) {
      d += ", documents dealt round-robin: rank " + std::to_string(rank_) + " of " +
           std::to_string(size_);
    }
    return d;
  }

 private:
  void skip_bad_line() {
    ++bad_;
    if (first_problem_.empty()) first_problem_ = problem_;
    if (bad_ <= kLoggedBadLines) {
      log::warn("dataset: skipping {}", problem_);
      if (bad_ == kLoggedBadLines) {
        log::warn("dataset: further invalid JSONL lines in this epoch are skipped silently");
      }
    }
  }

  bool end_epoch() {
    TITAN_CHECK(pos_.doc > 0, "dataset ", label_, ": no documents (every file is blank)");
    if (bad_ > 0) {
      TITAN_CHECK(good_ > 0 || !from_epoch_start_, "dataset ", label_, ": all ", bad_,
                  " JSONL lines read", size_ > 1 ? " by this rank" : "",
                  " are invalid (first: ", first_problem_, "); is training.dataset_text_field (\"",
                  reader_.text_field(), "\") right?");
      log::warn("dataset {}: skipped {} invalid JSONL line(s) in epoch {}", label_, bad_,
                pos_.epoch);
    }
    pos_ = SourcePosition{pos_.epoch + 1, 0, 0, 0};
    reader_.seek(0, 0);
    good_ = bad_ = 0;
    first_problem_.clear();
    from_epoch_start_ = true;
    return false;
  }

  TextReader reader_;
  TextReader::Document doc_;
  std::shared_ptr<const Tokenizer> tok_;
  int64_t rank_, size_;
  std::string label_;
  SourcePosition pos_;  // epoch and doc; file/offset live in the reader
  int64_t good_ = 0;    // documents yielded in this epoch (since the last seek)
  int64_t bad_ = 0;     // invalid JSONL lines skipped in this epoch (since the last seek)
  std::string problem_, first_problem_;
  bool from_epoch_start_ = true;
};

}  // namespace

std::unique_ptr<DocumentSource> make_text_source(std::vector<TextFile> files,
                                                 const DatasetOptions& options,
                                                 std::shared_ptr<const Tokenizer> tokenizer,
                                                 std::string label) {
  return std::make_unique<TextSource>(std::move(files), options, std::move(tokenizer),
                                      std::move(label));
}

}  // namespace titan::data
