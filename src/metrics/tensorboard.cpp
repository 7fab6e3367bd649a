// TensorBoard event files (TFRecord + Event protos encoded by hand).
#include "titan/metrics/tensorboard.h"
#include "titan/util/fs.h"

#include <unistd.h>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>

#include "titan/util/crc32c.h"
#include "titan/util/error.h"

namespace titan::metrics {
namespace {

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}

template <typename T>
void put_fixed(std::string& out, T v) {
  char buf[sizeof(T)];
  std::memcpy(buf, &v, sizeof(T));  // little-endian hosts (x86-64, aarch64)
  out.append(buf, sizeof(T));
}

void put_bytes_field(std::string& out, int field, const std::string& bytes) {
  put_varint(out, static_cast<uint64_t>(field) << 3 | 2);
  put_varint(out, bytes.size());
  out += bytes;
}

// Event { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
std::string event(double wall_time, int64_t step, const std::string* file_version,
                  const std::string* summary) {
  std::string e;
  put_varint(e, 1 << 3 | 1);
  put_fixed<double>(e, wall_time);
  put_varint(e, 2 << 3 | 0);
  put_varint(e, static_cast<uint64_t>(step));
  if (file_version) put_bytes_field(e, 3, *file_version);
  if (summary) put_bytes_field(e, 5, *summary);
  return e;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

TensorBoardWriter::TensorBoardWriter(const std::string& folder) {
  util::make_directories(util::path_str(folder));
  char host[256] = "localhost";
  gethostname(host, sizeof(host) - 1);
  const auto t = static_cast<long long>(now_seconds());
  path_ = (std::filesystem::path(folder) / ("events.out.tfevents." + std::to_string(t) + "." +
                                            host + "." + std::to_string(getpid()) + ".titan"))
              .string();
  file_ = std::fopen(path_.c_str(), "wb");
  TITAN_CHECK(file_ != nullptr, "metrics.save_tb_folder: cannot create ", path_);
  const std::string version = "brain.Event:2";
  write_record(event(now_seconds(), 0, &version, nullptr));
}

TensorBoardWriter::~TensorBoardWriter() {
  if (file_) std::fclose(file_);
}

void TensorBoardWriter::write_record(const std::string& data) {
  std::string rec;
  const uint64_t len = data.size();
  put_fixed<uint64_t>(rec, len);
  put_fixed<uint32_t>(rec, util::masked_crc32c(rec.data(), 8));
  rec += data;
  put_fixed<uint32_t>(rec, util::masked_crc32c(data.data(), data.size()));
  TITAN_CHECK(std::fwrite(rec.data(), 1, rec.size(), file_) == rec.size(),
              "cannot write TensorBoard file ", path_);
}

void TensorBoardWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  // Summary { repeated Value value = 1; }  Value { string tag = 1; float simple_value = 2; }
  std::string v;
  put_bytes_field(v, 1, tag);
  put_varint(v, 2 << 3 | 5);
  put_fixed<float>(v, static_cast<float>(value));
  std::string summary;
  put_bytes_field(summary, 1, v);
  write_record(event(now_seconds(), step, nullptr, &summary));
}

void TensorBoardWriter::flush() {
  std::fflush(file_);
}

}  // namespace titan::metrics
