// Document sources: ordered, resumable streams of tokenized documents for one data-parallel
// rank. Each rank sees a disjoint part of the data (documents dealt round-robin by index, or
// disjoint token ranges of binary shards).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "titan/data/tokenizer.h"

namespace titan::data {

// Where a source stands; meaning of the fields is per source, all are plain integers so the
// position can be written to a checkpoint and read back.
struct SourcePosition {
  int64_t epoch = 0;
  int64_t file = 0;    // index into the source's file list
  int64_t offset = 0;  // byte or token offset inside that file
  int64_t doc = 0;     // global document counter (round-robin dealing)
};

class DocumentSource {
 public:
  virtual ~DocumentSource() = default;
  // Appends the next document's tokens, framed with BOS/EOS, to `out`; false at the end of
  // the epoch (then the position is at the start of the next epoch).
  virtual bool next(std::vector<int32_t>& out) = 0;
  virtual SourcePosition position() const = 0;
  virtual void seek(const SourcePosition& pos) = 0;
  virtual std::string describe() const = 0;
};

struct DatasetOptions {
  std::string name;        // training.dataset
  std::string path;        // training.dataset_path
  std::string text_field;  // JSONL field
  int64_t dp_rank = 0;
  int64_t dp_size = 1;
  int64_t vocab_size = 0;  // model vocabulary: token ids must stay below it
};

// The built-in corpus split ("train"/"validation") dealt to this rank.
std::unique_ptr<DocumentSource> make_corpus_source(const std::string& split,
                                                   std::shared_ptr<const Tokenizer> tokenizer,
                                                   int64_t dp_rank, int64_t dp_size);

// The source a job asks for: titan_corpus(_validation), or files under `path`.
std::unique_ptr<DocumentSource> make_source(const DatasetOptions& options,
                                            std::shared_ptr<const Tokenizer> tokenizer);

}  // namespace titan::data
