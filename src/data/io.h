// File helpers private to the data module: whole-file reads and a buffered line reader that
// starts at any byte offset and reports the offset after each line (for exact resume).
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>
#include <string_view>

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

  // Opens `path` positioned at byte `offset`; throws titan::Error when it cannot.
  void open(const std::string& path, int64_t offset);
  void close();
  bool is_open() const { return file_ != nullptr; }
  // Next line including its '\n' (the last line may lack one); false at end of file.
  bool next_line(std::string& line);
  // Byte offset of the next unread byte.
  int64_t offset() const { return offset_; }

 private:
  bool fill();
  std::FILE* file_ = nullptr;
  std::string path_;
  std::string buffer_;
  size_t begin_ = 0, end_ = 0;
  int64_t offset_ = 0;
};

// Number of '\n' bytes in the first `offset` bytes of `path` (line number of a resume point).
int64_t count_lines(const std::string& path, int64_t offset);

}  // namespace titan::data::io
