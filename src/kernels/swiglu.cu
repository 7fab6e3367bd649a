// Fused SwiGLU gate: g = silu(a) * b over the fused [a | b] projection, and its backward,
// 16-byte vectors, fp32 math; either can take the largest |value| of its output (g, d(ab)) for a
// float8 cast (`amax`: optional, zeroed by the launcher).
#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

using dev::rounded;
using dev::Vec;

__device__ inline float sigmoid(float a) {
  return 1.f / (1.f + __expf(-a));
}

template <typename T>
__global__ void swiglu_fwd(const T* __restrict__ ab, T* __restrict__ g, int64_t rows, int64_t f,
                           float* __restrict__ amax) {
  __shared__ float shared[32];
  constexpr int V = Vec<T>::N;
  float m = 0.f;
  const int64_t per_row = f / V;
  const int64_t total = rows * per_row;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / per_row, c = (t % per_row) * V;
    float a[V], b[V], o[V];
    Vec<T>::load(ab + r * 2 * f + c, a);
    Vec<T>::load(ab + r * 2 * f + f + c, b);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o[k] = a[k] * sigmoid(a[k]) * b[k];
      m = fmaxf(m, fabsf(rounded<T>(o[k])));
    }
    Vec<T>::store(g + r * f + c, o);
  }
  dev::block_amax_into(amax, m, shared);
}

template <typename T>
__global__ void swiglu_bwd(const T* __restrict__ dg, const T* __restrict__ ab, T* __restrict__ dab,
                           int64_t rows, int64_t f, float* __restrict__ amax) {
  __shared__ float shared[32];
  constexpr int V = Vec<T>::N;
  float m = 0.f;
  const int64_t per_row = f / V;
  const int64_t total = rows * per_row;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = t / per_row, c = (t % per_row) * V;
    float a[V], b[V], d[V], da[V], db[V];
    Vec<T>::load(ab + r * 2 * f + c, a);
    Vec<T>::load(ab + r * 2 * f + f + c, b);
    Vec<T>::load(dg + r * f + c, d);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const float s = sigmoid(a[k]);
      da[k] = d[k] * b[k] * s * (1.f + a[k] * (1.f - s));
      db[k] = d[k] * a[k] * s;
      m = fmaxf(m, fmaxf(fabsf(rounded<T>(da[k])), fabsf(rounded<T>(db[k]))));
    }
    Vec<T>::store(dab + r * 2 * f + c, da);
    Vec<T>::store(dab + r * 2 * f + f + c, db);
  }
  dev::block_amax_into(amax, m, shared);
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t want = (total + threads - 1) / threads;
  return static_cast<unsigned>(want < 132 * 64 ? (want > 0 ? want : 1) : 132 * 64);
}

}  // namespace

namespace launch {

void swiglu_forward(DType dt, const void* ab, void* g, int64_t rows, int64_t f, float* amax,
                    cudaStream_t stream) {
  if (amax) cudaMemsetAsync(amax, 0, sizeof(float), stream);
  if (rows * f == 0) return;
  if (dt == DType::BF16) {
    swiglu_fwd<__nv_bfloat16><<<grid_for(rows * f / 8, 256), 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(ab), static_cast<__nv_bfloat16*>(g), rows, f, amax);
  } else {
    swiglu_fwd<float><<<grid_for(rows * f / 4, 256), 256, 0, stream>>>(
        static_cast<const float*>(ab), static_cast<float*>(g), rows, f, amax);
  }
}

void swiglu_backward(DType dt, const void* dg, const void* ab, void* dab, int64_t rows, int64_t f,
                     float* amax, cudaStream_t stream) {
  if (amax) cudaMemsetAsync(amax, 0, sizeof(float), stream);
  if (rows * f == 0) return;
  if (dt == DType::BF16) {
    swiglu_bwd<__nv_bfloat16><<<grid_for(rows * f / 8, 256), 256, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(dg), static_cast<const __nv_bfloat16*>(ab),
        static_cast<__nv_bfloat16*>(dab), rows, f, amax);
  } else {
    swiglu_bwd<float><<<grid_for(rows * f / 4, 256), 256, 0, stream>>>(
        static_cast<const float*>(dg), static_cast<const float*>(ab), static_cast<float*>(dab),
        rows, f, amax);
  }
}

}  // namespace launch
}  // namespace titan::kernels
