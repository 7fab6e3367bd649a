// Document sources: ordered, resumable streams of tokenized documents for one data-parallel
// rank. Each rank sees a disjoint part of the data (documents dealt round-robin by index, or
// disjoint token ranges of binary shards).
//
// Local files (training.dataset_path: a file, or a folder listed recursively in sorted path
// order, skipping names that start with '.'):
//   *.txt          plain text; each file is a stream of documents separated by lines that
//                  hold only <|endoftext|> (or by the end of the file). The line break before
//                  a separator is not part of the document; blank documents are skipped.
//   *.jsonl *.json JSON lines: one object per line, its text in the field `text_field`.
//                  Blank lines are skipped; a line that is not JSON, not an object, or lacks a
//                  string field is logged (file:line) and skipped; if every line read in an
//                  epoch is bad, that is an error.
//   *.bin          pre-tokenized shards (titan/data/token_shard.h), written by titan_tokenize.
// Text and JSONL files may also be gzip-compressed (*.txt.gz, *.jsonl.gz, *.json.gz: c4's).
// Text and JSONL may be mixed in one folder; shards may not be mixed with text. Empty files
// and other extensions are ignored (list_data_files in titan/data/text_reader.h).
// A local copy of allenai/c4 given with dataset "c4" or "c4_validation" reads what torchtitan's
// load_dataset(path, name="en") reads: en/c4-train.* or en/c4-validation.* only.
//
// Text/JSONL documents are numbered in file order (blank ones not counted) and dealt
// round-robin: rank r of n gets documents with index % n == r; every rank reads the lines,
// only the owner parses and tokenizes. Shards: each file's token range is cut into n
// contiguous parts, rank r reads part r of every file, as documents of at most
// kShardDocumentTokens tokens (already framed with BOS/EOS by the writer).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "titan/data/tokenizer.h"

namespace titan::data {

// Where a source stands; meaning of the fields is per source, all are plain integers so the
// position can be written to a checkpoint and read back.
// Files: `file` indexes the sorted file list; `offset` is the byte offset of the next unread
// line (text/JSONL) or the index of the next unread token (shards) in that file; `doc` counts
// the documents of this epoch seen so far (all ranks' documents for text/JSONL, this rank's
// chunks for shards).
struct SourcePosition {
  int64_t epoch = 0;
  int64_t file = 0;    // index into the source's file list
  int64_t offset = 0;  // byte or token offset inside that file
  int64_t doc = 0;     // global document counter (round-robin dealing)
};

// Longest document a shard source yields (tokens).
inline constexpr int64_t kShardDocumentTokens = 8192;

class DocumentSource {
 public:
  virtual ~DocumentSource() = default;
  // Appends the next document's tokens, framed with BOS/EOS, to `out`; false at the end of
  // the epoch (then the position is at the start of the next epoch, and the next call
  // starts it). Throws titan::Error on bad data.
  virtual bool next(std::vector<int32_t>& out) = 0;
  virtual SourcePosition position() const = 0;
  // Continues exactly at `pos` (a position() of a source over the same data and rank).
  virtual void seek(const SourcePosition& pos) = 0;
  virtual std::string describe() const = 0;
};

struct DatasetOptions {
  std::string section = "training";  // the config section they come from, for messages
  std::string name;                  // <section>.dataset
  std::string path;                  // <section>.dataset_path
  std::string name_prefix;           // in a folder, only files whose names start with it
  std::string text_field;            // JSONL field
  int64_t dp_rank = 0;
  int64_t dp_size = 1;
  int64_t vocab_size = 0;  // model vocabulary: token ids must stay below it
  // The job's tokenizer's ids (0: unknown), compared with what token shards were written with.
  int64_t tokenizer_vocab_size = 0;
};

// The built-in corpus split ("train"/"validation") dealt to this rank.
std::unique_ptr<DocumentSource> make_corpus_source(const std::string& split,
                                                   std::shared_ptr<const Tokenizer> tokenizer,
                                                   int64_t dp_rank, int64_t dp_size);

// Local files under `options.path` (see the top of this file); throws titan::Error for a
// missing path, a folder without data files, empty files, or bad shard headers.
std::unique_ptr<DocumentSource> make_file_source(const DatasetOptions& options,
                                                 std::shared_ptr<const Tokenizer> tokenizer);

// The source a job asks for: titan_corpus(_validation), or files under `path`.
std::unique_ptr<DocumentSource> make_source(const DatasetOptions& options,
                                            std::shared_ptr<const Tokenizer> tokenizer);

}  // namespace titan::data
