// Pre-tokenized binary shards: a 32-byte little-endian header, then the raw tokens.
//
//   offset  size  field
//        0     8  magic "TITANTOK"
//        8     4  format version (1)
//       12     4  bytes per token: 2 (uint16) or 4 (uint32)
//       16     8  token count
//       24     8  vocabulary size of the tokenizer that wrote it (every id is below it)
//       32     -  tokens, little-endian; documents are already framed with BOS ... EOS
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace titan::data {

inline constexpr char kShardMagic[8] = {'T', 'I', 'T', 'A', 'N', 'T', 'O', 'K'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr int64_t kShardHeaderBytes = 32;

struct ShardHeader {
  uint32_t version = kShardVersion;
  uint32_t token_bytes = 4;
  int64_t tokens = 0;
  int64_t vocab_size = 0;
};

// Reads and checks the header of `path` (magic, version, token width, and that the file
// holds exactly `tokens` tokens); throws titan::Error naming the file otherwise.
ShardHeader read_shard_header(const std::string& path);

// Reads tokens [begin, begin + count) of an open shard into `out` (appended, as int32).
class ShardReader {
 public:
  ShardReader() = default;
  ~ShardReader();
  ShardReader(const ShardReader&) = delete;
  ShardReader& operator=(const ShardReader&) = delete;
  void open(const std::string& path);  // checks the header
  void close();
  bool is_open() const { return file_ != nullptr; }
  const ShardHeader& header() const { return header_; }
  const std::string& path() const { return path_; }
  void read(int64_t begin, int64_t count, std::vector<int32_t>& out);

 private:
  std::FILE* file_ = nullptr;
  std::string path_;
  ShardHeader header_;
  std::vector<uint8_t> buffer_;
};

// Writes one shard: tokens are appended, the header is completed by finish(), which renames
// the temporary "<path>.tmp" to `path` (a crash leaves no half-written shard under `path`).
class ShardWriter {
 public:
  // token_bytes 2 needs vocab_size <= 65536.
  ShardWriter(std::string path, uint32_t token_bytes, int64_t vocab_size);
  ~ShardWriter();  // removes the temporary file if finish() was not called
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;
  void append(const int32_t* tokens, size_t count);
  void finish();
  int64_t tokens() const { return tokens_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_path_;
  uint32_t token_bytes_;
  int64_t vocab_size_;
  int64_t tokens_ = 0;
  std::FILE* file_ = nullptr;
  std::vector<uint8_t> buffer_;
};

}  // namespace titan::data
