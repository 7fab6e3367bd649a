// safetensors files: what the writer declares and writes the reader gives back (whole, by
// element range, with metadata), block CRCs cover each tensor's bytes, and damaged files are
// reported with their path.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <stdexcept>
#include <string>

#include "support/test_support.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/util/crc32c.h"
#include "titan/util/error.h"

using namespace titan;
using checkpoint::SafetensorsReader;
using checkpoint::SafetensorsWriter;
using checkpoint::TensorInfo;

namespace {

TensorInfo declared(at::ScalarType dtype, std::vector<int64_t> shape) {
  TensorInfo info;
  info.dtype = checkpoint::safetensors_dtype(dtype);
  info.shape = std::move(shape);
  return info;
}

// Writes `tensors` (name, CPU tensor) to `path`; returns the writer's block CRCs.
std::map<std::string, std::vector<uint32_t>> write_tensors(
    const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors) {
  std::vector<std::pair<std::string, TensorInfo>> decl;
  for (const auto& [name, t] : tensors) {
    decl.emplace_back(name, declared(t.scalar_type(), t.sizes().vec()));
  }
  SafetensorsWriter w(path, decl, {{"format", "pt"}, {"note", "unit test"}});
  for (const auto& [name, t] : tensors) w.write(name, t.contiguous());
  EXPECT_EQ(w.close(), static_cast<int64_t>(std::filesystem::file_size(path)));
  return w.block_crcs();
}

}  // namespace

TEST(CheckpointSafetensors, WrittenTensorsReadBackExactly) {
  test::TempDir dir;
  at::manual_seed(0);
  const std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"a.f32", at::randn({3, 5})},
      {"b.bf16", at::randn({7}).to(at::kBFloat16)},
      {"c.i64", at::arange(11, at::kLong)},
      {"d.u8", at::randint(0, 255, {13}, at::kByte)},
      {"e.f16", at::randn({2, 2, 2}).to(at::kHalf)}};
  write_tensors(dir.file("x.safetensors"), tensors);
  SafetensorsReader r(dir.file("x.safetensors"));
  EXPECT_EQ(r.tensors().size(), tensors.size());
  EXPECT_EQ(r.metadata().at("note"), "unit test");
  for (const auto& [name, t] : tensors) {
    ASSERT_TRUE(r.has(name)) << name;
    at::Tensor back = r.read(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(back, t)) << name;
  }
  // Element ranges of the flattened data.
  EXPECT_TRUE(at::equal(r.read_range("a.f32", 4, 6), tensors[0].second.view({-1}).narrow(0, 4, 6)));
  EXPECT_TRUE(at::equal(r.read_range("c.i64", 10, 1), at::full({1}, 10, at::kLong)));
  EXPECT_THROW(r.read_range("c.i64", 5, 7), InternalError);
  EXPECT_THROW(r.info("missing"), Error);
}

TEST(CheckpointSafetensors, DataSectionStartsEightByteAligned) {
  test::TempDir dir;
  write_tensors(dir.file("x.safetensors"), {{"t", at::ones({3})}});
  const std::string bytes = test::read_file(dir.file("x.safetensors"));
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ((8 + header_len) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + header_len + 3 * sizeof(float));
}

TEST(CheckpointSafetensors, BlockCrcsCoverEveryBlockOfEachTensor) {
  test::TempDir dir;
  const int64_t block_floats = checkpoint::kCrcBlockBytes / 4;
  // Two full blocks and a partial third.
  at::Tensor big = at::arange(2 * block_floats + 100, at::kFloat);
  at::Tensor small = at::ones({5});
  auto crcs = write_tensors(dir.file("x.safetensors"), {{"big", big}, {"small", small}});
  ASSERT_EQ(crcs.at("big").size(), 3u);
  ASSERT_EQ(crcs.at("small").size(), 1u);
  const char* p = static_cast<const char*>(big.data_ptr());
  EXPECT_EQ(crcs.at("big")[0], util::crc32c(p, checkpoint::kCrcBlockBytes));
  EXPECT_EQ(crcs.at("big")[1],
            util::crc32c(p + checkpoint::kCrcBlockBytes, checkpoint::kCrcBlockBytes));
  EXPECT_EQ(crcs.at("big")[2], util::crc32c(p + 2 * checkpoint::kCrcBlockBytes, 400));
  EXPECT_EQ(crcs.at("small")[0], util::crc32c(small.data_ptr(), 20));
}

TEST(CheckpointSafetensors, PipelinedChunksWriteTheSameBytesAndCrcsAsWholeTensors) {
  test::TempDir dir;
  at::manual_seed(1);
  const int64_t block_floats = checkpoint::kCrcBlockBytes / 4;
  // Written in one-block chunks: 3 whole chunks and a partial one; a tensor converted to bf16
  // on the way (2 blocks of bf16 per chunk); an empty tensor; one smaller than a block.
  const at::Tensor big = at::randn({3 * block_floats + 123});
  const at::Tensor halved = at::randn({5 * block_floats + 7});
  const at::Tensor empty = at::empty({0});
  const at::Tensor tiny = at::randn({9});
  auto crcs = write_tensors(
      dir.file("whole.safetensors"),
      {{"big", big}, {"halved", halved.to(at::kBFloat16)}, {"empty", empty}, {"tiny", tiny}});
  std::vector<std::pair<std::string, TensorInfo>> decl = {
      {"big", declared(at::kFloat, {big.numel()})},
      {"halved", declared(at::kBFloat16, {halved.numel()})},
      {"empty", declared(at::kFloat, {0})},
      {"tiny", declared(at::kFloat, {9})}};
  // The declared shapes are 1-D here; the whole-tensor file declares the same.
  SafetensorsWriter w(dir.file("chunks.safetensors"), decl,
                      {{"format", "pt"}, {"note", "unit test"}});
  int64_t reported = 0;
  checkpoint::write_pipelined(w,
                              {{"big", big, at::kFloat},
                               {"halved", halved, at::kBFloat16},
                               {"empty", empty, at::kFloat},
                               {"tiny", tiny, at::kFloat}},
                              checkpoint::kCrcBlockBytes, [&](int64_t b) { reported += b; });
  w.close();
  EXPECT_EQ(reported, (big.numel() + 9) * 4 + halved.numel() * 2);
  EXPECT_EQ(w.block_crcs(), crcs);
  EXPECT_EQ(w.block_crcs().at("big").size(), 4u);
  EXPECT_EQ(test::read_file(dir.file("chunks.safetensors")),
            test::read_file(dir.file("whole.safetensors")));

  // Parts must be whole blocks (but for a tensor's last) and fit the tensor; chunks whole
  // blocks; tensors as declared.
  std::vector<char> bytes(checkpoint::kCrcBlockBytes + 64);
  SafetensorsWriter bad(dir.file("bad.safetensors"), decl);
  EXPECT_THROW(bad.write_part("big", bytes.data(), 100), InternalError);
  EXPECT_THROW(bad.write_part("halved", bytes.data(), checkpoint::kCrcBlockBytes), InternalError);
  SafetensorsWriter tiny_only(dir.file("tiny.safetensors"), {{"tiny", declared(at::kFloat, {9})}});
  EXPECT_THROW(tiny_only.write_part("tiny", bytes.data(), 40), InternalError);  // 36 declared
  tiny_only.write_part("tiny", bytes.data(), 36);
  EXPECT_EQ(tiny_only.block_crcs().at("tiny").size(), 1u);
  EXPECT_THROW(
      checkpoint::write_pipelined(bad, {{"big", big, at::kFloat}}, checkpoint::kCrcBlockBytes / 2),
      InternalError);
  EXPECT_THROW(
      checkpoint::write_pipelined(bad, {{"big", big, at::kBFloat16}}, checkpoint::kCrcBlockBytes),
      InternalError);
  EXPECT_THROW(checkpoint::write_pipelined(bad, {{"big", big.narrow(0, 0, 5), at::kFloat}},
                                           checkpoint::kCrcBlockBytes),
               InternalError);
}

TEST(CheckpointSafetensors, PipelinedWriteStopsAtTheFirstFailure) {
  test::TempDir dir;
  const int64_t block_floats = checkpoint::kCrcBlockBytes / 4;
  const at::Tensor a = at::randn({8 * block_floats});
  SafetensorsWriter w(dir.file("x.safetensors"), {{"a", declared(at::kFloat, {a.numel()})}});
  // The writing thread fails on its second chunk while the caller still has chunks to hand
  // over (and may be waiting on a full queue): the failure reaches the caller, and nothing
  // more is written.
  int chunks = 0;
  EXPECT_THROW(checkpoint::write_pipelined(w, {{"a", a, at::kFloat}}, checkpoint::kCrcBlockBytes,
                                           [&](int64_t) {
                                             if (++chunks == 2)
                                               throw std::runtime_error("disk full");
                                           }),
               std::runtime_error);
  EXPECT_EQ(chunks, 2);
  EXPECT_EQ(w.block_crcs().at("a").size(), 2u);
}

TEST(CheckpointSafetensors, WritesThatBreakTheDeclarationAreRejected) {
  test::TempDir dir;
  const std::vector<std::pair<std::string, TensorInfo>> decl = {
      {"first", declared(at::kFloat, {2})}, {"second", declared(at::kFloat, {2})}};
  {
    SafetensorsWriter w(dir.file("order.safetensors"), decl);
    EXPECT_THROW(w.write("second", at::ones({2})), InternalError);
  }
  {
    SafetensorsWriter w(dir.file("size.safetensors"), decl);
    EXPECT_THROW(w.write("first", at::ones({3})), InternalError);
  }
  {
    SafetensorsWriter w(dir.file("dtype.safetensors"), decl);
    EXPECT_THROW(w.write("first", at::ones({2}, at::kDouble)), InternalError);
  }
  {
    SafetensorsWriter w(dir.file("short.safetensors"), decl);
    w.write("first", at::ones({2}));
    EXPECT_THROW(w.close(), InternalError);  // "second" never written
  }
}

TEST(CheckpointSafetensors, TruncatedAndGarbageFilesAreReportedWithTheirPath) {
  test::TempDir dir;
  const std::string path = dir.file("x.safetensors");
  write_tensors(path, {{"t", at::ones({64})}});
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  try {
    SafetensorsReader r(path);
    FAIL() << "a truncated file was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("truncated"), std::string::npos) << e.what();
  }
  test::write_file(path, "not a safetensors file at all");
  try {
    SafetensorsReader r(path);
    FAIL() << "garbage was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
  }
  test::write_file(path, "abc");
  EXPECT_THROW(SafetensorsReader r(path), Error);
  EXPECT_THROW(SafetensorsReader r(dir.file("missing.safetensors")), Error);
}

TEST(CheckpointSafetensors, DtypeNamesRoundTrip) {
  for (auto t : {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble, at::kLong, at::kInt, at::kByte,
                 at::kChar, at::kBool}) {
    EXPECT_EQ(checkpoint::scalar_type_of(checkpoint::safetensors_dtype(t)), t);
  }
  EXPECT_THROW(checkpoint::scalar_type_of("F4"), Error);
}
