// safetensors reading (pread) and writing (write + fsync), with per-tensor CRC-32C.
#include "titan/checkpoint/safetensors.h"

#include <ATen/ATen.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "titan/util/crc32c.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::checkpoint {

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t s : shape) n *= s;
  return n;
}

std::string safetensors_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "F32";
    case at::kBFloat16: return "BF16";
    case at::kHalf: return "F16";
    case at::kDouble: return "F64";
    case at::kLong: return "I64";
    case at::kInt: return "I32";
    case at::kByte: return "U8";
    case at::kChar: return "I8";
    case at::kBool: return "BOOL";
    case at::kFloat8_e4m3fn: return "F8_E4M3";
    case at::kFloat8_e5m2: return "F8_E5M2";
    default: internal_fail("no safetensors dtype for ", c10::toString(t));
  }
}

at::ScalarType scalar_type_of(const std::string& d) {
  static const std::map<std::string, at::ScalarType> m = {{"F32", at::kFloat},
                                                          {"BF16", at::kBFloat16},
                                                          {"F16", at::kHalf},
                                                          {"F64", at::kDouble},
                                                          {"I64", at::kLong},
                                                          {"I32", at::kInt},
                                                          {"U8", at::kByte},
                                                          {"I8", at::kChar},
                                                          {"BOOL", at::kBool},
                                                          {"F8_E4M3", at::kFloat8_e4m3fn},
                                                          {"F8_E5M2", at::kFloat8_e5m2}};
  auto it = m.find(d);
  TITAN_CHECK(it != m.end(), "unsupported safetensors dtype \"", d, "\"");
  return it->second;
}

namespace {

int64_t element_size(const std::string& d) {
  return static_cast<int64_t>(c10::elementSize(scalar_type_of(d)));
}

void write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    TITAN_CHECK(w > 0, "cannot write ", path, ": ", std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

SafetensorsWriter::SafetensorsWriter(std::string path,
                                     std::vector<std::pair<std::string, TensorInfo>> tensors,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), tensors_(std::move(tensors)) {
  nlohmann::json header = nlohmann::json::object();
  int64_t offset = 0;
  for (auto& [name, info] : tensors_) {
    const int64_t bytes = info.numel() * element_size(info.dtype);
    info.begin = offset;
    info.end = offset + bytes;
    offset += bytes;
    header[name] = {
        {"dtype", info.dtype}, {"shape", info.shape}, {"data_offsets", {info.begin, info.end}}};
  }
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::string text = header.dump();
  // Pad the header so the data section starts 8-byte aligned, as the format recommends.
  while ((text.size() + 8) % 8 != 0) text += ' ';
  fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  TITAN_CHECK(fd_ >= 0, "cannot create ", path_, ": ", std::strerror(errno));
  const uint64_t len = text.size();
  write_all(fd_, &len, 8, path_);
  write_all(fd_, text.data(), text.size(), path_);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsWriter::write(const std::string& name, const at::Tensor& t) {
  TITAN_INTERNAL_CHECK(
      next_ < tensors_.size() && tensors_[next_].first == name && written_of_next_ == 0,
      "safetensors tensor ", name, " written out of order in ", path_);
  const TensorInfo& info = tensors_[next_].second;
  TITAN_INTERNAL_CHECK(!t.is_cuda() && t.is_contiguous() &&
                           safetensors_dtype(t.scalar_type()) == info.dtype &&
                           t.numel() == info.numel(),
                       "tensor ", name, " does not match its declaration in ", path_);
  write_part(name, t.data_ptr(), static_cast<size_t>(info.end - info.begin));
}

const TensorInfo& SafetensorsWriter::declared(const std::string& name) const {
  for (const auto& [n, info] : tensors_) {
    if (n == name) return info;
  }
  internal_fail("tensor ", name, " is not declared in ", path_);
}

void SafetensorsWriter::write_part(const std::string& name, const void* data, size_t bytes) {
  TITAN_INTERNAL_CHECK(next_ < tensors_.size() && tensors_[next_].first == name,
                       "safetensors tensor ", name, " written out of order in ", path_);
  const TensorInfo& info = tensors_[next_].second;
  const auto total = static_cast<size_t>(info.end - info.begin);
  const auto block = static_cast<size_t>(kCrcBlockBytes);
  TITAN_INTERNAL_CHECK(written_of_next_ + bytes <= total &&
                           (written_of_next_ + bytes == total || bytes % block == 0),
                       "part of ", bytes, " bytes of tensor ", name, " in ", path_,
                       ": parts are whole CRC blocks, and no more than the tensor's bytes");
  const auto* p = static_cast<const char*>(data);
  std::vector<uint32_t> crcs;
  auto take_crcs = [&] {
    for (size_t off = 0; off < bytes; off += block) {
      crcs.push_back(util::crc32c(p + off, std::min(bytes - off, block)));
    }
  };
  if (bytes >= 2 * block) {
    // The future's destructor waits for the CRCs if the write throws.
    auto crc_job = std::async(std::launch::async, take_crcs);
    write_all(fd_, p, bytes, path_);
    crc_job.get();
  } else {
    write_all(fd_, p, bytes, path_);
    take_crcs();
  }
  auto& blocks = crcs_[name];
  blocks.insert(blocks.end(), crcs.begin(), crcs.end());
  written_of_next_ += bytes;
  if (written_of_next_ == total) {
    ++next_;
    written_of_next_ = 0;
  }
}

void write_pipelined(SafetensorsWriter& writer, const std::vector<TensorToWrite>& tensors,
                     int64_t chunk_bytes, const std::function<void(int64_t)>& on_written) {
  TITAN_INTERNAL_CHECK(chunk_bytes > 0 && chunk_bytes % kCrcBlockBytes == 0,
                       "write_pipelined: chunks of ", chunk_bytes,
                       " bytes are not whole CRC blocks");
  for (const auto& t : tensors) {
    const TensorInfo& info = writer.declared(t.name);
    TITAN_INTERNAL_CHECK(safetensors_dtype(t.dtype) == info.dtype && t.data.numel() == info.numel(),
                         "tensor ", t.name, " (", t.data.numel(), " elements as ",
                         safetensors_dtype(t.dtype), ") does not match its declaration (",
                         info.numel(), " as ", info.dtype, ")");
  }
  struct Chunk {
    size_t tensor = 0;
    at::Tensor host;
  };
  constexpr size_t kQueued = 2;
  std::mutex mu;
  std::condition_variable changed;
  std::deque<Chunk> queue;
  bool produced_all = false, stop = false;
  std::exception_ptr error;
  auto fail_with = [&](std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(mu);
    if (!error) error = e;
    stop = true;
    changed.notify_all();
  };
  std::thread consumer([&] {
    try {
      for (;;) {
        Chunk c;
        {
          std::unique_lock<std::mutex> lock(mu);
          changed.wait(lock, [&] { return !queue.empty() || produced_all || stop; });
          if (stop || queue.empty()) return;
          c = std::move(queue.front());
          queue.pop_front();
        }
        changed.notify_all();
        const auto bytes = static_cast<size_t>(c.host.numel() * c.host.element_size());
        writer.write_part(tensors[c.tensor].name, c.host.data_ptr(), bytes);
        if (on_written) on_written(static_cast<int64_t>(bytes));
      }
    } catch (...) {
      fail_with(std::current_exception());
    }
  });
  try {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const TensorToWrite& t = tensors[i];
      const int64_t numel = t.data.numel();
      const int64_t per_chunk = chunk_bytes / static_cast<int64_t>(c10::elementSize(t.dtype));
      int64_t first = 0;
      do {
        const at::Tensor piece = t.data.narrow(0, first, std::min(per_chunk, numel - first));
        at::Tensor host;
        if (piece.is_cuda()) {
          const at::Tensor converted = piece.to(t.dtype);
          host = at::empty({converted.numel()},
                           converted.options().device(at::kCPU).pinned_memory(true));
          host.copy_(converted);
        } else {
          host = piece.to(t.dtype).contiguous();
        }
        std::unique_lock<std::mutex> lock(mu);
        changed.wait(lock, [&] { return queue.size() < kQueued || stop; });
        if (stop) break;
        queue.push_back({i, std::move(host)});
        changed.notify_all();
        first += per_chunk;
      } while (first < numel);
      std::lock_guard<std::mutex> lock(mu);
      if (stop) break;
    }
  } catch (...) {
    fail_with(std::current_exception());
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    produced_all = true;
  }
  changed.notify_all();
  consumer.join();
  if (error) std::rethrow_exception(error);
}

int64_t SafetensorsWriter::close() {
  TITAN_INTERNAL_CHECK(next_ == tensors_.size(), "", tensors_.size() - next_,
                       " declared tensors never written to ", path_);
  TITAN_CHECK(::fsync(fd_) == 0, "cannot fsync ", path_, ": ", std::strerror(errno));
  struct stat st {};
  ::fstat(fd_, &st);
  ::close(fd_);
  fd_ = -1;
  return static_cast<int64_t>(st.st_size);
}

SafetensorsReader::SafetensorsReader(std::string path) : path_(std::move(path)) {
  fd_ = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  TITAN_CHECK(fd_ >= 0, "cannot open ", path_, ": ", std::strerror(errno));
  struct stat st {};
  ::fstat(fd_, &st);
  file_size_ = static_cast<int64_t>(st.st_size);
  uint64_t len = 0;
  TITAN_CHECK(file_size_ >= 8 && ::pread(fd_, &len, 8, 0) == 8, path_,
              " is not a safetensors file (shorter than its 8-byte header length)");
  TITAN_CHECK(len <= 100u * 1024 * 1024 && static_cast<int64_t>(8 + len) <= file_size_, path_,
              " is not a safetensors file or is truncated (header length ", len, ", file size ",
              file_size_, ")");
  std::string text(len, '\0');
  TITAN_CHECK(::pread(fd_, text.data(), len, 8) == static_cast<ssize_t>(len),
              "cannot read the header of ", path_);
  data_start_ = static_cast<int64_t>(8 + len);
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(path_, ": malformed safetensors header: ", util::json_error_text(e.what()));
  }
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      for (auto m = it->begin(); m != it->end(); ++m) {
        metadata_[m.key()] = m->is_string() ? m->get<std::string>() : m->dump();
      }
      continue;
    }
    try {
      TensorInfo info;
      info.dtype = it->at("dtype").get<std::string>();
      info.shape = it->at("shape").get<std::vector<int64_t>>();
      auto offs = it->at("data_offsets").get<std::vector<int64_t>>();
      TITAN_CHECK(offs.size() == 2, "bad data_offsets");
      info.begin = offs[0];
      info.end = offs[1];
      TITAN_CHECK(info.end - info.begin == info.numel() * element_size(info.dtype), "tensor ",
                  it.key(), " has ", info.end - info.begin, " bytes for shape of ", info.numel(),
                  " elements");
      TITAN_CHECK(data_start_ + info.end <= file_size_, path_, " is truncated: tensor ", it.key(),
                  " ends at byte ", data_start_ + info.end, " of ", file_size_);
      tensors_[it.key()] = info;
    } catch (const nlohmann::json::exception& e) {
      fail(path_, ": malformed entry for tensor ", it.key(), ": ", util::json_error_text(e.what()));
    }
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (fd_ >= 0) ::close(fd_);
}

const TensorInfo& SafetensorsReader::info(const std::string& name) const {
  auto it = tensors_.find(name);
  TITAN_CHECK(it != tensors_.end(), path_, " holds no tensor named ", name);
  return it->second;
}

void SafetensorsReader::read_bytes(int64_t begin, int64_t end, void* out) const {
  char* p = static_cast<char*>(out);
  int64_t pos = data_start_ + begin;
  int64_t left = end - begin;
  while (left > 0) {
    ssize_t r = ::pread(fd_, p, static_cast<size_t>(left), pos);
    if (r < 0 && errno == EINTR) continue;
    TITAN_CHECK(r > 0, "cannot read ", path_, " at byte ", pos, ": ",
                r == 0 ? "unexpected end of file" : std::strerror(errno));
    p += r;
    pos += r;
    left -= r;
  }
}

at::Tensor SafetensorsReader::read(const std::string& name) const {
  const TensorInfo& i = info(name);
  at::Tensor t = at::empty(i.shape, at::TensorOptions().dtype(scalar_type_of(i.dtype)));
  read_bytes(i.begin, i.end, t.data_ptr());
  return t;
}

at::Tensor SafetensorsReader::read_range(const std::string& name, int64_t first,
                                         int64_t count) const {
  const TensorInfo& i = info(name);
  TITAN_INTERNAL_CHECK(first >= 0 && count >= 0 && first + count <= i.numel(), "range [", first,
                       ", ", first + count, ") outside tensor ", name, " of ", i.numel());
  const int64_t es = element_size(i.dtype);
  at::Tensor t = at::empty({count}, at::TensorOptions().dtype(scalar_type_of(i.dtype)));
  read_bytes(i.begin + first * es, i.begin + (first + count) * es, t.data_ptr());
  return t;
}

}  // namespace titan::checkpoint
