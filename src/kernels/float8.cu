// Float8 casts with dynamic scales: the largest |x| of the tensor, of each row or of each column
// (one pass, bf16 or fp32 in, atomic max of the float's bits), then one pass that scales
// (optionally by a power of two), saturates and rounds to e4m3 or e5m2, writing x in float8,
// its transpose (tiles through shared memory: 64 x 64 with vector loads and stores when both
// dimensions are multiples of 64, else 32 x 32), or both, and the inverse scales the GEMM
// applies.
#include <cuda_fp8.h>

#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

using dev::Vec;

using dev::atomic_max_nonneg;
using dev::block_max;

// Whole tensor: grid-stride 16-byte vectors, one atomic per block. (Four loads in flight per
// thread measured no faster on the 3B step: launches of small tensors dominate.)
template <typename T>
__global__ void amax_tensor_kernel(const T* __restrict__ x, int64_t n, float* __restrict__ amax) {
  constexpr int V = Vec<T>::N;
  __shared__ float shared[32];
  float m = 0.f;
  const int64_t vecs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += stride) {
    float v[V];
    Vec<T>::load(x + t * V, v);
#pragma unroll
    for (int k = 0; k < V; ++k) m = fmaxf(m, fabsf(v[k]));
  }
  for (int64_t i = vecs * V + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    m = fmaxf(m, fabsf(dev::to_float(x[i])));
  }
  m = block_max(m, shared);
  if (threadIdx.x == 0) atomic_max_nonneg(amax, m);
}

// Per row: one block per row (grid-stride over rows); 16-byte vectors when rows start on 16
// bytes (`vec`).
template <typename T>
__global__ void amax_rows_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, bool vec,
                                 float* __restrict__ amax) {
  constexpr int V = Vec<T>::N;
  __shared__ float shared[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    float m = 0.f;
    const T* row = x + r * cols;
    if (vec) {
      for (int64_t c = threadIdx.x * V; c < cols; c += blockDim.x * V) {
        float v[V];
        Vec<T>::load(row + c, v);
#pragma unroll
        for (int k = 0; k < V; ++k) m = fmaxf(m, fabsf(v[k]));
      }
    } else {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
        m = fmaxf(m, fabsf(dev::to_float(row[c])));
      }
    }
    m = block_max(m, shared);
    if (threadIdx.x == 0) amax[r] = m;
  }
}

// Per column: each thread walks a strip of rows of one column (or, `vec`, of V adjacent
// columns read as one 16-byte vector); one atomic per column and strip.
constexpr int kStrip = 64;
template <typename T>
__global__ void amax_cols_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, bool vec,
                                 float* __restrict__ amax) {
  constexpr int V = Vec<T>::N;
  const int64_t lane = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kStrip;
  const int64_t r1 = r0 + kStrip < rows ? r0 + kStrip : rows;
  if (vec) {
    const int64_t c = lane * V;
    if (c >= cols) return;
    float m[V];
#pragma unroll
    for (int k = 0; k < V; ++k) m[k] = 0.f;
    for (int64_t r = r0; r < r1; ++r) {
      float v[V];
      Vec<T>::load(x + r * cols + c, v);
#pragma unroll
      for (int k = 0; k < V; ++k) m[k] = fmaxf(m[k], fabsf(v[k]));
    }
#pragma unroll
    for (int k = 0; k < V; ++k) atomic_max_nonneg(amax + c + k, m[k]);
    return;
  }
  const int64_t c = lane;
  if (c >= cols) return;
  float m = 0.f;
  for (int64_t r = r0; r < r1; ++r) m = fmaxf(m, fabsf(dev::to_float(x[r * cols + c])));
  atomic_max_nonneg(amax + c, m);
}

// mode: 0 one scale, 1 per row, 2 per column.
// pow2: the largest power of two not above the scale, from its exponent bits (exact; the CPU
// cast takes the same bits).
__device__ inline float scale_from(float amax, float fmax, bool pow2) {
  const float s = fmax / fmaxf(amax, 1e-12f);
  return pow2 ? __int_as_float(__float_as_int(s) & 0x7f800000) : s;
}

__device__ inline uint8_t to_fp8(float v, bool e4m3) {
  return e4m3 ? __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3)
              : __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2);
}

// Four floats times s, saturated to float8, as one 4-byte word (element k in byte k).
__device__ inline uint32_t to_fp8x4(const float* v, float s, bool e4m3) {
  uint32_t word = 0;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float2 f = make_float2(v[2 * p] * s, v[2 * p + 1] * s);
    const uint32_t two = e4m3 ? __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E4M3)
                              : __nv_cvt_float2_to_fp8x2(f, __NV_SATFINITE, __NV_E5M2);
    word |= two << (16 * p);
  }
  return word;
}

// Eight floats times s as two 4-byte words.
__device__ inline uint2 to_fp8x8(const float* v, float s, bool e4m3) {
  return make_uint2(to_fp8x4(v, s, e4m3), to_fp8x4(v + 4, s, e4m3));
}

// One scale, row-major out only: 16-byte vectors in, V bytes out.
template <typename T>
__global__ void cast_kernel(const T* __restrict__ x, int64_t n, const float* __restrict__ amax,
                            float fmax, bool e4m3, uint8_t* __restrict__ out,
                            float* __restrict__ inv_scale) {
  constexpr int V = Vec<T>::N;
  const float s = scale_from(*amax, fmax, false);
  if (blockIdx.x == 0 && threadIdx.x == 0) *inv_scale = 1.f / s;
  const int64_t vecs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < vecs;
       t += stride) {
    float v[V];
    Vec<T>::load(x + t * V, v);
    if constexpr (V == 8) {
      *reinterpret_cast<uint2*>(out + t * V) = to_fp8x8(v, s, e4m3);
    } else {
      *reinterpret_cast<uint32_t*>(out + t * V) = to_fp8x4(v, s, e4m3);
    }
  }
  for (int64_t i = vecs * V + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = to_fp8(dev::to_float(x[i]) * s, e4m3);
  }
}

// x [rows, cols] -> out [rows, cols] (optional) and out_t [cols, rows] (optional), 32 x 32
// tiles through shared memory; scales by `mode`; inv_scale gets 1 / scale per scale.
constexpr int kTile = 32;
template <typename T>
__global__ void cast_transpose_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                                      const float* __restrict__ amax, int mode, bool pow2,
                                      float fmax, bool e4m3, uint8_t* __restrict__ out,
                                      uint8_t* __restrict__ out_t, float* __restrict__ inv_scale) {
  __shared__ uint8_t tile[kTile][kTile + 4];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float s_tensor = mode == 0 ? scale_from(amax[0], fmax, pow2) : 0.f;
  if (mode == 0 && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    inv_scale[0] = 1.f / s_tensor;
  }
  const int64_t c = c0 + threadIdx.x;
  const float s_col = mode == 2 && c < cols ? scale_from(amax[c], fmax, pow2) : 0.f;
  if (mode == 2 && blockIdx.y == 0 && threadIdx.y == 0 && c < cols) inv_scale[c] = 1.f / s_col;
  for (int dy = threadIdx.y; dy < kTile; dy += blockDim.y) {
    const int64_t r = r0 + dy;
    if (r < rows && c < cols) {
      float s = mode == 0 ? s_tensor : s_col;
      if (mode == 1) {
        s = scale_from(amax[r], fmax, pow2);
        if (c == 0) inv_scale[r] = 1.f / s;
      }
      const uint8_t q = to_fp8(dev::to_float(x[r * cols + c]) * s, e4m3);
      if (out) out[r * cols + c] = q;
      tile[dy][threadIdx.x] = q;
    }
  }
  if (!out_t) return;
  __syncthreads();
  for (int dy = threadIdx.y; dy < kTile; dy += blockDim.y) {
    const int64_t cc = c0 + dy, r = r0 + threadIdx.x;
    if (r < rows && cc < cols) out_t[cc * rows + r] = tile[threadIdx.x][dy];
  }
}

// Eight consecutive elements of x as floats (one or two 16-byte loads).
template <typename T>
__device__ inline void load8(const T* p, float* v) {
  Vec<T>::load(p, v);
  if constexpr (Vec<T>::N == 4) Vec<T>::load(p + 4, v + 4);
}

// Rows and cols multiples of 64: x [rows, cols] -> out (optional) and out_t [cols, rows]
// (optional) in 64 x 64 tiles, 16-byte loads and 8-byte stores on both sides; scales by `mode`
// as cast_transpose_kernel. Tile rows are 68 bytes apart: the transposed reads of a warp meet
// at most 2 per bank.
constexpr int kWide = 64, kWideStride = kWide + 4, kWideThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kWideThreads)
    cast_transpose_wide_kernel(const T* __restrict__ x, int64_t rows, int64_t cols,
                               const float* __restrict__ amax, int mode, bool pow2, float fmax,
                               bool e4m3, uint8_t* __restrict__ out, uint8_t* __restrict__ out_t,
                               float* __restrict__ inv_scale) {
  __shared__ __align__(16) uint8_t tile[kWide * kWideStride];
  __shared__ float col_scale[kWide];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kWide;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kWide;
  const float s_tensor = mode == 0 ? scale_from(amax[0], fmax, pow2) : 0.f;
  if (mode == 0 && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) {
    inv_scale[0] = 1.f / s_tensor;
  }
  if (mode == 2) {  // the tile's 64 column scales, once per block
    if (threadIdx.x < kWide) {
      const float sc = scale_from(amax[c0 + threadIdx.x], fmax, pow2);
      col_scale[threadIdx.x] = sc;
      if (blockIdx.y == 0) inv_scale[c0 + threadIdx.x] = 1.f / sc;
    }
    __syncthreads();
  }
  // 64 rows of 8 eight-element groups: two groups per thread.
#pragma unroll
  for (int i = 0; i < kWide * kWide / 8 / kWideThreads; ++i) {
    const int idx = threadIdx.x + i * kWideThreads;
    const int r = idx >> 3, g = idx & 7;
    float v[8];
    load8(x + (r0 + r) * cols + c0 + 8 * g, v);
    if (mode == 0) {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] *= s_tensor;
    } else if (mode == 1) {
      const float s = scale_from(amax[r0 + r], fmax, pow2);
      if (blockIdx.x == 0 && g == 0) inv_scale[r0 + r] = 1.f / s;
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] *= s;
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[k] *= col_scale[8 * g + k];
    }
    const uint2 q = to_fp8x8(v, 1.f, e4m3);
    if (out) *reinterpret_cast<uint2*>(out + (r0 + r) * cols + c0 + 8 * g) = q;
    auto* t = reinterpret_cast<uint32_t*>(tile + r * kWideStride + 8 * g);
    t[0] = q.x;
    t[1] = q.y;
  }
  if (!out_t) return;
  __syncthreads();
  // 64 transposed rows (columns of x) of 8 eight-byte groups.
#pragma unroll
  for (int i = 0; i < kWide * kWide / 8 / kWideThreads; ++i) {
    const int idx = threadIdx.x + i * kWideThreads;
    const int c = idx >> 3, g = idx & 7;
    uint32_t w[2] = {0, 0};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      w[j >> 2] |= static_cast<uint32_t>(tile[(8 * g + j) * kWideStride + c]) << (8 * (j & 3));
    }
    *reinterpret_cast<uint2*>(out_t + (c0 + c) * rows + r0 + 8 * g) = make_uint2(w[0], w[1]);
  }
}

// Float8 bytes x [rows, cols] -> out [cols, rows], both multiples of 64: 64 x 64 tiles, one
// 16-byte load and one 16-byte store per thread (a weight gathered in float8 is transposed so
// for the input gradient's GEMM).
__global__ void __launch_bounds__(kWideThreads)
    transpose_bytes_kernel(const uint8_t* __restrict__ x, int64_t rows, int64_t cols,
                           uint8_t* __restrict__ out) {
  __shared__ __align__(16) uint8_t tile[kWide * kWideStride];
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kWide;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kWide;
  const int r = threadIdx.x >> 2, g = threadIdx.x & 3;  // 64 rows of 4 sixteen-byte groups
  const uint4 in = *reinterpret_cast<const uint4*>(x + (r0 + r) * cols + c0 + 16 * g);
  auto* t = reinterpret_cast<uint32_t*>(tile + r * kWideStride + 16 * g);
  t[0] = in.x;
  t[1] = in.y;
  t[2] = in.z;
  t[3] = in.w;
  __syncthreads();
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    w[j >> 2] |= static_cast<uint32_t>(tile[(16 * g + j) * kWideStride + r]) << (8 * (j & 3));
  }
  *reinterpret_cast<uint4*>(out + (c0 + r) * rows + r0 + 16 * g) =
      make_uint4(w[0], w[1], w[2], w[3]);
}

unsigned grid_for(int64_t total, int threads) {
  const int64_t want = (total + threads - 1) / threads;
  return static_cast<unsigned>(want < 132 * 16 ? (want > 0 ? want : 1) : 132 * 16);
}

}  // namespace

namespace launch {

void float8_amax(DType dt, const void* x, int64_t rows, int64_t cols, int mode, float* amax,
                 cudaStream_t stream) {
  const int64_t n = rows * cols;
  const int64_t scales = mode == 0 ? 1 : mode == 1 ? rows : cols;
  cudaMemsetAsync(amax, 0, sizeof(float) * scales, stream);
  if (n == 0) return;
  const bool bf16 = dt == DType::BF16;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  const auto* xf = static_cast<const float*>(x);
  if (mode == 0) {
    if (bf16) {
      amax_tensor_kernel<<<grid_for(n / 8, 256), 256, 0, stream>>>(xb, n, amax);
    } else {
      amax_tensor_kernel<<<grid_for(n / 4, 256), 256, 0, stream>>>(xf, n, amax);
    }
  } else if (mode == 1) {
    const unsigned grid = static_cast<unsigned>(rows < 132 * 16 ? rows : 132 * 16);
    const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && cols % 8 == 0;
    if (bf16) {
      amax_rows_kernel<<<grid, 256, 0, stream>>>(xb, rows, cols, vec, amax);
    } else {
      amax_rows_kernel<<<grid, 256, 0, stream>>>(xf, rows, cols, vec, amax);
    }
  } else {
    // Vectors of 8 (bf16) or 4 (fp32) columns when every row starts on 16 bytes.
    const int per = bf16 ? 8 : 4;
    const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && cols % 8 == 0;
    const int64_t lanes = vec ? cols / per : cols;
    const dim3 grid(static_cast<unsigned>((lanes + 255) / 256),
                    static_cast<unsigned>((rows + kStrip - 1) / kStrip));
    if (bf16) {
      amax_cols_kernel<<<grid, 256, 0, stream>>>(xb, rows, cols, vec, amax);
    } else {
      amax_cols_kernel<<<grid, 256, 0, stream>>>(xf, rows, cols, vec, amax);
    }
  }
}

void float8_cast(DType dt, const void* x, int64_t rows, int64_t cols, const float* amax, int mode,
                 bool pow2, bool e4m3, void* out, void* out_t, float* inv_scale,
                 cudaStream_t stream) {
  const float fmax = e4m3 ? 448.f : 57344.f;
  const int64_t n = rows * cols;
  if (n == 0) return;
  auto* o = static_cast<uint8_t*>(out);
  auto* ot = static_cast<uint8_t*>(out_t);
  const bool bf16 = dt == DType::BF16;
  if (!ot && mode == 0 && !pow2) {
    if (bf16) {
      cast_kernel<<<grid_for(n / 8, 256), 256, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), n,
                                                            amax, fmax, e4m3, o, inv_scale);
    } else {
      cast_kernel<<<grid_for(n / 4, 256), 256, 0, stream>>>(static_cast<const float*>(x), n, amax,
                                                            fmax, e4m3, o, inv_scale);
    }
    return;
  }
  if (rows % kWide == 0 && cols % kWide == 0 && rows / kWide <= 65535 &&
      reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 8 == 0 &&
      reinterpret_cast<uintptr_t>(out_t) % 8 == 0) {
    const dim3 grid(static_cast<unsigned>(cols / kWide), static_cast<unsigned>(rows / kWide));
    if (bf16) {
      cast_transpose_wide_kernel<<<grid, kWideThreads, 0, stream>>>(
          static_cast<const __nv_bfloat16*>(x), rows, cols, amax, mode, pow2, fmax, e4m3, o, ot,
          inv_scale);
    } else {
      cast_transpose_wide_kernel<<<grid, kWideThreads, 0, stream>>>(
          static_cast<const float*>(x), rows, cols, amax, mode, pow2, fmax, e4m3, o, ot, inv_scale);
    }
    return;
  }
  const dim3 grid(static_cast<unsigned>((cols + kTile - 1) / kTile),
                  static_cast<unsigned>((rows + kTile - 1) / kTile));
  const dim3 block(kTile, 8);
  if (bf16) {
    cast_transpose_kernel<<<grid, block, 0, stream>>>(static_cast<const __nv_bfloat16*>(x), rows,
                                                      cols, amax, mode, pow2, fmax, e4m3, o, ot,
                                                      inv_scale);
  } else {
    cast_transpose_kernel<<<grid, block, 0, stream>>>(
        static_cast<const float*>(x), rows, cols, amax, mode, pow2, fmax, e4m3, o, ot, inv_scale);
  }
}

bool transpose_bytes(const void* x, int64_t rows, int64_t cols, void* out, cudaStream_t stream) {
  if (rows % kWide != 0 || cols % kWide != 0 || rows / kWide > 65535 ||
      reinterpret_cast<uintptr_t>(x) % 16 != 0 || reinterpret_cast<uintptr_t>(out) % 16 != 0) {
    return false;
  }
  if (rows == 0 || cols == 0) return true;
  const dim3 grid(static_cast<unsigned>(cols / kWide), static_cast<unsigned>(rows / kWide));
  transpose_bytes_kernel<<<grid, kWideThreads, 0, stream>>>(static_cast<const uint8_t*>(x), rows,
                                                            cols, static_cast<uint8_t*>(out));
  return true;
}

}  // namespace launch
}  // namespace titan::kernels
