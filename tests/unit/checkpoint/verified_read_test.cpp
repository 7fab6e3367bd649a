// Verified checkpoint reads: every element range of a chunk, read through the scratch buffer or
// straight into its destination, gives the file's bytes; a damaged block is named whichever
// path reads it, and only blocks the range touches are checked.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support/test_support.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/checkpoint/verified_read.h"
#include "titan/util/crc32c.h"
#include "titan/util/error.h"

using namespace titan;
using checkpoint::Chunk;
using checkpoint::SafetensorsReader;

namespace {

constexpr int64_t kBlockBytes = 64;  // 16 floats: ranges cross many blocks at test sizes

// A one-tensor file of `values` and its chunk, with CRCs over kBlockBytes blocks (the index
// records a block size per chunk; titan writes 4 MiB ones).
Chunk write_chunk(const std::string& path, const at::Tensor& values) {
  checkpoint::TensorInfo info;
  info.dtype = checkpoint::safetensors_dtype(values.scalar_type());
  info.shape = values.sizes().vec();
  checkpoint::SafetensorsWriter w(path, {{"t", info}});
  w.write("t", values);
  w.close();
  Chunk c;
  c.file = path;
  c.key = "t";
  c.box = checkpoint::Box::whole(values.sizes().vec());
  c.numel = values.numel();
  c.block_bytes = kBlockBytes;
  const auto* bytes = static_cast<const char*>(values.data_ptr());
  const int64_t total = values.numel() * values.element_size();
  for (int64_t b = 0; b < total; b += kBlockBytes) {
    c.crcs.push_back(
        util::crc32c(bytes + b, static_cast<size_t>(std::min(kBlockBytes, total - b))));
  }
  return c;
}

at::Tensor read_into(const SafetensorsReader& r, const Chunk& c, int64_t first, int64_t count,
                     at::Tensor& scratch) {
  at::Tensor out = at::full({count}, -7.0f);
  checkpoint::read_verified_into(r, c, first, count, static_cast<char*>(out.data_ptr()), scratch);
  return out;
}

}  // namespace

TEST(VerifiedRead, EveryRangeGivesTheFileBytesOnBothPaths) {
  test::TempDir dir;
  // 10 whole blocks and a partial 11th (163 floats = 652 bytes).
  const at::Tensor values = at::arange(163, at::kFloat) * 0.5f;
  const Chunk c = write_chunk(dir.file("x.safetensors"), values);
  SafetensorsReader r(dir.file("x.safetensors"));
  at::Tensor scratch_a, scratch_b;
  // Starts and ends on and off block boundaries (every 16 floats), inside one block, over two
  // partial blocks, whole blocks between partial ends, up to the tensor's partial last block.
  const std::vector<int64_t> points = {0,  1,  5,  15,  16,  17,  31,  32,
                                       33, 47, 48, 100, 159, 160, 162, 163};
  for (int64_t first : points) {
    for (int64_t last : points) {
      if (last <= first) continue;
      const int64_t count = last - first;
      const at::Tensor want = values.narrow(0, first, count);
      EXPECT_TRUE(at::equal(checkpoint::read_verified(r, c, first, count, &scratch_a), want))
          << "scratch path [" << first << ", " << last << ")";
      EXPECT_TRUE(at::equal(read_into(r, c, first, count, scratch_b), want))
          << "direct path [" << first << ", " << last << ")";
    }
  }
}

TEST(VerifiedRead, ADamagedBlockIsNamedOnBothPathsAndOnlyWhereRead) {
  test::TempDir dir;
  const at::Tensor values = at::arange(163, at::kFloat);
  const std::string path = dir.file("x.safetensors");
  const Chunk c = write_chunk(path, values);
  // Flip a byte of float 70 (block 4: bytes 256..320 of the tensor, the file's last bytes).
  const auto data_start = static_cast<int64_t>(std::filesystem::file_size(path)) - 163 * 4;
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(data_start + 70 * 4 + 1);
    f.put('\x5a');
  }
  SafetensorsReader r(path);
  at::Tensor scratch;
  // Ranges that hold float 70 at the start, middle and end, and in a partial edge block.
  for (auto [first, count] : std::vector<std::pair<int64_t, int64_t>>{
           {64, 16}, {50, 60}, {10, 61}, {70, 1}, {65, 30}, {0, 163}}) {
    for (bool direct : {false, true}) {
      try {
        if (direct) {
          read_into(r, c, first, count, scratch);
        } else {
          checkpoint::read_verified(r, c, first, count, &scratch);
        }
        ADD_FAILURE() << "no error for [" << first << ", " << first + count << ")";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find("bytes 256..320 of tensor t fail their CRC-32C"),
                  std::string::npos)
            << e.what();
      }
    }
  }
  // Ranges that never touch block 4 read fine, empty ones at its start too.
  EXPECT_EQ(read_into(r, c, 64, 0, scratch).numel(), 0);
  EXPECT_EQ(checkpoint::read_verified(r, c, 64, 0, &scratch).numel(), 0);
  EXPECT_TRUE(at::equal(read_into(r, c, 0, 64, scratch), values.narrow(0, 0, 64)));
  EXPECT_TRUE(at::equal(read_into(r, c, 80, 83, scratch), values.narrow(0, 80, 83)));
}
