// GEMM micro-benchmark: for every linear GEMM of the 1B and 3B steps (forward, input gradient,
// weight gradient; bf16 and float8 tensorwise), cuBLAS's default choice against cuBLASLt's
// heuristic first pick and the fastest of its top candidates, timed on this device.
// Answers whether choosing GEMM algorithms by timing at start-up would shorten the step.
// Built and run by scripts/device_check.sh gemmbench (a bare nvcc; no LibTorch):
//   nvcc -O3 -std=c++17 -arch=sm_90a scripts/gemmbench.cu -lcublasLt -lcublas
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#include "cuda_timing.cuh"

namespace {

#define BCHECK(x)                                                              \
  do {                                                                         \
    int s = static_cast<int>(x);                                               \
    if (s != 0) {                                                              \
      std::fprintf(stderr, "%s:%d cublas status %d\n", __FILE__, __LINE__, s); \
      std::exit(1);                                                            \
    }                                                                          \
  } while (0)

double time_ms(const std::function<void()>& f) {
  return ::time_ms(f, 10, 2);
}

// Column-major C[m,n] = op(A) op(B), as titan issues them (see the comments in main).
struct Gemm {
  const char* name;
  bool ta, tb;
  int m, n, k;
  double per_step;  // launches per step
  cudaDataType_t a_type, b_type, d_type;
};

cublasLtHandle_t lt;
cublasHandle_t blas;
void* workspace;
const size_t kWorkspaceBytes = 32u << 20;
float* scales;  // two device floats of 1

struct Result {
  double default_ms = 0, first_ms = 0, best_ms = 0;
  int candidates = 0, best_index = -1;
};

Result run(const Gemm& g, void* A, void* B, void* D) {
  Result r;
  const bool fp8 = g.a_type != CUDA_R_16BF;
  const float alpha = 1.f, beta = 0.f;
  const int lda = g.ta ? g.k : g.m, ldb = g.tb ? g.n : g.k;
  if (!fp8) {
    r.default_ms = time_ms([&] {
      BCHECK(cublasGemmEx(blas, g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, g.tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                          g.m, g.n, g.k, &alpha, A, g.a_type, lda, B, g.b_type, ldb, &beta, D,
                          g.d_type, g.m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    });
  }
  cublasLtMatmulDesc_t desc;
  BCHECK(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  cublasOperation_t oa = g.ta ? CUBLAS_OP_T : CUBLAS_OP_N, ob = g.tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  BCHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &oa, sizeof(oa)));
  BCHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, &ob, sizeof(ob)));
  if (fp8) {
    const float* sa = scales;
    const float* sb = scales + 1;
    BCHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &sa,
                                          sizeof(sa)));
    BCHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &sb,
                                          sizeof(sb)));
  }
  cublasLtMatrixLayout_t la, lb, lc;
  BCHECK(cublasLtMatrixLayoutCreate(&la, g.a_type, g.ta ? g.k : g.m, g.ta ? g.m : g.k, lda));
  BCHECK(cublasLtMatrixLayoutCreate(&lb, g.b_type, g.tb ? g.n : g.k, g.tb ? g.k : g.n, ldb));
  BCHECK(cublasLtMatrixLayoutCreate(&lc, g.d_type, g.m, g.n, g.m));
  cublasLtMatmulPreference_t pref;
  BCHECK(cublasLtMatmulPreferenceCreate(&pref));
  uint64_t ws = kWorkspaceBytes;
  BCHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                              sizeof(ws)));
  cublasLtMatmulHeuristicResult_t res[16];
  int found = 0;
  BCHECK(cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, lc, lc, pref, 16, res, &found));
  r.candidates = found;
  for (int i = 0; i < found; ++i) {
    if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
    const double ms = time_ms([&] {
      BCHECK(cublasLtMatmul(lt, desc, &alpha, A, la, B, lb, &beta, D, lc, D, lc, &res[i].algo,
                            workspace, kWorkspaceBytes, 0));
    });
    if (i == 0) r.first_ms = ms;
    if (r.best_index < 0 || ms < r.best_ms) {
      r.best_ms = ms;
      r.best_index = i;
    }
  }
  cublasLtMatmulPreferenceDestroy(pref);
  cublasLtMatrixLayoutDestroy(la);
  cublasLtMatrixLayoutDestroy(lb);
  cublasLtMatrixLayoutDestroy(lc);
  cublasLtMatmulDescDestroy(desc);
  return r;
}

// The GEMMs of one model's step: T tokens, and (out, in) of wqkv, wo, w13, w2. `fwd` counts the
// forward launches per layer (1, or 1.5 with every 2nd block recomputed).
void model(const char* label, int T, int layers, double fwd, std::vector<std::pair<int, int>> lin,
           bool fp8, int vocab = 0, int dim = 0) {
  std::printf("\n== %s, %d tokens, %d layers, %s\n", label, T, layers, fp8 ? "float8" : "bf16");
  std::printf("%-26s %6s %6s %6s %9s %9s %9s %5s %9s\n", "gemm", "m", "n", "k", "default",
              "lt_first", "lt_best", "pick", "TFLOP/s");
  double tot_default = 0, tot_first = 0, tot_best = 0;
  const cudaDataType_t bf = CUDA_R_16BF, e4 = CUDA_R_8F_E4M3, e5 = CUDA_R_8F_E5M2;
  // The bf16 output projection runs in chunks of 4096 tokens (src/ops/cross_entropy.cpp).
  if (vocab > 0) lin.push_back({vocab, dim});
  for (auto [out, in] : lin) {
    const bool head = out == vocab;
    const int rows = head ? 4096 : T;
    const double times = head ? double(T) / rows : 1.0 * layers;
    std::vector<Gemm> gs;
    char nf[64], ni[64], nw[64];
    std::snprintf(nf, sizeof nf, "fwd %dx%d", out, in);
    std::snprintf(ni, sizeof ni, "dgrad %dx%d", out, in);
    std::snprintf(nw, sizeof nw, "wgrad %dx%d", out, in);
    if (!fp8) {
      // y[T,out] = x[T,in] w[out,in]^T; dx = dy w; dW[out,in] (fp32) = dy^T x.
      gs.push_back({nf, true, false, out, rows, in, head ? times : fwd * times, bf, bf, bf});
      gs.push_back({ni, false, false, in, rows, out, times, bf, bf, bf});
      gs.push_back({nw, false, true, in, out, rows, times, bf, bf, CUDA_R_32F});
    } else {
      // float8 GEMMs are all "TN": the forward e4m3 x e4m3, the input gradient W^T (e4m3) x dy
      // (e5m2), the weight gradient x^T (e4m3) x dy^T (e5m2), outputs bf16.
      gs.push_back({nf, true, false, out, T, in, fwd * layers, e4, e4, bf});
      gs.push_back({ni, true, false, in, T, out, 1.0 * layers, e4, e5, bf});
      gs.push_back({nw, true, false, in, out, T, 1.0 * layers, e4, e5, bf});
    }
    for (const Gemm& g : gs) {
      const size_t eb = fp8 ? 1 : 2;
      void *A, *B, *D;
      CHECK(cudaMalloc(&A, size_t(g.m) * g.k * eb));
      CHECK(cudaMalloc(&B, size_t(g.k) * g.n * eb));
      CHECK(cudaMalloc(&D, size_t(g.m) * g.n * 4));
      CHECK(cudaMemset(A, 0x11, size_t(g.m) * g.k * eb));
      CHECK(cudaMemset(B, 0x11, size_t(g.k) * g.n * eb));
      const Result r = run(g, A, B, D);
      const double flop = 2.0 * g.m * g.n * g.k;
      const double ref_ms = fp8 ? r.first_ms : r.default_ms;
      std::printf("%-26s %6d %6d %6d %9.3f %9.3f %9.3f %2d/%-2d %9.0f\n", g.name, g.m, g.n, g.k,
                  r.default_ms, r.first_ms, r.best_ms, r.best_index, r.candidates,
                  flop / r.best_ms / 1e9);
      tot_default += ref_ms * g.per_step;
      tot_first += r.first_ms * g.per_step;
      tot_best += r.best_ms * g.per_step;
      CHECK(cudaFree(A));
      CHECK(cudaFree(B));
      CHECK(cudaFree(D));
    }
  }
  std::printf("per step (linears): %s %.2f ms, lt first %.2f ms, lt best %.2f ms\n",
              fp8 ? "lt first" : "cublas default", tot_default, tot_first, tot_best);
}

}  // namespace

int main() {
  BCHECK(cublasLtCreate(&lt));
  BCHECK(cublasCreate(&blas));
  CHECK(cudaMalloc(&workspace, kWorkspaceBytes));
  BCHECK(cublasSetWorkspace(blas, workspace, kWorkspaceBytes));
  CHECK(cudaMalloc(&scales, 8));
  const float ones[2] = {1.f, 1.f};
  CHECK(cudaMemcpy(scales, ones, 8, cudaMemcpyHostToDevice));
  // 1B: dim 2048, 32 heads x 64 (8 kv), ffn 8192, 16 layers, 4 x 2048 tokens, no AC.
  const std::vector<std::pair<int, int>> l1 = {
      {3072, 2048}, {2048, 2048}, {16384, 2048}, {2048, 8192}};
  // 3B: dim 3072, 24 heads x 128 (8 kv), ffn 8192, 28 layers, 2 x 4096 tokens, every 2nd block
  // recomputed.
  const std::vector<std::pair<int, int>> l3 = {
      {5120, 3072}, {3072, 3072}, {16384, 3072}, {3072, 8192}};
  model("1B", 8192, 16, 1.0, l1, false, 128256, 2048);
  model("3B", 8192, 28, 1.5, l3, false, 128256, 3072);
  model("1B", 8192, 16, 1.0, l1, true);
  model("3B", 8192, 28, 1.5, l3, true);
  return 0;
}
