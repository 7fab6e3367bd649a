// Fused RMSNorm: forward (one block per row, fp32 statistics), optionally of h = x + add written
// out too (the residual add before a norm), and backward (input gradient per row, optionally
// plus a residual gradient; weight gradient as per-block partial sums reduced by a second
// kernel). The fused adds round where the separate ops would, so results are bit-identical.
// Either direction can take the largest |value| of its output (y, dx) for a float8 cast.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

using dev::Vec;

using dev::rounded;

// With `add`: h = x + add is stored into `sum` and normalized; the second pass recomputes h
// from x and add (still in cache) rather than reading back what it wrote. `amax` (optional,
// zeroed) gets max |y|.
template <typename T>
__global__ void __launch_bounds__(1024)
    rmsnorm_fwd(const T* __restrict__ x, const T* __restrict__ add, T* __restrict__ sum,
                const T* __restrict__ w, T* __restrict__ y, float* __restrict__ rstd, int64_t dim,
                float eps, float* __restrict__ amax) {
  __shared__ float shared[32];
  constexpr int V = Vec<T>::N;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  const T* ar = add ? add + row * dim : nullptr;
  T* yr = y + row * dim;
  float ss = 0.f;
  for (int64_t i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
    float v[V];
    Vec<T>::load(xr + i, v);
    if (ar) {
      float a[V];
      Vec<T>::load(ar + i, a);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = rounded<T>(v[k] + a[k]);
      Vec<T>::store(sum + row * dim + i, v);
    }
#pragma unroll
    for (int k = 0; k < V; ++k) ss += v[k] * v[k];
  }
  ss = dev::block_sum(ss, shared);
  const float r = rsqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  float m = 0.f;
  for (int64_t i = threadIdx.x * V; i < dim; i += blockDim.x * V) {
    float v[V], g[V], o[V];
    Vec<T>::load(xr + i, v);
    if (ar) {
      float a[V];
      Vec<T>::load(ar + i, a);
#pragma unroll
      for (int k = 0; k < V; ++k) v[k] = rounded<T>(v[k] + a[k]);
    }
    Vec<T>::load(w + i, g);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      o[k] = v[k] * r * g[k];
      m = fmaxf(m, fabsf(rounded<T>(o[k])));
    }
    Vec<T>::store(yr + i, o);
  }
  dev::block_amax_into(amax, m, shared);
}

// Each block walks rows blockIdx.x, blockIdx.x + gridDim.x, ...; thread t owns the vectors
// t, t + blockDim.x, ... of a row (at most NV of them) and accumulates their weight gradient.
// `amax` (optional, zeroed) gets max |dx|.
template <typename T, int NV>
__global__ void __launch_bounds__(1024)
    rmsnorm_bwd(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ w,
                const float* __restrict__ rstd, const T* __restrict__ residual, T* __restrict__ dx,
                float* __restrict__ partial, int64_t rows, int64_t dim, float* __restrict__ amax) {
  __shared__ float shared[32];
  constexpr int V = Vec<T>::N;
  float acc[NV][V];
#pragma unroll
  for (int n = 0; n < NV; ++n)
#pragma unroll
    for (int k = 0; k < V; ++k) acc[n][k] = 0.f;
  float m = 0.f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float r = rstd[row];
    const T* xr = x + row * dim;
    const T* dyr = dy + row * dim;
    float dot = 0.f;
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      const int64_t i = (static_cast<int64_t>(n) * blockDim.x + threadIdx.x) * V;
      if (i < dim) {
        float xv[V], dv[V], wv[V];
        Vec<T>::load(xr + i, xv);
        Vec<T>::load(dyr + i, dv);
        Vec<T>::load(w + i, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xhat = xv[k] * r;
          dot += dv[k] * wv[k] * xhat;
          acc[n][k] += dv[k] * xhat;
        }
      }
    }
    dot = dev::block_sum(dot, shared) / static_cast<float>(dim);
#pragma unroll
    for (int n = 0; n < NV; ++n) {
      const int64_t i = (static_cast<int64_t>(n) * blockDim.x + threadIdx.x) * V;
      if (i < dim) {
        float xv[V], dv[V], wv[V], o[V];
        Vec<T>::load(xr + i, xv);
        Vec<T>::load(dyr + i, dv);
        Vec<T>::load(w + i, wv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float xhat = xv[k] * r;
          o[k] = r * (dv[k] * wv[k] - xhat * dot);
        }
        if (residual) {
          float rv[V];
          Vec<T>::load(residual + row * dim + i, rv);
#pragma unroll
          for (int k = 0; k < V; ++k) o[k] = rounded<T>(o[k]) + rv[k];
        }
#pragma unroll
        for (int k = 0; k < V; ++k) m = fmaxf(m, fabsf(rounded<T>(o[k])));
        Vec<T>::store(dx + row * dim + i, o);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < NV; ++n) {
    const int64_t i = (static_cast<int64_t>(n) * blockDim.x + threadIdx.x) * V;
    if (i < dim) {
#pragma unroll
      for (int k = 0; k < V; ++k) partial[blockIdx.x * dim + i + k] = acc[n][k];
    }
  }
  dev::block_amax_into(amax, m, shared);
}

__global__ void sum_partials(const float* __restrict__ partial, float* __restrict__ out, int blocks,
                             int64_t dim, bool accumulate) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= dim) return;
  float s = 0.f;
  for (int b = 0; b < blocks; ++b) s += partial[b * dim + col];
  out[col] = accumulate ? out[col] + s : s;
}

int threads_for(int64_t dim, int vec) {
  int64_t t = (dim / vec + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(1024, std::max<int64_t>(32, t)));
}

template <typename T>
void bwd_launch(const void* dy, const void* x, const void* w, const float* rstd,
                const void* residual, void* dx, float* partial, float* weight_grad, int64_t rows,
                int64_t dim, bool accumulate, float* amax, cudaStream_t stream) {
  constexpr int V = Vec<T>::N;
  const int blocks = launch::rmsnorm_backward_blocks(rows);
  const int threads = threads_for(dim, V);
  const int64_t per_thread = (dim / V + threads - 1) / threads;
  if (per_thread <= 1) {
    rmsnorm_bwd<T, 1><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
        static_cast<const T*>(residual), static_cast<T*>(dx), partial, rows, dim, amax);
  } else if (per_thread <= 2) {
    rmsnorm_bwd<T, 2><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
        static_cast<const T*>(residual), static_cast<T*>(dx), partial, rows, dim, amax);
  } else {
    rmsnorm_bwd<T, 4><<<blocks, threads, 0, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), static_cast<const T*>(w), rstd,
        static_cast<const T*>(residual), static_cast<T*>(dx), partial, rows, dim, amax);
  }
  sum_partials<<<static_cast<unsigned>((dim + 255) / 256), 256, 0, stream>>>(
      partial, weight_grad, blocks, dim, accumulate);
}

}  // namespace

namespace launch {

void rmsnorm_forward(DType dt, const void* x, const void* add, void* sum, const void* w, void* y,
                     float* rstd, int64_t rows, int64_t dim, float eps, float* amax,
                     cudaStream_t stream) {
  if (amax) cudaMemsetAsync(amax, 0, sizeof(float), stream);
  if (rows == 0) return;
  if (dt == DType::BF16) {
    using B = __nv_bfloat16;
    rmsnorm_fwd<B><<<static_cast<unsigned>(rows), threads_for(dim, 8), 0, stream>>>(
        static_cast<const B*>(x), static_cast<const B*>(add), static_cast<B*>(sum),
        static_cast<const B*>(w), static_cast<B*>(y), rstd, dim, eps, amax);
  } else {
    rmsnorm_fwd<float><<<static_cast<unsigned>(rows), threads_for(dim, 4), 0, stream>>>(
        static_cast<const float*>(x), static_cast<const float*>(add), static_cast<float*>(sum),
        static_cast<const float*>(w), static_cast<float*>(y), rstd, dim, eps, amax);
  }
}

int rmsnorm_backward_blocks(int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, 264)));
}

void rmsnorm_backward(DType dt, const void* dy, const void* x, const void* w, const float* rstd,
                      const void* residual, void* dx, float* partial, float* weight_grad,
                      int64_t rows, int64_t dim, bool accumulate, float* amax,
                      cudaStream_t stream) {
  if (amax) cudaMemsetAsync(amax, 0, sizeof(float), stream);
  if (rows == 0) return;
  if (dt == DType::BF16) {
    bwd_launch<__nv_bfloat16>(dy, x, w, rstd, residual, dx, partial, weight_grad, rows, dim,
                              accumulate, amax, stream);
  } else {
    bwd_launch<float>(dy, x, w, rstd, residual, dx, partial, weight_grad, rows, dim, accumulate,
                      amax, stream);
  }
}

}  // namespace launch
}  // namespace titan::kernels
