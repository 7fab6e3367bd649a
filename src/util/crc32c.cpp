// CRC-32C: SSE4.2 hardware path (three interleaved streams) with a table fallback.
#include "titan/util/crc32c.h"

#include <array>
#include <cstring>

#if defined(__x86_64__)
#include <cpuid.h>
#include <nmmintrin.h>
#endif

namespace titan::util {
namespace {

std::array<uint32_t, 256> make_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}

uint32_t extend_table(uint32_t crc, const unsigned char* p, size_t n) {
  static const auto table = make_table();
  uint32_t c = ~crc;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return ~c;
}

#if defined(__x86_64__)
// The crc32 instruction takes 3 cycles and issues one per cycle: one stream of data runs at a
// third of its rate. Three streams of `Lane` bytes run side by side, and their registers are
// joined by the register's linearity: the register after data D from state R is the register
// after len(D) zero bytes from R, xor the register after D from 0. Appending zero bytes is a
// linear map of the 32-bit register, kept as four tables of 256 entries (one per byte).
struct ZeroBytes {
  std::array<std::array<uint32_t, 256>, 4> table{};

  // The map of the register for `bytes` zero bytes (a power of two).
  explicit ZeroBytes(size_t bytes) {
    // A GF(2) 32x32 matrix as its columns: the image of each register bit.
    using Matrix = std::array<uint32_t, 32>;
    auto apply = [](const Matrix& m, uint32_t v) {
      uint32_t out = 0;
      for (int i = 0; v != 0; ++i, v >>= 1) {
        if (v & 1) out ^= m[static_cast<size_t>(i)];
      }
      return out;
    };
    Matrix op{};  // one zero bit, for the reflected polynomial
    op[0] = 0x82F63B78u;
    for (size_t i = 1; i < 32; ++i) op[i] = 1u << (i - 1);
    for (size_t bits = 1; bits < 8 * bytes; bits *= 2) {
      Matrix squared{};
      for (size_t i = 0; i < 32; ++i) squared[i] = apply(op, op[i]);
      op = squared;
    }
    for (size_t k = 0; k < 4; ++k) {
      for (uint32_t v = 0; v < 256; ++v) table[k][v] = apply(op, v << (8 * k));
    }
  }

  uint32_t operator()(uint32_t r) const {
    return table[0][r & 0xFF] ^ table[1][(r >> 8) & 0xFF] ^ table[2][(r >> 16) & 0xFF] ^
           table[3][r >> 24];
  }
};

template <size_t Lane>
__attribute__((target("sse4.2"))) inline uint64_t three_lanes(uint64_t c, const ZeroBytes& zeros,
                                                              const unsigned char*& p, size_t& n) {
  while (n >= 3 * Lane) {
    uint64_t c1 = 0, c2 = 0;
    for (size_t i = 0; i < Lane; i += 8) {
      uint64_t a, b, d;
      std::memcpy(&a, p + i, 8);
      std::memcpy(&b, p + Lane + i, 8);
      std::memcpy(&d, p + 2 * Lane + i, 8);
      c = _mm_crc32_u64(c, a);
      c1 = _mm_crc32_u64(c1, b);
      c2 = _mm_crc32_u64(c2, d);
    }
    c = zeros(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c1);
    c = zeros(static_cast<uint32_t>(c)) ^ static_cast<uint32_t>(c2);
    p += 3 * Lane;
    n -= 3 * Lane;
  }
  return c;
}

__attribute__((target("sse4.2"))) uint32_t extend_hw(uint32_t crc, const unsigned char* p,
                                                     size_t n) {
  constexpr size_t kLong = 8192, kShort = 256;
  static const ZeroBytes long_zeros(kLong), short_zeros(kShort);
  uint64_t c = ~crc;
  c = three_lanes<kLong>(c, long_zeros, p, n);
  c = three_lanes<kShort>(c, short_zeros, p, n);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

bool have_sse42() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  return (c & bit_SSE4_2) != 0;
}
#endif

}  // namespace

uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
#if defined(__x86_64__)
  static const bool hw = have_sse42();
  if (hw) return extend_hw(crc, p, n);
#endif
  return extend_table(crc, p, n);
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

}  // namespace titan::util
