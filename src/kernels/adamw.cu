// Fused AdamW / Adam update over one flat fp32 tensor: reads the gradient (divided by the
// clip divisor, a device scalar), updates both moments and the parameter, and writes the bf16
// compute copy of the parameter in the same pass. Hyper-parameters come from device memory so
// the kernel can sit inside a CUDA graph while the learning rate changes every step.
#include <cuda_bf16.h>

#include "launchers.h"

namespace titan::kernels {
namespace {

__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g,
                             float* __restrict__ m, float* __restrict__ v,
                             __nv_bfloat16* __restrict__ shadow, int64_t n,
                             const float* __restrict__ hyper, const float* __restrict__ divisor,
                             bool decoupled) {
  // hyper: lr, beta1, beta2, eps, weight_decay, step_size (lr / bc1), 1 / sqrt(bc2)
  const float lr = hyper[0], b1 = hyper[1], b2 = hyper[2], eps = hyper[3], wd = hyper[4];
  const float step_size = hyper[5], inv_bc2_sqrt = hyper[6];
  const float inv_div = divisor ? 1.f / divisor[0] : 1.f;
  const int64_t n4 = n / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n4;
       i += stride) {
    float4 pp = reinterpret_cast<float4*>(p)[i];
    const float4 gg = reinterpret_cast<const float4*>(g)[i];
    float4 mm = reinterpret_cast<float4*>(m)[i];
    float4 vv = reinterpret_cast<float4*>(v)[i];
    float* pa = &pp.x;
    const float* ga = &gg.x;
    float* ma = &mm.x;
    float* va = &vv.x;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float gr = ga[k] * inv_div;
      if (!decoupled) gr += wd * pa[k];
      ma[k] = b1 * ma[k] + (1.f - b1) * gr;
      va[k] = b2 * va[k] + (1.f - b2) * gr * gr;
      if (decoupled) pa[k] *= 1.f - lr * wd;
      pa[k] -= step_size * ma[k] / (sqrtf(va[k]) * inv_bc2_sqrt + eps);
    }
    reinterpret_cast<float4*>(p)[i] = pp;
    reinterpret_cast<float4*>(m)[i] = mm;
    reinterpret_cast<float4*>(v)[i] = vv;
    if (shadow) {
      __nv_bfloat162 lo = __floats2bfloat162_rn(pp.x, pp.y);
      __nv_bfloat162 hi = __floats2bfloat162_rn(pp.z, pp.w);
      reinterpret_cast<__nv_bfloat162*>(shadow)[2 * i] = lo;
      reinterpret_cast<__nv_bfloat162*>(shadow)[2 * i + 1] = hi;
    }
  }
  // Tail (n not a multiple of 4).
  for (int64_t i = n4 * 4 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float gr = g[i] * inv_div;
    if (!decoupled) gr += wd * p[i];
    m[i] = b1 * m[i] + (1.f - b1) * gr;
    v[i] = b2 * v[i] + (1.f - b2) * gr * gr;
    if (decoupled) p[i] *= 1.f - lr * wd;
    p[i] -= step_size * m[i] / (sqrtf(v[i]) * inv_bc2_sqrt + eps);
    if (shadow) shadow[i] = __float2bfloat16_rn(p[i]);
  }
}

}  // namespace

namespace launch {

void adamw(float* p, const float* g, float* m, float* v, void* shadow_bf16, int64_t n,
           const float* hyper, const float* divisor, bool decoupled, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  int64_t blocks = (n / 4 + threads - 1) / threads;
  if (blocks > 132 * 16) blocks = 132 * 16;
  if (blocks < 1) blocks = 1;
  adamw_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      p, g, m, v, static_cast<__nv_bfloat16*>(shadow_bf16), n, hyper, divisor, decoupled);
}

}  // namespace launch
}  // namespace titan::kernels
