// File helpers of the data module.
#include "io.h"

#include <zlib.h>

#include <algorithm>
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

namespace {

// gzopen reads a file that is not gzip as it is ("transparent" mode).
gzFile open_gz(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  if (f) gzbuffer(f, 1 << 20);
  return f;
}

// A gzip stream's error (damaged or truncated data, or the system's).
std::string gz_error(gzFile f) {
  int code = Z_OK;
  const char* text = gzerror(f, &code);
  if (code == Z_BUF_ERROR) return "the gzip data ends early (truncated file)";
  if (code == Z_ERRNO) return text ? text : "read error";
  return std::string("damaged gzip data: ") + (text ? text : "unknown error");
}

}  // namespace

void LineReader::open(const std::string& path, int64_t offset) {
  close();
  file_ = open_gz(path);
  if (!file_) fail("cannot open ", path, " (", std::strerror(errno), ")");
  path_ = path;
  buffer_.resize(1 << 20);
  begin_ = end_ = 0;
  offset_ = offset;
  lines_before_ = 0;
  // The bytes before the offset are read (a gzip file's decompressed), counting their lines for
  // messages (zlib's gzseek would read them too, without saying when the offset lies beyond the
  // end).
  int64_t left = offset;
  while (left > 0) {
    const auto want = static_cast<unsigned>(std::min<int64_t>(left, buffer_.size()));
    const int n = gzread(file_, buffer_.data(), want);
    if (n <= 0) {
      int code = Z_OK;
      gzerror(file_, &code);
      const std::string why = n < 0 || code != Z_OK
                                  ? gz_error(file_)
                                  : "it holds " + std::to_string(offset - left) +
                                        " bytes; the dataset changed since the position was saved";
      close();
      fail("resume position: byte offset ", offset, " of ", path, " cannot be reached (", why, ")");
    }
    lines_before_ += std::count(buffer_.data(), buffer_.data() + n, '\n');
    left -= n;
  }
}

void LineReader::close() {
  if (file_) gzclose(file_);
  file_ = nullptr;
}

bool LineReader::fill() {
  if (begin_ > 0) {
    std::memmove(buffer_.data(), buffer_.data() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  if (end_ == buffer_.size()) buffer_.resize(buffer_.size() * 2);
  const int want = static_cast<int>(std::min<size_t>(buffer_.size() - end_, 1 << 30));
  const int n = gzread(file_, buffer_.data() + end_, static_cast<unsigned>(want));
  if (n < 0) fail("error reading ", path_, ": ", gz_error(file_));
  // A gzip stream that stops before its end reads as a short file: name it.
  int code = Z_OK;
  gzerror(file_, &code);
  if (n == 0 && code != Z_OK) fail("error reading ", path_, ": ", gz_error(file_));
  end_ += static_cast<size_t>(n);
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

std::string head(const std::string& path, size_t n) {
  gzFile f = open_gz(path);
  if (!f) return "";
  std::string out(n, '\0');
  const int got = gzread(f, out.data(), static_cast<unsigned>(n));
  gzclose(f);
  out.resize(got > 0 ? static_cast<size_t>(got) : 0);
  return out;
}

}  // namespace titan::data::io
