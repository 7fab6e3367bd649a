// Fused AdamW / Adam update over one flat fp32 tensor: reads the gradient (divided by the
// clip divisor, a device scalar), updates both moments and the parameter, and writes the bf16
// compute copy of the parameter in the same pass. Hyper-parameters come from device memory so
// the kernel can sit inside a CUDA graph while the learning rate changes every step.
// Memory-bound (30 bytes per element with the bf16 copy): each thread handles 8 consecutive
// elements per iteration, issuing all seven 16-byte loads before any arithmetic, with
// streaming (evict-first) cache hints since nothing is reused.
#include <cuda_bf16.h>

#include "launchers.h"

namespace titan::kernels {
namespace {

struct Hyper {
  float lr, b1, b2, eps, wd, step_size, inv_bc2_sqrt, inv_div;
  bool decoupled;
};

__device__ __forceinline__ void adam_update(const Hyper& h, float& p, float g, float& m, float& v) {
  float gr = g * h.inv_div;
  if (!h.decoupled) gr += h.wd * p;
  m = h.b1 * m + (1.f - h.b1) * gr;
  v = h.b2 * v + (1.f - h.b2) * gr * gr;
  if (h.decoupled) p *= 1.f - h.lr * h.wd;
  p -= h.step_size * m / (sqrtf(v) * h.inv_bc2_sqrt + h.eps);
}

__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g,
                             float* __restrict__ m, float* __restrict__ v,
                             __nv_bfloat16* __restrict__ shadow, int64_t n,
                             const float* __restrict__ hyper, const float* __restrict__ divisor,
                             bool decoupled) {
  // hyper: lr, beta1, beta2, eps, weight_decay, step_size (lr / bc1), 1 / sqrt(bc2)
  Hyper h{hyper[0], hyper[1], hyper[2], hyper[3],
          hyper[4], hyper[5], hyper[6], divisor ? 1.f / divisor[0] : 1.f,
          decoupled};
  const int64_t n8 = n / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  float4* p4 = reinterpret_cast<float4*>(p);
  const float4* g4 = reinterpret_cast<const float4*>(g);
  float4* m4 = reinterpret_cast<float4*>(m);
  float4* v4 = reinterpret_cast<float4*>(v);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n8;
       i += stride) {
    float4 pp[2] = {__ldcs(p4 + 2 * i), __ldcs(p4 + 2 * i + 1)};
    const float4 gg[2] = {__ldcs(g4 + 2 * i), __ldcs(g4 + 2 * i + 1)};
    float4 mm[2] = {__ldcs(m4 + 2 * i), __ldcs(m4 + 2 * i + 1)};
    float4 vv[2] = {__ldcs(v4 + 2 * i), __ldcs(v4 + 2 * i + 1)};
    float* pa = &pp[0].x;
    const float* ga = &gg[0].x;
    float* ma = &mm[0].x;
    float* va = &vv[0].x;
#pragma unroll
    for (int k = 0; k < 8; ++k) adam_update(h, pa[k], ga[k], ma[k], va[k]);
    __stcs(p4 + 2 * i, pp[0]);
    __stcs(p4 + 2 * i + 1, pp[1]);
    __stcs(m4 + 2 * i, mm[0]);
    __stcs(m4 + 2 * i + 1, mm[1]);
    __stcs(v4 + 2 * i, vv[0]);
    __stcs(v4 + 2 * i + 1, vv[1]);
    if (shadow) {
      uint4 packed;
      __nv_bfloat162* b = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int k = 0; k < 4; ++k) b[k] = __floats2bfloat162_rn(pa[2 * k], pa[2 * k + 1]);
      __stcs(reinterpret_cast<uint4*>(shadow) + i, packed);
    }
  }
  // Tail (n not a multiple of 8).
  for (int64_t i = n8 * 8 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    float pi = p[i], mi = m[i], vi = v[i];
    adam_update(h, pi, g[i], mi, vi);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if (shadow) shadow[i] = __float2bfloat16_rn(pi);
  }
}

int resident_blocks(int threads) {
  static const int sms = [] {
    int dev = 0, count = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev);
    return count > 0 ? count : 132;
  }();
  return sms * (2048 / threads);
}

}  // namespace

namespace launch {

void adamw(float* p, const float* g, float* m, float* v, void* shadow_bf16, int64_t n,
           const float* hyper, const float* divisor, bool decoupled, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  int64_t blocks = (n / 8 + threads - 1) / threads;
  if (blocks > resident_blocks(threads)) blocks = resident_blocks(threads);
  if (blocks < 1) blocks = 1;
  adamw_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      p, g, m, v, static_cast<__nv_bfloat16*>(shadow_bf16), n, hyper, divisor, decoupled);
}

}  // namespace launch
}  // namespace titan::kernels
