// Fused cross-entropy over a chunk of logits: one block per row computes the log-sum-exp with
// an online max/sum, the token loss, and (optionally) overwrites the row with the gradient
// (softmax - onehot) * scale, so the logits' gradient needs no extra memory.
#include <cfloat>

#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

using dev::Vec;

struct MaxSum {
  float m, s;
};

__device__ inline MaxSum combine(MaxSum a, MaxSum b) {
  const float m = fmaxf(a.m, b.m);
  if (m == -INFINITY) return {m, 0.f};
  return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

template <typename T>
__global__ void __launch_bounds__(1024)
    ce_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
              float* __restrict__ losses, int64_t vocab, float scale, bool write_grad) {
  constexpr int V = Vec<T>::N;
  __shared__ MaxSum shared[32];
  __shared__ float lse_shared;
  const int64_t row = blockIdx.x;
  T* lr = logits + row * vocab;
  MaxSum ms{-INFINITY, 0.f};
  const int64_t vec_end = (vocab / V) * V;
  for (int64_t i = threadIdx.x * V; i < vec_end; i += blockDim.x * V) {
    float v[V];
    Vec<T>::load(lr + i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) ms = combine(ms, MaxSum{v[k], 1.f});
  }
  for (int64_t i = vec_end + threadIdx.x; i < vocab; i += blockDim.x) {
    ms = combine(ms, MaxSum{dev::to_float(lr[i]), 1.f});
  }
  // Block reduction of (max, sum) pairs.
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    MaxSum other{__shfl_xor_sync(0xffffffffu, ms.m, o), __shfl_xor_sync(0xffffffffu, ms.s, o)};
    ms = combine(ms, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = ms;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    ms = lane < warps ? shared[lane] : MaxSum{-INFINITY, 0.f};
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      MaxSum other{__shfl_xor_sync(0xffffffffu, ms.m, o), __shfl_xor_sync(0xffffffffu, ms.s, o)};
      ms = combine(ms, other);
    }
    if (lane == 0) lse_shared = ms.m + __logf(ms.s);
  }
  __syncthreads();
  const float lse = lse_shared;
  const int64_t tgt = targets[row];
  if (threadIdx.x == 0) losses[row] = lse - dev::to_float(lr[tgt]);
  __syncthreads();  // the target logit is read before the row is overwritten
  if (!write_grad) return;
  for (int64_t i = threadIdx.x * V; i < vec_end; i += blockDim.x * V) {
    float v[V];
    Vec<T>::load(lr + i, v);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      v[k] = (__expf(v[k] - lse) - (i + k == tgt ? 1.f : 0.f)) * scale;
    }
    Vec<T>::store(lr + i, v);
  }
  for (int64_t i = vec_end + threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = dev::to_float(lr[i]);
    lr[i] = dev::from_float<T>((__expf(v - lse) - (i == tgt ? 1.f : 0.f)) * scale);
  }
}

}  // namespace

namespace launch {

void cross_entropy(DType dt, void* logits, const int64_t* targets, float* losses, int64_t rows,
                   int64_t vocab, float grad_scale, bool write_grad, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = vocab >= 8192 ? 1024 : 256;
  if (dt == DType::BF16) {
    ce_kernel<__nv_bfloat16><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(logits), targets, losses, vocab, grad_scale, write_grad);
  } else {
    ce_kernel<float><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<float*>(logits), targets, losses, vocab, grad_scale, write_grad);
  }
}

}  // namespace launch
}  // namespace titan::kernels
