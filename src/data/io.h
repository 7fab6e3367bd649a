// File helpers private to the data module: whole-file reads and a buffered line reader that
// starts at any byte offset and reports the offset after each line (for exact resume). The
// line reader and head() read gzip files (c4's .json.gz) as their decompressed bytes, and
// other files as they are; offsets count decompressed bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

struct gzFile_s;

namespace titan::data::io {

// The whole file; throws titan::Error naming `what` and the path when it cannot be read.
std::string read_file(const std::string& path, std::string_view what);

// An open file (RAII), read through a large buffer.
class LineReader {
 public:
  LineReader() = default;
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  // Opens `path` positioned at (decompressed) byte `offset`, reading the bytes before it;
  // throws titan::Error when it cannot (also when the file ends before the offset).
  void open(const std::string& path, int64_t offset);
  void close();
  bool is_open() const { return file_ != nullptr; }
  // Next line including its '\n' (the last line may lack one); false at end of file.
  bool next_line(std::string& line);
  // Byte offset of the next unread byte.
  int64_t offset() const { return offset_; }
  // Lines ('\n' bytes) before the offset `open` started at: the line number of a resume point.
  int64_t lines_before() const { return lines_before_; }

 private:
  bool fill();
  gzFile_s* file_ = nullptr;
  std::string path_;
  std::string buffer_;
  size_t begin_ = 0, end_ = 0;
  int64_t offset_ = 0;
  int64_t lines_before_ = 0;
};

// Up to `n` first (decompressed) bytes of `path`; "" when it cannot be read.
std::string head(const std::string& path, size_t n);

}  // namespace titan::data::io
