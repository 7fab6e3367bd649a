// Fused RoPE on interleaved pairs: reads a strided [B, S, H, hd] view (a slice of the fused
// qkv projection), rotates each pair by +/- its angle in fp32, writes a contiguous result.
#include "common.cuh"
#include "launchers.h"

namespace titan::kernels {
namespace {

template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  __device__ static float2 load(const __nv_bfloat16* p) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  }
  __device__ static void store(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
};
template <>
struct Pair<float> {
  __device__ static float2 load(const float* p) { return *reinterpret_cast<const float2*>(p); }
  __device__ static void store(float* p, float a, float b) {
    *reinterpret_cast<float2*>(p) = make_float2(a, b);
  }
};

template <typename T>
__global__ void rope_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1, int64_t xs2,
                            const float* __restrict__ cosv, const float* __restrict__ sinv,
                            T* __restrict__ out, int64_t s_len, int64_t heads, int64_t half,
                            int64_t total_pairs, float sign) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < total_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = p % half;
    int64_t rest = p / half;
    const int64_t h = rest % heads;
    rest /= heads;
    const int64_t s = rest % s_len;
    const int64_t b = rest / s_len;
    const float2 v = Pair<T>::load(x + b * xs0 + s * xs1 + h * xs2 + 2 * j);
    const float c = cosv[s * half + j];
    const float sn = sign * sinv[s * half + j];
    Pair<T>::store(out + 2 * p, v.x * c - v.y * sn, v.x * sn + v.y * c);
  }
}

}  // namespace

namespace launch {

void rope(DType dt, const void* x, int64_t xs0, int64_t xs1, int64_t xs2, const float* cos,
          const float* sin, void* out, int64_t b, int64_t s, int64_t h, int64_t hd, bool inverse,
          cudaStream_t stream) {
  const int64_t total = b * s * h * (hd / 2);
  if (total == 0) return;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65535 * 32 ? want : 65535 * 32);
  const float sign = inverse ? -1.f : 1.f;
  if (dt == DType::BF16) {
    rope_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), xs0, xs1, xs2, cos, sin,
        static_cast<__nv_bfloat16*>(out), s, h, hd / 2, total, sign);
  } else {
    rope_kernel<float><<<blocks, threads, 0, stream>>>(static_cast<const float*>(x), xs0, xs1, xs2,
                                                       cos, sin, static_cast<float*>(out), s, h,
                                                       hd / 2, total, sign);
  }
}

}  // namespace launch
}  // namespace titan::kernels
