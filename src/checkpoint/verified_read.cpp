// Checkpoint reads verified block by block against the index's CRC-32Cs.
#include "titan/checkpoint/verified_read.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#include "titan/util/crc32c.h"
#include "titan/util/error.h"
#include "titan/util/parallel.h"

namespace titan::checkpoint {
namespace {

// The tensor a chunk's key names in `reader`, checked against the index: present, with CRC
// blocks of whole elements, and holding [first, first + count).
const TensorInfo& chunk_tensor(const SafetensorsReader& reader, const Chunk& c, int64_t first,
                               int64_t count) {
  // A header that disagrees with the index is damage too (a flipped byte in a name or shape).
  TITAN_CHECK(reader.has(c.key), "checkpoint file ", reader.path(),
              " is corrupted: its header has no tensor ", c.key, " (the index lists one)");
  const TensorInfo& info = reader.info(c.key);
  const int64_t es = static_cast<int64_t>(c10::elementSize(scalar_type_of(info.dtype)));
  TITAN_CHECK(c.block_bytes > 0 && c.block_bytes % es == 0, "checkpoint index of ", reader.path(),
              " is corrupted: CRC blocks of ", c.block_bytes, " bytes for tensor ", c.key, " of ",
              es, "-byte elements");
  TITAN_CHECK(first >= 0 && count >= 0 && first + count <= info.numel(), "checkpoint file ",
              reader.path(), " is corrupted: tensor ", c.key, " holds ", info.numel(),
              " elements, the index asks for [", first, ", ", first + count, ")");
  return info;
}

// Reads the whole CRC blocks [lo, hi) (byte offsets in the chunk's tensor, block-aligned; hi may
// be the tensor's end) into `out` and checks their CRCs (in parallel where the caller is not
// already on a parallel thread).
void read_blocks(const SafetensorsReader& reader, const Chunk& c, const TensorInfo& info,
                 int64_t lo, int64_t hi, char* out) {
  const int64_t total = info.end - info.begin;
  reader.read_bytes(info.begin + lo, info.begin + hi, out);
  const int64_t blocks = (hi - lo + c.block_bytes - 1) / c.block_bytes;
  std::atomic<int64_t> bad_block{-1};
  util::parallel_range(blocks, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t b = lo + k * c.block_bytes;
      const auto idx = static_cast<size_t>(b / c.block_bytes);
      const int64_t len = std::min(c.block_bytes, total - b);
      if (idx >= c.crcs.size() ||
          util::crc32c(out + (b - lo), static_cast<size_t>(len)) != c.crcs[idx]) {
        // The first failing block is named, whichever thread finds it.
        int64_t seen = bad_block.load();
        while ((seen < 0 || b < seen) && !bad_block.compare_exchange_weak(seen, b)) {
        }
      }
    }
  });
  const int64_t b = bad_block.load();
  TITAN_CHECK(b < 0, "checkpoint file ", reader.path(), " is corrupted: bytes ", b, "..",
              b + std::min(c.block_bytes, total - b), " of tensor ", c.key,
              " fail their CRC-32C check");
}

// Grows `scratch` (a loader thread's reusable buffer) to `bytes` and returns its start.
char* scratch_bytes(at::Tensor& scratch, int64_t bytes) {
  if (!scratch.defined() || scratch.numel() < bytes) {
    scratch = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  return static_cast<char*>(scratch.data_ptr());
}

}  // namespace

at::Tensor read_verified(const SafetensorsReader& reader, const Chunk& c, int64_t first,
                         int64_t count, at::Tensor* scratch) {
  const TensorInfo& info = chunk_tensor(reader, c, first, count);
  const int64_t es = static_cast<int64_t>(c10::elementSize(scalar_type_of(info.dtype)));
  const int64_t total = info.end - info.begin;
  const int64_t lo = (first * es) / c.block_bytes * c.block_bytes;
  const int64_t hi =
      std::min(total, ((first + count) * es + c.block_bytes - 1) / c.block_bytes * c.block_bytes);
  at::Tensor own;
  at::Tensor& buf = scratch ? *scratch : own;
  scratch_bytes(buf, hi - lo);
  read_blocks(reader, c, info, lo, hi, static_cast<char*>(buf.data_ptr()));
  // The offset is a whole number of elements: lo is a whole number of CRC blocks.
  return buf.narrow(0, first * es - lo, count * es).view(scalar_type_of(info.dtype));
}

void read_verified_into(const SafetensorsReader& reader, const Chunk& c, int64_t first,
                        int64_t count, char* out, at::Tensor& scratch) {
  const TensorInfo& info = chunk_tensor(reader, c, first, count);
  const int64_t es = static_cast<int64_t>(c10::elementSize(scalar_type_of(info.dtype)));
  const int64_t total = info.end - info.begin;
  if (count == 0) return;
  const int64_t bs = c.block_bytes;
  const int64_t a = first * es, b = (first + count) * es;  // the bytes wanted
  const int64_t inner_lo = (a + bs - 1) / bs * bs;
  const int64_t inner_hi = b == total ? b : b / bs * bs;
  // An end that is not a block boundary: its block goes through the scratch buffer.
  auto edge = [&](int64_t block_lo, int64_t want_lo, int64_t want_hi) {
    const int64_t block_hi = std::min(total, block_lo + bs);
    char* tmp = scratch_bytes(scratch, block_hi - block_lo);
    read_blocks(reader, c, info, block_lo, block_hi, tmp);
    std::memcpy(out + (want_lo - a), tmp + (want_lo - block_lo),
                static_cast<size_t>(want_hi - want_lo));
  };
  if (inner_lo >= inner_hi) {  // no whole block inside: one or two partial blocks
    const int64_t lo = a / bs * bs;
    edge(lo, a, std::min(b, lo + bs));
    if (b > lo + bs) edge(lo + bs, lo + bs, b);
    return;
  }
  if (a < inner_lo) edge(inner_lo - bs, a, inner_lo);
  read_blocks(reader, c, info, inner_lo, inner_hi, out + (inner_lo - a));
  if (inner_hi < b) edge(inner_hi, inner_hi, b);
}

}  // namespace titan::checkpoint
