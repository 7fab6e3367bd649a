// Reading and writing pre-tokenized binary shards.
#include "titan/data/token_shard.h"
#include "titan/util/fs.h"

#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "titan/util/error.h"

namespace titan::data {
namespace {

static_assert(std::endian::native == std::endian::little,
              "token shards are little-endian; add byte swapping for this host");

uint32_t get_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
uint64_t get_u64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

void encode_header(const ShardHeader& h, uint8_t* out) {
  std::memcpy(out, kShardMagic, 8);
  std::memcpy(out + 8, &h.version, 4);
  std::memcpy(out + 12, &h.token_bytes, 4);
  const auto tokens = static_cast<uint64_t>(h.tokens);
  const auto vocab = static_cast<uint64_t>(h.vocab_size);
  std::memcpy(out + 16, &tokens, 8);
  std::memcpy(out + 24, &vocab, 8);
}

ShardHeader check_header(const std::string& path, std::FILE* f) {
  uint8_t raw[kShardHeaderBytes];
  const size_t got = std::fread(raw, 1, sizeof(raw), f);
  if (got >= 8 && std::memcmp(raw, kShardMagic, 8) != 0) {
    fail("token shard ", path,
         ": not a titan token shard (the file does not start with "
         "\"TITANTOK\")");
  }
  if (got < sizeof(raw)) {
    fail("token shard ", path, ": truncated header (", got, " bytes, expected ", kShardHeaderBytes,
         ")");
  }
  ShardHeader h;
  h.version = get_u32(raw + 8);
  h.token_bytes = get_u32(raw + 12);
  h.tokens = static_cast<int64_t>(get_u64(raw + 16));
  h.vocab_size = static_cast<int64_t>(get_u64(raw + 24));
  TITAN_CHECK(h.version == kShardVersion, "token shard ", path, ": format version ", h.version,
              " is not supported (expected ", kShardVersion, ")");
  TITAN_CHECK(h.token_bytes == 2 || h.token_bytes == 4, "token shard ", path,
              ": bytes per token is ", h.token_bytes, " (expected 2 for uint16 or 4 for uint32)");
  TITAN_CHECK(h.tokens >= 0 && h.vocab_size >= 0, "token shard ", path, ": corrupt header");
  const auto size = util::file_size(path);
  TITAN_CHECK(size >= 0, "token shard ", path, ": cannot read its size");
  const int64_t expected = kShardHeaderBytes + h.tokens * h.token_bytes;
  TITAN_CHECK(size == expected, "token shard ", path, ": the header says ", h.tokens, " tokens (",
              expected, " bytes) but the file has ", size,
              size < expected ? " bytes (truncated)" : " bytes (trailing data)");
  return h;
}

}  // namespace

ShardHeader read_shard_header(const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail("token shard ", path, ": cannot open (", std::strerror(errno), ")");
  try {
    ShardHeader h = check_header(path, f);
    std::fclose(f);
    return h;
  } catch (...) {
    std::fclose(f);
    throw;
  }
}

ShardReader::~ShardReader() {
  close();
}

void ShardReader::open(const std::string& path) {
  close();
  file_ = std::fopen(path.c_str(), "rb");
  if (!file_) fail("token shard ", path, ": cannot open (", std::strerror(errno), ")");
  try {
    header_ = check_header(path, file_);
  } catch (...) {
    close();
    throw;
  }
  path_ = path;
}

void ShardReader::close() {
  if (file_) std::fclose(file_);
  file_ = nullptr;
}

void ShardReader::read(int64_t begin, int64_t count, std::vector<int32_t>& out) {
  TITAN_INTERNAL_CHECK(file_ && begin >= 0 && count >= 0 && begin + count <= header_.tokens,
                       "shard read [", begin, ", ", begin + count, ") outside ", path_);
  const size_t width = header_.token_bytes;
  buffer_.resize(static_cast<size_t>(count) * width);
  const auto at = static_cast<off_t>(kShardHeaderBytes + begin * static_cast<int64_t>(width));
  if (fseeko(file_, at, SEEK_SET) != 0 ||
      std::fread(buffer_.data(), 1, buffer_.size(), file_) != buffer_.size()) {
    fail("token shard ", path_, ": read error at token ", begin);
  }
  const size_t base = out.size();
  out.resize(base + static_cast<size_t>(count));
  if (width == 2) {
    for (int64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, buffer_.data() + 2 * i, 2);
      out[base + i] = v;
    }
  } else {
    for (int64_t i = 0; i < count; ++i) {
      uint32_t v;
      std::memcpy(&v, buffer_.data() + 4 * i, 4);
      // Ids >= 2^31 become negative and are caught by the caller's vocabulary check.
      out[base + i] = static_cast<int32_t>(v);
    }
  }
}

ShardWriter::ShardWriter(std::string path, uint32_t token_bytes, int64_t vocab_size)
    : path_(std::move(path)),
      tmp_path_(path_ + ".tmp"),
      token_bytes_(token_bytes),
      vocab_size_(vocab_size) {
  TITAN_INTERNAL_CHECK(token_bytes_ == 2 || token_bytes_ == 4, "token width ", token_bytes_);
  TITAN_CHECK(token_bytes_ == 4 || vocab_size_ <= 65536, "a vocabulary of ", vocab_size_,
              " ids does not fit uint16 tokens");
  file_ = std::fopen(tmp_path_.c_str(), "wb");
  if (!file_) fail("cannot create ", tmp_path_, " (", std::strerror(errno), ")");
  uint8_t header[kShardHeaderBytes] = {};
  encode_header(ShardHeader{kShardVersion, token_bytes_, 0, vocab_size_}, header);
  if (std::fwrite(header, 1, sizeof(header), file_) != sizeof(header)) {
    fail("error writing ", tmp_path_);
  }
}

ShardWriter::~ShardWriter() {
  if (file_) {
    std::fclose(file_);
    std::remove(tmp_path_.c_str());
  }
}

void ShardWriter::append(const int32_t* tokens, size_t count) {
  buffer_.resize(count * token_bytes_);
  for (size_t i = 0; i < count; ++i) {
    TITAN_CHECK(tokens[i] >= 0 && tokens[i] < vocab_size_, "token ", tokens[i],
                " is outside the vocabulary (", vocab_size_, " ids) of shard ", path_);
    if (token_bytes_ == 2) {
      const auto v = static_cast<uint16_t>(tokens[i]);
      std::memcpy(buffer_.data() + 2 * i, &v, 2);
    } else {
      const auto v = static_cast<uint32_t>(tokens[i]);
      std::memcpy(buffer_.data() + 4 * i, &v, 4);
    }
  }
  if (std::fwrite(buffer_.data(), 1, buffer_.size(), file_) != buffer_.size()) {
    fail("error writing ", tmp_path_, " (", std::strerror(errno), ")");
  }
  tokens_ += static_cast<int64_t>(count);
}

void ShardWriter::finish() {
  uint8_t header[kShardHeaderBytes] = {};
  encode_header(ShardHeader{kShardVersion, token_bytes_, tokens_, vocab_size_}, header);
  const bool ok = std::fseek(file_, 0, SEEK_SET) == 0 &&
                  std::fwrite(header, 1, sizeof(header), file_) == sizeof(header) &&
                  std::fflush(file_) == 0;
  const bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!ok || !closed) {
    std::remove(tmp_path_.c_str());
    fail("error writing ", tmp_path_);
  }
  util::rename_path(tmp_path_, path_);
}

}  // namespace titan::data
