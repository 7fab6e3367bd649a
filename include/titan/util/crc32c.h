// CRC-32C (Castagnoli): checkpoint checksums and TensorBoard's TFRecord framing. Uses the
// SSE4.2 instruction where the CPU has it (about 10x the table version).
#pragma once

#include <cstddef>
#include <cstdint>

namespace titan::util {

// Extends `crc` (start with 0) over `n` bytes.
uint32_t crc32c_extend(uint32_t crc, const void* data, size_t n);
inline uint32_t crc32c(const void* data, size_t n) {
  return crc32c_extend(0, data, n);
}
// TFRecord's masked form.
uint32_t masked_crc32c(const void* data, size_t n);

}  // namespace titan::util
