// RoPE tables and rotation: ATen reference and dispatch to the fused CUDA kernel.
#include "titan/ops/rope.h"

#include <ATen/ATen.h>

#include <cmath>

#include "titan/ops/dispatch.h"
#ifdef TITAN_WITH_CUDA
#include "titan/kernels/kernels.h"
#endif

namespace titan::ops {

std::tuple<at::Tensor, at::Tensor> rope_tables(const model::LlamaArgs& args, int64_t seq_len,
                                               const at::TensorOptions& options) {
  const int64_t hd = args.head_dim();
  auto cpu64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor idx = at::arange(0, hd, 2, cpu64);
  at::Tensor inv_freq = at::pow(args.rope_theta, -idx / static_cast<double>(hd));
  if (args.rope_scaling_factor > 0) {
    // Llama 3.1: long wavelengths are divided by the factor, short ones kept, with a smooth
    // blend between low_freq_factor and high_freq_factor.
    const double factor = args.rope_scaling_factor;
    const double old_len = static_cast<double>(args.rope_original_max_positions);
    const double low_wavelen = old_len / args.rope_low_freq_factor;
    const double high_wavelen = old_len / args.rope_high_freq_factor;
    auto acc = inv_freq.accessor<double, 1>();
    for (int64_t i = 0; i < inv_freq.size(0); ++i) {
      const double f = acc[i];
      const double wavelen = 2 * M_PI / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        acc[i] = f / factor;
      } else {
        const double smooth = (old_len / wavelen - args.rope_low_freq_factor) /
                              (args.rope_high_freq_factor - args.rope_low_freq_factor);
        acc[i] = (1 - smooth) * f / factor + smooth * f;
      }
    }
  }
  at::Tensor t = at::arange(seq_len, cpu64);
  at::Tensor angles = at::outer(t, inv_freq);
  auto out = options.dtype(at::kFloat);
  return {at::cos(angles).to(out), at::sin(angles).to(out)};
}

at::Tensor rope_apply_ref(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          bool inverse) {
  const auto sizes = x.sizes();  // B, S, H, hd
  at::Tensor xf = x.to(at::kFloat).reshape({sizes[0], sizes[1], sizes[2], sizes[3] / 2, 2});
  at::Tensor x0 = xf.select(-1, 0);
  at::Tensor x1 = xf.select(-1, 1);
  const int64_t s = sizes[1];
  at::Tensor c = cos.narrow(0, 0, s).view({1, s, 1, -1});
  at::Tensor sn = sin.narrow(0, 0, s).view({1, s, 1, -1});
  if (inverse) sn = -sn;
  at::Tensor o0 = x0 * c - x1 * sn;
  at::Tensor o1 = x0 * sn + x1 * c;
  return at::stack({o0, o1}, -1).reshape(sizes).to(x.scalar_type());
}

void rope_apply_out(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool inverse,
                    const at::Tensor& out) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(x)) {
    kernels::rope_apply_out(x, cos, sin, inverse, out);
    return;
  }
#endif
  out.copy_(rope_apply_ref(x, cos, sin, inverse));
}

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                      bool inverse) {
#ifdef TITAN_WITH_CUDA
  if (use_fused(x)) return kernels::rope_apply(x, cos, sin, inverse);
#endif
  return rope_apply_ref(x, cos, sin, inverse);
}

}  // namespace titan::ops
