// Counter-based initialization (splitmix64 of the element index, inverse-CDF normals).
#include "titan/model/init.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

namespace titan::model {
namespace {

constexpr int64_t as_signed(uint64_t v) {
  return static_cast<int64_t>(v);
}

// Logical right shift on int64 tensors (ATen's shift is arithmetic).
at::Tensor shr(const at::Tensor& x, int s) {
  const int64_t mask = as_signed((~uint64_t(0)) >> s);
  return at::bitwise_and(at::bitwise_right_shift(x, s), mask);
}

uint64_t fnv1a(const std::string& s, uint64_t h = 1469598103934665603ULL) {
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ULL;
  }
  return h;
}

double normal_cdf(double x) {
  return 0.5 * std::erfc(-x / std::sqrt(2.0));
}

}  // namespace

at::Tensor hashed_uniform(const at::Tensor& counters, uint64_t key) {
  // splitmix64(counter * golden + key): 64 well-mixed bits per element; wrapping int64
  // arithmetic behaves the same on every ATen backend.
  at::Tensor x = counters * as_signed(0x9E3779B97F4A7C15ULL) + as_signed(key);
  x = at::bitwise_xor(x, shr(x, 30)) * as_signed(0xBF58476D1CE4E5B9ULL);
  x = at::bitwise_xor(x, shr(x, 27)) * as_signed(0x94D049BB133111EBULL);
  x = at::bitwise_xor(x, shr(x, 31));
  // Top 53 bits -> a double strictly inside (0, 1).
  at::Tensor mant = shr(x, 11).to(at::kDouble);
  return (mant + 0.5) * (1.0 / 9007199254740992.0);
}

void init_unit_range(const UnitLayout& unit, int64_t seed, int64_t flat_begin, at::Tensor out) {
  const int64_t n = out.numel();
  const int64_t flat_end = flat_begin + n;
  out.zero_();
  constexpr int64_t kChunk = int64_t(1) << 24;  // bounds the int64/double temporaries
  for (const auto& p : unit.params) {
    const int64_t lo = std::max(flat_begin, p.offset);
    const int64_t hi = std::min(flat_end, p.offset + p.numel);
    if (lo >= hi) continue;
    const uint64_t key = fnv1a(p.name, fnv1a(std::to_string(seed)));
    for (int64_t start = lo; start < hi; start += kChunk) {
      const int64_t len = std::min(kChunk, hi - start);
      at::Tensor dst = out.narrow(0, start - flat_begin, len);
      if (p.init.kind == InitKind::Ones) {
        dst.fill_(1.0);
        continue;
      }
      // Indices into the whole parameter: a tensor-parallel part draws the values the whole
      // parameter has there.
      at::Tensor idx = p.global_index(
          at::arange(start - p.offset, start - p.offset + len, out.options().dtype(at::kLong)));
      at::Tensor u = hashed_uniform(idx, key);
      double lo_cdf = 0.0, hi_cdf = 1.0;
      if (p.init.kind == InitKind::TruncNormal) {
        lo_cdf = normal_cdf(p.init.lower / p.init.std);
        hi_cdf = normal_cdf(p.init.upper / p.init.std);
      }
      // Inverse CDF of the (truncated) normal: z = sqrt(2) erfinv(2u' - 1).
      at::Tensor up = u * (hi_cdf - lo_cdf) + lo_cdf;
      at::Tensor z = at::erfinv(up * 2.0 - 1.0) * (std::sqrt(2.0) * p.init.std);
      if (p.init.kind == InitKind::TruncNormal) z.clamp_(p.init.lower, p.init.upper);
      dst.copy_(z);
    }
  }
}

}  // namespace titan::model
