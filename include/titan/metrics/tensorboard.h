// A TensorBoard event-file writer for scalars: TFRecord framing (length, masked CRC32C, data,
// masked CRC32C) of hand-encoded Event / Summary protocol buffers. No protobuf dependency.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace titan::metrics {

class TensorBoardWriter {
 public:
  // Creates `folder` and a new events.out.tfevents.* file in it.
  explicit TensorBoardWriter(const std::string& folder);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void add_scalar(const std::string& tag, double value, int64_t step);
  void flush();
  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& data);
  std::string path_;
  std::FILE* file_ = nullptr;
};

}  // namespace titan::metrics
