// The built-in corpus as a DocumentSource.
#include <utility>

#include "titan/data/corpus.h"
#include "titan/data/dataset.h"

namespace titan::data {
namespace {

class CorpusSource : public DocumentSource {
 public:
  CorpusSource(std::string split, std::shared_ptr<const Tokenizer> tok, int64_t rank, int64_t size)
      : split_(std::move(split)), tok_(std::move(tok)), rank_(rank), size_(size) {
    pos_.doc = rank_;
  }

  bool next(std::vector<int32_t>& out) override {
    if (pos_.doc >= corpus_documents(split_)) {
      pos_.epoch += 1;
      pos_.doc = rank_;
      return false;
    }
    out.push_back(tok_->bos_id());
    auto ids = tok_->encode(corpus_document(split_, pos_.doc));
    out.insert(out.end(), ids.begin(), ids.end());
    out.push_back(tok_->eos_id());
    pos_.doc += size_;
    return true;
  }
  SourcePosition position() const override { return pos_; }
  void seek(const SourcePosition& pos) override { pos_ = pos; }
  std::string describe() const override {
    return "titan_corpus/" + split_ + " (" + std::to_string(corpus_documents(split_)) +
           " generated documents)";
  }

 private:
  std::string split_;
  std::shared_ptr<const Tokenizer> tok_;
  int64_t rank_, size_;
  SourcePosition pos_;
};

}  // namespace

std::unique_ptr<DocumentSource> make_corpus_source(const std::string& split,
                                                   std::shared_ptr<const Tokenizer> tokenizer,
                                                   int64_t dp_rank, int64_t dp_size) {
  return std::make_unique<CorpusSource>(split, std::move(tokenizer), dp_rank, dp_size);
}

}  // namespace titan::data
