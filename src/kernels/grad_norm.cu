// Sum of squares of fp32 tensors (the global gradient norm before clipping). One launch per
// tensor; each block reduces a fixed chunk into one fp64 partial, so the result does not
// depend on scheduling (deterministic, unlike atomics) and stays accurate for billions of
// elements. The partials are summed afterwards by the caller.
#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 262144;  // elements per block (1 MiB of fp32)
constexpr int kUnroll = 4;

__device__ inline double block_sum_double(double v, double* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? shared[lane] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  }
  return v;
}

__global__ void sum_squares_kernel(const float* __restrict__ x, int64_t n,
                                   double* __restrict__ partials) {
  __shared__ double shared[kThreads / 32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t end = begin + kChunk < n ? begin + kChunk : n;
  // x is 16-byte aligned and kChunk a multiple of 4, so every block's float4 range is aligned.
  const float4* x4 = reinterpret_cast<const float4*>(x);
  const int64_t b4 = begin / 4, e4 = end / 4;
  float acc[kUnroll] = {};
  double total = 0.0;
  int64_t i = b4 + threadIdx.x;
  for (; i + (kUnroll - 1) * kThreads < e4; i += kUnroll * kThreads) {
    float4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = __ldcs(x4 + i + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc[u] += v[u].x * v[u].x + v[u].y * v[u].y + v[u].z * v[u].z + v[u].w * v[u].w;
    }
  }
  for (; i < e4; i += kThreads) {
    const float4 v = __ldcs(x4 + i);
    acc[0] += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  for (int64_t j = e4 * 4 + threadIdx.x; j < end; j += kThreads) acc[0] += x[j] * x[j];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) total += acc[u];
  total = block_sum_double(total, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

}  // namespace

namespace launch {

int64_t sum_squares_blocks(int64_t n) {
  return (n + kChunk - 1) / kChunk;
}

void sum_squares(const float* x, int64_t n, double* partials, cudaStream_t stream) {
  if (n == 0) return;
  sum_squares_kernel<<<static_cast<unsigned>(sum_squares_blocks(n)), kThreads, 0, stream>>>(
      x, n, partials);
}

}  // namespace launch
}  // namespace titan::kernels
