// safetensors files: an 8-byte little-endian header length, a JSON header mapping each tensor
// name to {dtype, shape, data_offsets}, then the raw little-endian data. Used for titan's
// checkpoint shards and for Hugging Face weights. Reads are positioned (pread), so a rank can
// fetch just the byte range it needs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace titan::checkpoint {

struct TensorInfo {
  std::string dtype;  // safetensors name: F32, BF16, F16, I64, I32, U8, F8_E4M3, ...
  std::vector<int64_t> shape;
  int64_t begin = 0;  // byte offsets inside the data section
  int64_t end = 0;
  int64_t numel() const;
};

std::string safetensors_dtype(at::ScalarType t);
at::ScalarType scalar_type_of(const std::string& safetensors_dtype);  // throws for unknown

// Writes tensors one after another; the header is computed up front from the declared list.
class SafetensorsWriter {
 public:
  // Declares every tensor (name, dtype, shape) in file order, plus string metadata.
  SafetensorsWriter(std::string path, std::vector<std::pair<std::string, TensorInfo>> tensors,
                    std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  // Appends the next declared tensor's bytes (contiguous CPU tensor of the declared dtype).
  void write(const std::string& name, const at::Tensor& cpu_tensor);
  // Appends the next `bytes` of the declared tensor being written (`name`; parts in order, each
  // but a tensor's last a whole number of kCrcBlockBytes blocks). Its CRCs are taken on a
  // second thread while this one writes.
  void write_part(const std::string& name, const void* data, size_t bytes);
  // The declaration of tensor `name` (InternalError if none).
  const TensorInfo& declared(const std::string& name) const;
  // Flushes and fsyncs; returns the file's size. Throws titan::Error on any I/O failure.
  int64_t close();
  // CRC-32C of each kCrcBlockBytes block of each tensor's bytes (valid after writing), so a
  // reader can verify any byte range by reading the blocks that cover it.
  const std::map<std::string, std::vector<uint32_t>>& block_crcs() const { return crcs_; }

 private:
  std::string path_;
  std::vector<std::pair<std::string, TensorInfo>> tensors_;
  size_t next_ = 0;
  size_t written_of_next_ = 0;  // bytes of tensors_[next_] written so far
  int fd_ = -1;
  std::map<std::string, std::vector<uint32_t>> crcs_;
};

constexpr int64_t kCrcBlockBytes = int64_t(4) << 20;

// One tensor for write_pipelined: its declared name, its data (1-D, on the host or a device)
// and the dtype it is written in.
struct TensorToWrite {
  std::string name;
  at::Tensor data;
  at::ScalarType dtype;
};

// Writes `tensors` (the writer's next declared ones, in order) in chunks of `chunk_bytes` (a
// whole number of kCrcBlockBytes): the calling thread brings each chunk to the host (a
// device's converted there and copied into pinned memory) while a second thread writes the
// chunk before it, so the device copy, the write and the CRCs overlap. At most two chunks wait
// between the threads. `on_written(bytes)` runs on the writing thread after each chunk. Each
// tensor's dtype and element count must be its declaration's.
void write_pipelined(SafetensorsWriter& writer, const std::vector<TensorToWrite>& tensors,
                     int64_t chunk_bytes, const std::function<void(int64_t)>& on_written = {});

class SafetensorsReader {
 public:
  // Opens and parses the header; throws titan::Error naming the file if it is not safetensors.
  explicit SafetensorsReader(std::string path);
  ~SafetensorsReader();
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool has(const std::string& name) const { return tensors_.count(name) > 0; }
  const TensorInfo& info(const std::string& name) const;
  // The whole tensor, or elements [first, first + count) of its flattened data, as a CPU
  // tensor of the stored dtype (1-D for ranges).
  at::Tensor read(const std::string& name) const;
  at::Tensor read_range(const std::string& name, int64_t first, int64_t count) const;
  // Raw bytes [begin, end) of the data section.
  void read_bytes(int64_t begin, int64_t end, void* out) const;
  const std::string& path() const { return path_; }
  int64_t file_size() const { return file_size_; }

 private:
  std::string path_;
  int fd_ = -1;
  int64_t data_start_ = 0;
  int64_t file_size_ = 0;
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace titan::checkpoint
