// File helpers of the data module.
#include "io.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "titan/util/error.h"

namespace titan::data::io {

std::string read_file(const std::string& path, std::string_view what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(what, ": cannot open ", path, " (", std::strerror(errno), ")");
  std::ostringstream s;
  s << in.rdbuf();
  if (in.bad()) fail(what, ": error reading ", path);
  return s.str();
}

LineReader::~LineReader() {
  close();
}

void LineReader::open(const std::string& path, int64_t offset) {
  close();
  file_ = std::fopen(path.c_str(), "rb");
  if (!file_) fail("cannot open ", path, " (", std::strerror(errno), ")");
  if (offset > 0 && fseeko(file_, static_cast<off_t>(offset), SEEK_SET) != 0) {
    const int err = errno;
    close();
    fail("cannot seek to byte ", offset, " of ", path, " (", std::strerror(err), ")");
  }
  path_ = path;
  buffer_.resize(1 << 20);
  begin_ = end_ = 0;
  offset_ = offset;
}

void LineReader::close() {
  if (file_) std::fclose(file_);
  file_ = nullptr;
}

bool LineReader::fill() {
  if (begin_ > 0) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ == buffer_.size()) buffer_.resize(buffer_.size() * 2);
  const size_t n = std::fread(buffer_.data() + end_, 1, buffer_.size() - end_, file_);
  if (n == 0 && std::ferror(file_)) fail("error reading ", path_);
  end_ += n;
  return n > 0;
}

bool LineReader::next_line(std::string& line) {
  line.clear();
  if (!file_) return false;
  size_t scanned = begin_;
  while (true) {
    const void* nl = std::memchr(buffer_.data() + scanned, '\n', end_ - scanned);
    if (nl) {
      const size_t stop = static_cast<size_t>(static_cast<const char*>(nl) - buffer_.data()) + 1;
      line.assign(buffer_.data() + begin_, stop - begin_);
      begin_ = stop;
      offset_ += static_cast<int64_t>(line.size());
      return true;
    }
    const size_t pending = end_ - begin_;
    if (!fill()) {
      if (end_ == begin_) return false;
      line.assign(buffer_.data() + begin_, end_ - begin_);
      begin_ = end_;
      offset_ += static_cast<int64_t>(line.size());
      return true;
    }
    scanned = begin_ + pending;
  }
}

int64_t count_lines(const std::string& path, int64_t offset) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) return 0;
  std::string buf(1 << 20, '\0');
  int64_t lines = 0, left = offset;
  while (left > 0) {
    const size_t want = static_cast<size_t>(std::min<int64_t>(left, buf.size()));
    const size_t n = std::fread(buf.data(), 1, want, f);
    if (n == 0) break;
    for (size_t i = 0; i < n; ++i) lines += buf[i] == '\n';
    left -= static_cast<int64_t>(n);
  }
  std::fclose(f);
  return lines;
}

}  // namespace titan::data::io
