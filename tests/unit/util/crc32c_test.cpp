// CRC-32C: the hardware path (three interleaved streams joined by zero-byte maps) equals a
// bit-at-a-time reference for every length around its lane boundaries, any alignment, and any
// split of the data into extend() calls.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "titan/util/crc32c.h"

namespace {

uint32_t reference(uint32_t crc, const unsigned char* p, size_t n) {
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) {
    c ^= p[i];
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
  }
  return ~c;
}

}  // namespace

TEST(Crc32c, KnownValue) {
  const std::string s = "123456789";
  EXPECT_EQ(titan::util::crc32c(s.data(), s.size()), 0xE3069283u);
  EXPECT_EQ(titan::util::crc32c(nullptr, 0), 0u);
}

TEST(Crc32c, EqualsTheBitwiseReferenceAtEveryLaneBoundary) {
  std::mt19937 rng(7);
  std::vector<unsigned char> data(3 * 8192 * 2 + 3 * 256 * 3 + 64);
  for (auto& b : data) b = static_cast<unsigned char>(rng());
  std::vector<size_t> lengths;
  for (size_t n = 0; n < 80; ++n) lengths.push_back(n);
  for (size_t base :
       {size_t{3 * 256}, size_t{3 * 8192}, size_t{2 * 3 * 8192}, size_t{3 * 8192 + 3 * 256}}) {
    for (size_t d : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{9}}) {
      lengths.push_back(base + d);
      lengths.push_back(base - d - 1);
    }
  }
  lengths.push_back(data.size() - 8);
  for (size_t n : lengths) {
    for (size_t offset : {size_t{0}, size_t{1}, size_t{5}}) {
      ASSERT_LE(offset + n, data.size());
      const unsigned char* p = data.data() + offset;
      const uint32_t start = static_cast<uint32_t>(rng());
      EXPECT_EQ(titan::util::crc32c_extend(start, p, n), reference(start, p, n))
          << n << " bytes at offset " << offset;
    }
  }
  // Extending piece by piece equals one call.
  const uint32_t whole = titan::util::crc32c(data.data(), data.size());
  uint32_t pieces = 0;
  for (size_t at = 0; at < data.size();) {
    const size_t n = std::min<size_t>(data.size() - at, 1 + rng() % 30000);
    pieces = titan::util::crc32c_extend(pieces, data.data() + at, n);
    at += n;
  }
  EXPECT_EQ(pieces, whole);
  EXPECT_EQ(whole, reference(0, data.data(), data.size()));
}
