// A small deterministic byte-level BPE trainer: counts pre-tokenized pieces, then merges the
// most frequent adjacent pair until the requested number of ranks. Writes tiktoken files.
// Meant for example data and tests (tokenizers for the debug model), not for 128k vocabularies
// over terabytes.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "titan/data/bpe_tokenizer.h"
#include "titan/data/pretokenizer.h"

namespace titan::data {

class BpeTrainer {
 public:
  explicit BpeTrainer(std::string_view pattern = kLlama3SplitPattern);
  // Counts the pieces of `text` (not thread-safe).
  void add_text(std::string_view text);
  // Mergeable ranks, rank = index: the 256 single bytes first (rank = byte value), then one
  // token per merge, most frequent pair first (ties: the pair of lower ranks). Stops early
  // when no adjacent pair occurs at least twice.
  std::vector<std::string> train(int64_t num_ranks) const;
  int64_t distinct_pieces() const { return static_cast<int64_t>(counts_.size()); }

 private:
  Pretokenizer pre_;
  std::unordered_map<std::string, int64_t> counts_;
  std::string piece_;  // reused key buffer
};

// Writes `ranks` as a tiktoken BPE file ("<base64 token> <rank>" per line); throws
// titan::Error when the file cannot be written.
void write_tiktoken_file(const std::string& path, const std::vector<std::string>& ranks);

// The ranks as BpeSpec tokens (id = rank), for make_tiktoken_tokenizer.
std::vector<BpeSpec::Token> ranks_as_tokens(const std::vector<std::string>& ranks);

}  // namespace titan::data
