// Raw-pointer launchers of titan's CUDA kernels. No torch headers: the .cu files compile with
// a bare nvcc (CI checks that), and src/kernels/kernels_cuda.cpp adapts tensors to them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace titan::kernels::launch {

// dtype codes shared by the launchers
enum class DType : int { F32 = 0, BF16 = 1 };

// `amax` arguments (else null): one fp32 the launcher zeroes and the kernel sets to the largest
// |value| of its output as stored (for a float8 tensorwise cast of it).
// With `add` (else null): normalizes h = x + add and writes h into `sum`.
void rmsnorm_forward(DType dt, const void* x, const void* add, void* sum, const void* w, void* y,
                     float* rstd, int64_t rows, int64_t dim, float eps, float* amax,
                     cudaStream_t stream);
// partial: fp32 scratch of [blocks, dim] where blocks = rmsnorm_backward_blocks(rows).
int rmsnorm_backward_blocks(int64_t rows);
// With `residual` (else null): dx = the input gradient (rounded to the dtype) + residual.
void rmsnorm_backward(DType dt, const void* dy, const void* x, const void* w, const float* rstd,
                      const void* residual, void* dx, float* partial, float* weight_grad,
                      int64_t rows, int64_t dim, bool accumulate, float* amax, cudaStream_t stream);

// x: element (b, s, h, j) at x + b*xs[0] + s*xs[1] + h*xs[2] + j; out likewise with os.
void rope(DType dt, const void* x, const int64_t* xs, void* out, const int64_t* os,
          const float* cos, const float* sin, int64_t b, int64_t s, int64_t h, int64_t hd,
          bool inverse, cudaStream_t stream);

void swiglu_forward(DType dt, const void* ab, void* g, int64_t rows, int64_t f, float* amax,
                    cudaStream_t stream);
void swiglu_backward(DType dt, const void* dg, const void* ab, void* dab, int64_t rows, int64_t f,
                     float* amax, cudaStream_t stream);

// losses: fp32 [rows] per-row loss; logits overwritten by the gradient when write_grad.
void cross_entropy(DType dt, void* logits, const int64_t* targets, float* losses, int64_t rows,
                   int64_t vocab, float grad_scale, bool write_grad, cudaStream_t stream);
// Loss parallel over a vocabulary shard (columns [begin, begin + cols)): stats [rows, 3] = (max,
// sum of exp(x - max), target logit or 0); then the shard's gradient in place from lse [rows].
void cross_entropy_shard_stats(DType dt, const void* logits, const int64_t* targets, float* stats,
                               int64_t rows, int64_t cols, int64_t begin, cudaStream_t stream);
void cross_entropy_shard_grad(DType dt, void* logits, const int64_t* targets, const float* lse,
                              int64_t rows, int64_t cols, int64_t begin, float grad_scale,
                              cudaStream_t stream);

// One flat parameter: p, g, m, v fp32 (16-byte aligned); shadow_bf16 (optional) receives the
// updated parameter in bf16. hyper (device): lr, beta1, beta2, eps, weight_decay, lr / bc1,
// 1 / sqrt(bc2). divisor (device, optional): the gradient is divided by it (clipping). amax
// (device, optional): zeroed, then the largest |value| written (of the bf16 copy where given).
void adamw(float* p, const float* g, float* m, float* v, void* shadow_bf16, int64_t n,
           const float* hyper, const float* divisor, bool decoupled, float* amax,
           cudaStream_t stream);

// Sum of squares of x (fp32, 16-byte aligned): writes sum_squares_blocks(n) fp64 partials,
// whose sum is the result.
int64_t sum_squares_blocks(int64_t n);
void sum_squares(const float* x, int64_t n, double* partials, cudaStream_t stream);

// Float8: amax (fp32 [1], [rows] or [cols] for mode 0, 1, 2) = max |x| over the tensor, each
// row or each column of x [rows, cols] (16-byte aligned); then x scaled by fmax / amax (rounded
// down to a power of two with pow2), saturated and rounded to e4m3 (e4m3 true) or e5m2 into out
// (row-major, optional) and/or out_t ([cols, rows], optional), with inv_scale = 1 / scale
// (same shape as amax).
void float8_amax(DType dt, const void* x, int64_t rows, int64_t cols, int mode, float* amax,
                 cudaStream_t stream);
void float8_cast(DType dt, const void* x, int64_t rows, int64_t cols, const float* amax, int mode,
                 bool pow2, bool e4m3, void* out, void* out_t, float* inv_scale,
                 cudaStream_t stream);
// Bytes x [rows, cols] -> out [cols, rows]. Only for rows and cols multiples of 64 and 16-byte
// aligned pointers; returns false (nothing launched) otherwise.
bool transpose_bytes(const void* x, int64_t rows, int64_t cols, void* out, cudaStream_t stream);

}  // namespace titan::kernels::launch
