// Memory-bandwidth micro-benchmark of titan's memory-bound kernels against the device's copy
// ceiling: AdamW (fp32 state, with and without the bf16 copy) in its production form (one float4
// per thread, measured 4.25 TB/s) against grid-stride loops of 1, 2 or 4 float4 per thread
// (3.55-3.9 TB/s), and the float8 amax / cast / byte-transpose passes at the 3B model's shapes.
// Built and run by scripts/device_check.sh membench (a bare nvcc; no LibTorch):
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/membench.cu src/kernels/{adamw,float8}.cu
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <functional>

#include "../src/kernels/launchers.h"

#include "cuda_timing.cuh"

namespace {

double time_ms(const std::function<void()>& f) {
  return ::time_ms(f, 20, 3);
}

void report(const char* what, double ms, double bytes) {
  std::printf("%-58s %9.3f ms  %6.2f TB/s\n", what, ms, bytes / ms / 1e9);
}

// The AdamW arithmetic of src/kernels/adamw.cu, in launch shapes to compare.
struct H {
  float lr, b1, b2, eps, wd, step, inv_bc2;
};
__device__ __forceinline__ void upd(const H& h, float& p, float g, float& m, float& v) {
  m = h.b1 * m + (1.f - h.b1) * g;
  v = h.b2 * v + (1.f - h.b2) * g * g;
  p *= 1.f - h.lr * h.wd;
  p -= h.step * m / (sqrtf(v) * h.inv_bc2 + h.eps);
}
// Grid-stride, `kU` float4 of each tensor per thread and iteration (all loads first).
template <int kU>
__global__ void adam_gs(float4* p, const float4* g, float4* m, float4* v, uint2* shadow, int64_t n4,
                        H h) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i0 = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i0 < n4;
       i0 += kU * stride) {
    float4 pp[kU], gg[kU], mm[kU], vv[kU];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = i0 + u * stride;
      if (i < n4) {
        pp[u] = __ldcs(p + i);
        gg[u] = __ldcs(g + i);
        mm[u] = __ldcs(m + i);
        vv[u] = __ldcs(v + i);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t i = i0 + u * stride;
      if (i >= n4) continue;
      upd(h, pp[u].x, gg[u].x, mm[u].x, vv[u].x);
      upd(h, pp[u].y, gg[u].y, mm[u].y, vv[u].y);
      upd(h, pp[u].z, gg[u].z, mm[u].z, vv[u].z);
      upd(h, pp[u].w, gg[u].w, mm[u].w, vv[u].w);
      __stcs(p + i, pp[u]);
      __stcs(m + i, mm[u]);
      __stcs(v + i, vv[u]);
      if (shadow) {
        uint2 s;
        *reinterpret_cast<__nv_bfloat162*>(&s.x) = __floats2bfloat162_rn(pp[u].x, pp[u].y);
        *reinterpret_cast<__nv_bfloat162*>(&s.y) = __floats2bfloat162_rn(pp[u].z, pp[u].w);
        shadow[i] = s;
      }
    }
  }
}
// Bytes moved without arithmetic: 4 float4 read, 3 written (AdamW's traffic, no shadow).
__global__ void stream43(float4* p, const float4* g, float4* m, float4* v, int64_t n4) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n4) return;
  float4 a = p[i], b = g[i], c = m[i], d = v[i];
  p[i] = make_float4(a.x + b.x, a.y, a.z, a.w);
  m[i] = make_float4(c.x + b.y, c.y, c.z, c.w);
  v[i] = make_float4(d.x + b.z, d.y, d.z, d.w);
}
__global__ void read_max(const uint4* x, int64_t n16, float* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n16) return;
  uint4 r = x[i];
  if ((r.x ^ r.y ^ r.z ^ r.w) == 0x12345678u) *out = 1.f;  // keeps the load
}

int sms() {
  int dev = 0, count = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
  return count;
}

template <typename K>
int resident(K kernel, int threads) {
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0));
  return per_sm * sms();
}

void bench_adamw(int64_t n) {
  float *p, *g, *m, *v, *hyper;
  void* shadow;
  CHECK(cudaMalloc(&p, n * 4));
  CHECK(cudaMalloc(&g, n * 4));
  CHECK(cudaMalloc(&m, n * 4));
  CHECK(cudaMalloc(&v, n * 4));
  CHECK(cudaMalloc(&shadow, n * 2));
  CHECK(cudaMalloc(&hyper, 64));
  CHECK(cudaMemset(p, 0, n * 4));
  CHECK(cudaMemset(g, 0, n * 4));
  CHECK(cudaMemset(m, 0, n * 4));
  CHECK(cudaMemset(v, 0, n * 4));
  const float hh[8] = {1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1e-3f, 1.f, 0.f};
  CHECK(cudaMemcpy(hyper, hh, sizeof hh, cudaMemcpyHostToDevice));
  const H h{1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, 1e-3f, 1.f};
  const double b28 = 28.0 * n, b30 = 30.0 * n;
  const int64_t n4 = n / 4;
  std::printf("-- AdamW over %lld fp32 elements\n", static_cast<long long>(n));
  report("copy (cudaMemcpy D2D, read + write)",
         time_ms([&] { CHECK(cudaMemcpyAsync(m, p, n * 4, cudaMemcpyDeviceToDevice)); }), 8.0 * n);
  report("4 reads, 3 writes of float4, no arithmetic", time_ms([&] {
           stream43<<<(n4 + 255) / 256, 256>>>((float4*)p, (float4*)g, (float4*)m, (float4*)v, n4);
         }),
         b28);
  report("production adamw (4 per thread, no loop)", time_ms([&] {
           titan::kernels::launch::adamw(p, g, m, v, nullptr, n, hyper, nullptr, true, nullptr, 0);
         }),
         b28);
  report("production adamw + bf16 copy", time_ms([&] {
           titan::kernels::launch::adamw(p, g, m, v, shadow, n, hyper, nullptr, true, nullptr, 0);
         }),
         b30);
  const int r1 = resident(adam_gs<1>, 256), r2 = resident(adam_gs<2>, 256),
            r4 = resident(adam_gs<4>, 256);
  report("grid-stride x1, one wave", time_ms([&] {
           adam_gs<1><<<r1, 256>>>((float4*)p, (float4*)g, (float4*)m, (float4*)v, nullptr, n4, h);
         }),
         b28);
  report("grid-stride x2, one wave", time_ms([&] {
           adam_gs<2><<<r2, 256>>>((float4*)p, (float4*)g, (float4*)m, (float4*)v, nullptr, n4, h);
         }),
         b28);
  report("grid-stride x4, one wave", time_ms([&] {
           adam_gs<4><<<r4, 256>>>((float4*)p, (float4*)g, (float4*)m, (float4*)v, nullptr, n4, h);
         }),
         b28);
  report("grid-stride x2, one wave + bf16 copy", time_ms([&] {
           adam_gs<2>
               <<<r2, 256>>>((float4*)p, (float4*)g, (float4*)m, (float4*)v, (uint2*)shadow, n4, h);
         }),
         b30);
  std::printf("   (resident blocks of 256: x1 %d, x2 %d, x4 %d)\n", r1, r2, r4);
  for (void* q : {(void*)p, (void*)g, (void*)m, (void*)v, shadow, (void*)hyper}) cudaFree(q);
}

void bench_float8(int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  void *x, *o, *ot;
  float *amax, *inv, *flag;
  CHECK(cudaMalloc(&x, n * 2));
  CHECK(cudaMalloc(&o, n));
  CHECK(cudaMalloc(&ot, n));
  CHECK(cudaMalloc(&amax, 4 * (rows > cols ? rows : cols)));
  CHECK(cudaMalloc(&inv, 4 * (rows > cols ? rows : cols)));
  CHECK(cudaMalloc(&flag, 4));
  CHECK(cudaMemset(x, 0x3c, n * 2));
  using titan::kernels::launch::DType;
  char name[96];
  std::printf("-- float8 passes over a %lld x %lld bf16 tensor\n", static_cast<long long>(rows),
              static_cast<long long>(cols));
  report("read only (16-byte loads)",
         time_ms([&] { read_max<<<(n / 8 + 255) / 256, 256>>>((const uint4*)x, n / 8, flag); }),
         2.0 * n);
  report("amax (memset + tensorwise max)", time_ms([&] {
           titan::kernels::launch::float8_amax(DType::BF16, x, rows, cols, 0, amax, 0);
         }),
         2.0 * n);
  report("cast to e4m3 (given amax)", time_ms([&] {
           titan::kernels::launch::float8_cast(DType::BF16, x, rows, cols, amax, 0, false, true, o,
                                               nullptr, inv, 0);
         }),
         3.0 * n);
  report("cast to e4m3 and its transpose (given amax)", time_ms([&] {
           titan::kernels::launch::float8_cast(DType::BF16, x, rows, cols, amax, 0, false, true, o,
                                               ot, inv, 0);
         }),
         4.0 * n);
  report("float8 byte transpose",
         time_ms([&] { titan::kernels::launch::transpose_bytes(o, rows, cols, ot, 0); }), 2.0 * n);
  std::snprintf(name, sizeof name, "rowwise amax + cast (pow2)");
  report(name, time_ms([&] {
           titan::kernels::launch::float8_amax(DType::BF16, x, rows, cols, 1, amax, 0);
           titan::kernels::launch::float8_cast(DType::BF16, x, rows, cols, amax, 1, true, true, o,
                                               nullptr, inv, 0);
         }),
         5.0 * n);
  for (void* q : {x, o, ot, (void*)amax, (void*)inv, (void*)flag}) cudaFree(q);
}

}  // namespace

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("%s, %d SMs\n", prop.name, prop.multiProcessorCount);
  bench_adamw(int64_t{100} << 20);  // about one 3B block
  bench_adamw(int64_t{800} << 20);  // about the 3B head or embedding
  // The 3B model's float8 operands (8192 tokens): wo weight, x, w13 weight, w2 input, w13 dy.
  bench_float8(3072, 3072);
  bench_float8(8192, 3072);
  bench_float8(16384, 3072);
  bench_float8(8192, 8192);
  bench_float8(8192, 16384);
  return 0;
}
