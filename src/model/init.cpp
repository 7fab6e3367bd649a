// Counter-based initialization (splitmix64 of the element index, inverse-CDF normals).
#include "titan/model/init.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "titan/util/parallel.h"

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

namespace {

uint64_t param_key(const ParamSlot& p, int64_t seed) {
  return fnv1a(p.name, fnv1a(std::to_string(seed)));
}

// The (truncated) normal's CDF at its bounds: uniforms are mapped into [lo, hi] before the
// inverse CDF.
std::pair<double, double> cdf_bounds(const InitSpec& init) {
  if (init.kind != InitKind::TruncNormal) return {0.0, 1.0};
  return {normal_cdf(init.lower / init.std), normal_cdf(init.upper / init.std)};
}

// The argument of erfinv for one element, as the tensor ops below compute it (the same IEEE
// operations in the same order).
double erfinv_argument(uint64_t index, uint64_t key, double lo_cdf, double hi_cdf) {
  uint64_t x = index * 0x9E3779B97F4A7C15ULL + key;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  x = x ^ (x >> 31);
  const double u = (static_cast<double>(x >> 11) + 0.5) * (1.0 / 9007199254740992.0);
  const double up = u * (hi_cdf - lo_cdf) + lo_cdf;
  return up * 2.0 - 1.0;
}

// Host memory: one pass per element on all intra-op threads (the tensor ops run about fifteen
// passes over int64/double temporaries: ~11M elements/s on one core).
template <typename T>
void init_range_on_host(const UnitLayout& unit, int64_t seed, int64_t flat_begin, T* out,
                        int64_t n) {
  std::fill(out, out + n, T(0));
  for (const auto& p : unit.params) {
    const int64_t lo = std::max(flat_begin, p.offset);
    const int64_t hi = std::min(flat_begin + n, p.offset + p.numel);
    if (lo >= hi) continue;
    T* dst = out + (lo - flat_begin);
    if (p.init.kind == InitKind::Ones) {
      std::fill(dst, dst + (hi - lo), T(1));
      continue;
    }
    const uint64_t key = param_key(p, seed);
    const auto [lo_cdf, hi_cdf] = cdf_bounds(p.init);
    // Local index -> index in the whole parameter (a tensor-parallel part draws its values).
    const ParamSlot::IndexMap global_index = p.index_map();
    const double scale = std::sqrt(2.0) * p.init.std;
    const bool clamp = p.init.kind == InitKind::TruncNormal;
    const int64_t first = lo - p.offset;
    util::parallel_range(hi - lo, int64_t(1) << 14, [&](int64_t b0, int64_t e0, int) {
      const int64_t b = first + b0, e = first + e0;
      // erfinv through ATen, a block at a time: its CPU kernel is built per instruction set
      // (with fused multiply-adds where the CPU has them), and the values must be its values.
      constexpr int64_t kBlock = 4096;
      double arg[kBlock];
      for (int64_t start = b; start < e; start += kBlock) {
        const int64_t len = std::min(kBlock, e - start);
        for (int64_t k = 0; k < len; ++k) {
          const auto global = static_cast<uint64_t>(global_index(start + k));
          arg[k] = erfinv_argument(global, key, lo_cdf, hi_cdf);
        }
        at::Tensor block = at::from_blob(arg, {len}, at::dtype(at::kDouble));
        at::erfinv_out(block, block);
        T* to = dst + (start - (lo - p.offset));
        for (int64_t k = 0; k < len; ++k) {
          double z = arg[k] * scale;
          if (clamp) z = std::min(std::max(z, p.init.lower), p.init.upper);
          to[k] = static_cast<T>(z);
        }
      }
    });
  }
}

}  // namespace

void init_unit_range_with_tensor_ops(const UnitLayout& unit, int64_t seed, int64_t flat_begin,
                                     at::Tensor out) {
  const int64_t n = out.numel();
  const int64_t flat_end = flat_begin + n;
  out.zero_();
  constexpr int64_t kChunk = int64_t(1) << 24;  // bounds the int64/double temporaries
  for (const auto& p : unit.params) {
    const int64_t lo = std::max(flat_begin, p.offset);
    const int64_t hi = std::min(flat_end, p.offset + p.numel);
    if (lo >= hi) continue;
    const uint64_t key = param_key(p, seed);
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
      const auto [lo_cdf, hi_cdf] = cdf_bounds(p.init);
      // Inverse CDF of the (truncated) normal: z = sqrt(2) erfinv(2u' - 1).
      at::Tensor up = u * (hi_cdf - lo_cdf) + lo_cdf;
      at::Tensor z = at::erfinv(up * 2.0 - 1.0) * (std::sqrt(2.0) * p.init.std);
      if (p.init.kind == InitKind::TruncNormal) z.clamp_(p.init.lower, p.init.upper);
      dst.copy_(z);
    }
  }
}

void init_unit_range(const UnitLayout& unit, int64_t seed, int64_t flat_begin, at::Tensor out) {
  if (out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kFloat) {
    init_range_on_host(unit, seed, flat_begin, out.data_ptr<float>(), out.numel());
  } else if (out.device().is_cpu() && out.is_contiguous() && out.scalar_type() == at::kDouble) {
    init_range_on_host(unit, seed, flat_begin, out.data_ptr<double>(), out.numel());
  } else {
    init_unit_range_with_tensor_ops(unit, seed, flat_begin, out);
  }
}

}  // namespace titan::model
