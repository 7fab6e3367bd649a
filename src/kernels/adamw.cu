// Fused AdamW / Adam update over one flat fp32 tensor: reads the gradient (divided by the
// clip divisor, a device scalar), updates both moments and the parameter, and writes the bf16
// compute copy of the parameter in the same pass. Hyper-parameters come from device memory so
// the kernel can sit inside a CUDA graph while the learning rate changes every step.
// Memory-bound (30 bytes per element with the bf16 copy), with streaming (evict-first) cache
// hints since nothing is reused. It can take the largest |value| of the weights it writes (the
// bf16 copy's where it writes one): the amax of a float8 weight's tensorwise scale.
#include <cuda_bf16.h>

#include "common.cuh"
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

// hyper: lr, beta1, beta2, eps, weight_decay, step_size (lr / bc1), 1 / sqrt(bc2)
__device__ __forceinline__ Hyper hyper_of(const float* hyper, const float* divisor,
                                          bool decoupled) {
  return Hyper{hyper[0], hyper[1], hyper[2], hyper[3],
               hyper[4], hyper[5], hyper[6], divisor ? 1.f / divisor[0] : 1.f,
               decoupled};
}

// |p| as written: the bf16 copy's value where there is one.
__device__ __forceinline__ float written(float p, const __nv_bfloat16* shadow) {
  return fabsf(shadow ? __bfloat162float(__float2bfloat16_rn(p)) : p);
}

// One float4 of each tensor per thread and no loop: 4.25 TB/s on an H200, the device-to-device
// copy's rate, against 3.55-3.9 TB/s for grid-stride loops of 1-8 elements per thread
// (scripts/membench.cu). Threads past n / 4 take the tail's elements, one each. With `amax`
// (zeroed by the launcher), the largest |value| written.
__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g,
                             float* __restrict__ m, float* __restrict__ v,
                             __nv_bfloat16* __restrict__ shadow, int64_t n,
                             const float* __restrict__ hyper, const float* __restrict__ divisor,
                             bool decoupled, float* __restrict__ amax) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n4 = n / 4;
  const int64_t tail = n - 4 * n4;
  float largest = 0.f;
  if (i < n4) {
    const Hyper h = hyper_of(hyper, divisor, decoupled);
    float4* p4 = reinterpret_cast<float4*>(p) + i;
    float4* m4 = reinterpret_cast<float4*>(m) + i;
    float4* v4 = reinterpret_cast<float4*>(v) + i;
    float4 pp = __ldcs(p4);
    const float4 gg = __ldcs(reinterpret_cast<const float4*>(g) + i);
    float4 mm = __ldcs(m4);
    float4 vv = __ldcs(v4);
    adam_update(h, pp.x, gg.x, mm.x, vv.x);
    adam_update(h, pp.y, gg.y, mm.y, vv.y);
    adam_update(h, pp.z, gg.z, mm.z, vv.z);
    adam_update(h, pp.w, gg.w, mm.w, vv.w);
    __stcs(p4, pp);
    __stcs(m4, mm);
    __stcs(v4, vv);
    if (shadow) {
      uint2 packed;
      *reinterpret_cast<__nv_bfloat162*>(&packed.x) = __floats2bfloat162_rn(pp.x, pp.y);
      *reinterpret_cast<__nv_bfloat162*>(&packed.y) = __floats2bfloat162_rn(pp.z, pp.w);
      __stcs(reinterpret_cast<uint2*>(shadow) + i, packed);
    }
    if (amax) {
      // fmaxf drops NaN, as the separate max pass does.
      largest = fmaxf(fmaxf(largest, fmaxf(written(pp.x, shadow), written(pp.y, shadow))),
                      fmaxf(written(pp.z, shadow), written(pp.w, shadow)));
    }
  } else if (i < n4 + tail) {
    const Hyper h = hyper_of(hyper, divisor, decoupled);
    const int64_t j = 4 * n4 + (i - n4);
    float pj = p[j], mj = m[j], vj = v[j];
    adam_update(h, pj, g[j], mj, vj);
    p[j] = pj;
    m[j] = mj;
    v[j] = vj;
    if (shadow) shadow[j] = __float2bfloat16_rn(pj);
    largest = fmaxf(largest, written(pj, shadow));
  }
  // Every thread of the block takes part (none has returned).
  __shared__ float shared[32];
  dev::block_amax_into(amax, largest, shared);
}

}  // namespace

namespace launch {

void adamw(float* p, const float* g, float* m, float* v, void* shadow_bf16, int64_t n,
           const float* hyper, const float* divisor, bool decoupled, float* amax,
           cudaStream_t stream) {
  if (amax) cudaMemsetAsync(amax, 0, sizeof(float), stream);
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n / 4 + n % 4 + threads - 1) / threads;
  adamw_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      p, g, m, v, static_cast<__nv_bfloat16*>(shadow_bf16), n, hyper, divisor, decoupled, amax);
}

}  // namespace launch
}  // namespace titan::kernels
