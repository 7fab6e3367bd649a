// Fused cross-entropy over a chunk of logits: one block per row computes the log-sum-exp with
// an online max/sum, the token loss, and (optionally) overwrites the row with the gradient
// (softmax - onehot) * scale, so the logits' gradient needs no extra memory. Loss parallel runs
// the same in two passes over a vocabulary shard: per-row statistics, then (after they are
// combined across ranks) the shard's gradient in place.
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

// (max, sum of exp(x - max)) over a row, in every thread of the block.
template <typename T>
__device__ MaxSum block_max_sum(const T* __restrict__ lr, int64_t vocab) {
  constexpr int V = Vec<T>::N;
  __shared__ MaxSum shared[32];
  __shared__ MaxSum result;
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
    if (lane == 0) result = ms;
  }
  __syncthreads();
  return result;
}

// Overwrites a row with (exp(x - lse) - [column == tgt]) * scale (tgt: a column of this row, or
// outside [0, vocab) when the target lies in another rank's shard).
template <typename T>
__device__ void write_softmax_grad(T* __restrict__ lr, int64_t vocab, float lse, int64_t tgt,
                                   float scale) {
  constexpr int V = Vec<T>::N;
  const int64_t vec_end = (vocab / V) * V;
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

template <typename T>
__global__ void __launch_bounds__(1024)
    ce_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
              float* __restrict__ losses, int64_t vocab, float scale, bool write_grad) {
  const int64_t row = blockIdx.x;
  T* lr = logits + row * vocab;
  const MaxSum ms = block_max_sum(lr, vocab);
  const float lse = ms.m + __logf(ms.s);
  const int64_t tgt = targets[row];
  if (threadIdx.x == 0) losses[row] = lse - dev::to_float(lr[tgt]);
  __syncthreads();  // the target logit is read before the row is overwritten
  if (write_grad) write_softmax_grad(lr, vocab, lse, tgt, scale);
}

// Loss parallel, pass 1: per row of this rank's vocabulary shard (columns [begin, begin +
// cols) of the whole vocabulary), its max, sum of exp(x - max) and the target's logit (0 where
// the target is in another shard): stats [rows, 3].
template <typename T>
__global__ void __launch_bounds__(1024)
    ce_shard_stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                          float* __restrict__ stats, int64_t cols, int64_t begin) {
  const int64_t row = blockIdx.x;
  const T* lr = logits + row * cols;
  const MaxSum ms = block_max_sum(lr, cols);
  if (threadIdx.x == 0) {
    const int64_t local = targets[row] - begin;
    stats[row * 3 + 0] = ms.m;
    stats[row * 3 + 1] = ms.s;
    stats[row * 3 + 2] = local >= 0 && local < cols ? dev::to_float(lr[local]) : 0.f;
  }
}

// Loss parallel, pass 2: the shard's part of the logits' gradient, in place, from each row's
// log-sum-exp over the whole vocabulary.
template <typename T>
__global__ void __launch_bounds__(1024)
    ce_shard_grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ targets,
                         const float* __restrict__ lse, int64_t cols, int64_t begin, float scale) {
  const int64_t row = blockIdx.x;
  write_softmax_grad(logits + row * cols, cols, lse[row], targets[row] - begin, scale);
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

void cross_entropy_shard_stats(DType dt, const void* logits, const int64_t* targets, float* stats,
                               int64_t rows, int64_t cols, int64_t begin, cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = cols >= 8192 ? 1024 : 256;
  if (dt == DType::BF16) {
    ce_shard_stats_kernel<__nv_bfloat16><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(logits), targets, stats, cols, begin);
  } else {
    ce_shard_stats_kernel<float><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<const float*>(logits), targets, stats, cols, begin);
  }
}

void cross_entropy_shard_grad(DType dt, void* logits, const int64_t* targets, const float* lse,
                              int64_t rows, int64_t cols, int64_t begin, float grad_scale,
                              cudaStream_t stream) {
  if (rows == 0) return;
  const int threads = cols >= 8192 ? 1024 : 256;
  if (dt == DType::BF16) {
    ce_shard_grad_kernel<__nv_bfloat16><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<__nv_bfloat16*>(logits), targets, lse, cols, begin, grad_scale);
  } else {
    ce_shard_grad_kernel<float><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
        static_cast<float*>(logits), targets, lse, cols, begin, grad_scale);
  }
}

}  // namespace launch
}  // namespace titan::kernels
