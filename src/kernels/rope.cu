// Fused RoPE on interleaved pairs: reads a strided [B, S, H, hd] view (a slice of the fused
// qkv projection, or attention's dq/dk), rotates each pair by +/- its angle in fp32, and writes
// a strided view (a fresh contiguous tensor, or a slice of the fused dqkv gradient).
// 16-byte vectors (4 pairs of bf16, 2 of fp32) when strides and pointers allow.
#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

using dev::Vec;

struct Geometry {
  int64_t xs0, xs1, xs2, os0, os1, os2;
  int64_t s_len, heads, hd;
};

// V elements (V/2 pairs) per thread.
template <typename T>
__global__ void rope_vec_kernel(const T* __restrict__ x, T* __restrict__ out,
                                const float* __restrict__ cosv, const float* __restrict__ sinv,
                                Geometry g, int64_t total_vecs, float sign) {
  constexpr int V = Vec<T>::N;
  const int64_t vecs_per_head = g.hd / V;
  const int64_t half = g.hd / 2;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total_vecs;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t jv = t % vecs_per_head;
    int64_t rest = t / vecs_per_head;
    const int64_t h = rest % g.heads;
    rest /= g.heads;
    const int64_t s = rest % g.s_len;
    const int64_t b = rest / g.s_len;
    float v[V], o[V];
    Vec<T>::load(x + b * g.xs0 + s * g.xs1 + h * g.xs2 + jv * V, v);
    const float* c = cosv + s * half + jv * (V / 2);
    const float* sn = sinv + s * half + jv * (V / 2);
#pragma unroll
    for (int k = 0; k < V / 2; ++k) {
      const float cs = c[k], si = sign * sn[k];
      o[2 * k] = v[2 * k] * cs - v[2 * k + 1] * si;
      o[2 * k + 1] = v[2 * k] * si + v[2 * k + 1] * cs;
    }
    Vec<T>::store(out + b * g.os0 + s * g.os1 + h * g.os2 + jv * V, o);
  }
}

// One pair per thread, any even strides.
template <typename T>
__global__ void rope_pair_kernel(const T* __restrict__ x, T* __restrict__ out,
                                 const float* __restrict__ cosv, const float* __restrict__ sinv,
                                 Geometry g, int64_t total_pairs, float sign) {
  const int64_t half = g.hd / 2;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = p % half;
    int64_t rest = p / half;
    const int64_t h = rest % g.heads;
    rest /= g.heads;
    const int64_t s = rest % g.s_len;
    const int64_t b = rest / g.s_len;
    const T* xp = x + b * g.xs0 + s * g.xs1 + h * g.xs2 + 2 * j;
    const float a0 = dev::to_float(xp[0]), a1 = dev::to_float(xp[1]);
    const float cs = cosv[s * half + j], si = sign * sinv[s * half + j];
    T* op = out + b * g.os0 + s * g.os1 + h * g.os2 + 2 * j;
    op[0] = dev::from_float<T>(a0 * cs - a1 * si);
    op[1] = dev::from_float<T>(a0 * si + a1 * cs);
  }
}

unsigned grid_for(int64_t work) {
  const int64_t want = (work + 255) / 256;
  return static_cast<unsigned>(want < 132 * 32 ? (want > 0 ? want : 1) : 132 * 32);
}

template <typename T>
void run(const void* x, void* out, const float* cos, const float* sin, const Geometry& g, int64_t b,
         bool inverse, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  const float sign = inverse ? -1.f : 1.f;
  const bool vec_ok = g.hd % V == 0 && g.xs0 % V == 0 && g.xs1 % V == 0 && g.xs2 % V == 0 &&
                      g.os0 % V == 0 && g.os1 % V == 0 && g.os2 % V == 0 &&
                      reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                      reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t elements = b * g.s_len * g.heads * g.hd;
  if (vec_ok) {
    rope_vec_kernel<T><<<grid_for(elements / V), 256, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(out), cos, sin, g, elements / V, sign);
  } else {
    rope_pair_kernel<T><<<grid_for(elements / 2), 256, 0, stream>>>(
        static_cast<const T*>(x), static_cast<T*>(out), cos, sin, g, elements / 2, sign);
  }
}

}  // namespace

namespace launch {

void rope(DType dt, const void* x, const int64_t* xs, void* out, const int64_t* os,
          const float* cos, const float* sin, int64_t b, int64_t s, int64_t h, int64_t hd,
          bool inverse, cudaStream_t stream) {
  if (b * s * h * hd == 0) return;
  Geometry g{xs[0], xs[1], xs[2], os[0], os[1], os[2], s, h, hd};
  if (dt == DType::BF16) {
    run<__nv_bfloat16>(x, out, cos, sin, g, b, inverse, stream);
  } else {
    run<float>(x, out, cos, sin, g, b, inverse, stream);
  }
}

}  // namespace launch
}  // namespace titan::kernels
