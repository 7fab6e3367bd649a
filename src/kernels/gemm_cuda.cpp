// bf16 GEMMs through cuBLASLt with the algorithm chosen by timing: at a shape's first use titan
// times cuBLASLt's candidate algorithms on the real operands and keeps the fastest for the run
// (TITAN_GEMM_TUNING=0 keeps cuBLAS's own pick, through ATen).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <array>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "cublas_check.h"
#include "titan/kernels/kernels.h"
#include "titan/util/error.h"
#include "titan/util/log.h"

namespace titan::kernels {
namespace {

constexpr int64_t kWorkspaceBytes = int64_t(32) << 20;
constexpr int kCandidates = 16;

// Everything that can change which algorithm is valid or fastest: device, the column-major
// problem (first operand transposed, second transposed, m, n, k, the three leading dimensions),
// the output type, the three operands' alignments and whether a separate addend is read.
using Key = std::array<int64_t, 14>;
struct KeyHash {
  size_t operator()(const Key& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

// One shape's descriptors and its chosen algorithm.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t first = nullptr, second = nullptr, out = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool have_algo = false;  // the heuristic's first pick, until tuned
  bool tuned = false;
  bool unusable = false;  // cuBLASLt offers nothing for these operands
};

std::mutex g_mu;
std::unordered_map<Key, Plan, KeyHash> g_plans;
std::unordered_map<int, cublasLtHandle_t> g_handles;

int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int align = 256;
  while (align > 1 && a % align != 0) align /= 2;
  return align;
}

cublasLtHandle_t handle_for(int device) {
  auto it = g_handles.find(device);
  if (it != g_handles.end()) return it->second;
  cublasLtHandle_t h;
  TITAN_CUBLAS_CHECK(cublasLtCreate(&h));
  g_handles[device] = h;
  return h;
}

}  // namespace

bool gemm_tuning_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("TITAN_GEMM_TUNING");
    if (!v || std::string(v).empty() || std::string(v) == "1") return true;
    TITAN_CHECK(std::string(v) == "0", "TITAN_GEMM_TUNING: expected 0 or 1, got '", v, "'");
    return false;
  }();
  return enabled;
}

bool gemm_supported(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out) {
  auto unit_cols = [](const at::Tensor& t) {
    return t.dim() == 2 && t.stride(1) == 1 && t.stride(0) >= std::max<int64_t>(1, t.size(1)) &&
           t.stride(0) % 8 == 0;
  };
  return a.is_cuda() && a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 &&
         (out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kFloat) && unit_cols(a) &&
         unit_cols(b) && unit_cols(out) && a.numel() > 0 && b.numel() > 0 && out.numel() > 0;
}

bool gemm(const at::Tensor& a, bool transpose_a, const at::Tensor& b, bool transpose_b,
          const at::Tensor& out, bool accumulate, const at::Tensor& addend) {
  TITAN_INTERNAL_CHECK(gemm_supported(a, b, out), "gemm: unsupported operands");
  TITAN_INTERNAL_CHECK(
      !addend.defined() || (!accumulate && addend.scalar_type() == out.scalar_type() &&
                            addend.sizes() == out.sizes() && addend.strides() == out.strides() &&
                            addend.data_ptr() != out.data_ptr()),
      "gemm: the addend must be laid out as the output, and apart from it");
  const c10::cuda::CUDAGuard device_guard(a.device());
  const int64_t M = out.size(0), N = out.size(1);
  const int64_t K = transpose_a ? a.size(0) : a.size(1);
  TITAN_INTERNAL_CHECK((transpose_a ? a.size(1) : a.size(0)) == M &&
                           (transpose_b ? b.size(1) : b.size(0)) == K &&
                           (transpose_b ? b.size(0) : b.size(1)) == N,
                       "gemm: shapes do not agree");
  // Row-major out[M, N] is column-major out^T[N, M] = op(b)^T op(a)^T. Read column-major, b's
  // buffer holds b^T, so cuBLAS's first operand is b's buffer, transposed where b is, and the
  // second is a's.
  const bool fp32_out = out.scalar_type() == at::kFloat;
  const Key key = {a.get_device(),
                   transpose_b,
                   transpose_a,
                   N,
                   M,
                   K,
                   b.stride(0),
                   a.stride(0),
                   out.stride(0),
                   fp32_out,
                   alignment_of(b.data_ptr()),
                   alignment_of(a.data_ptr()),
                   std::min(alignment_of(out.data_ptr()),
                            addend.defined() ? alignment_of(addend.data_ptr()) : 256),
                   addend.defined()};
  const bool trans_first = transpose_b, trans_second = transpose_a;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  at::Tensor workspace = at::empty({kWorkspaceBytes}, a.options().dtype(at::kByte));
  const float alpha = 1.f, beta = accumulate || addend.defined() ? 1.f : 0.f;
  const void* c = addend.defined() ? addend.data_ptr() : out.data_ptr();
  std::lock_guard<std::mutex> lock(g_mu);
  cublasLtHandle_t lt = handle_for(a.get_device());
  Plan& plan = g_plans[key];
  if (plan.unusable) return false;
  if (!plan.desc) {
    const cudaDataType_t out_type = fp32_out ? CUDA_R_32F : CUDA_R_16BF;
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_first = trans_first ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = trans_second ? CUBLAS_OP_T : CUBLAS_OP_N;
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                      &op_first, sizeof(op_first)));
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                      &op_second, sizeof(op_second)));
    // Stored (column-major) dims: first is N x K (K x N when transposed), second K x M (M x K).
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.first, CUDA_R_16BF, trans_first ? K : N,
                                                  trans_first ? N : K, b.stride(0)));
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.second, CUDA_R_16BF, trans_second ? M : K,
                                                  trans_second ? K : M, a.stride(0)));
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.out, out_type, N, M, out.stride(0)));
  }
  // Timing overwrites `out`, so only a call that overwrites it anyway (no accumulation into it,
  // not captured into a CUDA graph) tunes; the others use the heuristic's first pick meanwhile.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool may_tune = !accumulate && capture == cudaStreamCaptureStatusNone;
  if (!plan.tuned && (may_tune || !plan.have_algo)) {
    cublasLtMatmulPreference_t pref;
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = kWorkspaceBytes;
    const uint32_t al[3] = {static_cast<uint32_t>(key[10]), static_cast<uint32_t>(key[11]),
                            static_cast<uint32_t>(key[12])};
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al[0], sizeof(al[0])));
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al[1], sizeof(al[1])));
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al[2], sizeof(al[2])));
    TITAN_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al[2], sizeof(al[2])));
    cublasLtMatmulHeuristicResult_t found[kCandidates];
    int count = 0;
    const cublasStatus_t heuristic =
        cublasLtMatmulAlgoGetHeuristic(lt, plan.desc, plan.first, plan.second, plan.out, plan.out,
                                       pref, kCandidates, found, &count);
    cublasLtMatmulPreferenceDestroy(pref);
    if (heuristic != CUBLAS_STATUS_SUCCESS || count == 0) {
      log::debug("gemm {}x{}x{}: cuBLASLt offers no algorithm; ATen runs it", M, N, K);
      plan.unusable = true;
      return false;
    }
    plan.algo = found[0].algo;
    plan.have_algo = true;
    plan.tuned = count == 1;
    if (may_tune && count > 1) {
      cudaEvent_t t0, t1;
      C10_CUDA_CHECK(cudaEventCreate(&t0));
      C10_CUDA_CHECK(cudaEventCreate(&t1));
      float best_ms = -1, first_ms = -1;
      int best = 0;
      for (int i = 0; i < count; ++i) {
        auto launch = [&] {
          return cublasLtMatmul(lt, plan.desc, &alpha, b.data_ptr(), plan.first, a.data_ptr(),
                                plan.second, &beta, c, plan.out, out.data_ptr(), plan.out,
                                &found[i].algo, workspace.data_ptr(), kWorkspaceBytes, stream);
        };
        if (launch() != CUBLAS_STATUS_SUCCESS) continue;
        constexpr int kReps = 3;
        C10_CUDA_CHECK(cudaEventRecord(t0, stream));
        for (int r = 0; r < kReps; ++r) TITAN_CUBLAS_CHECK(launch());
        C10_CUDA_CHECK(cudaEventRecord(t1, stream));
        C10_CUDA_CHECK(cudaEventSynchronize(t1));
        float ms = 0;
        C10_CUDA_CHECK(cudaEventElapsedTime(&ms, t0, t1));
        ms /= kReps;
        if (i == 0) first_ms = ms;
        if (best_ms < 0 || ms < best_ms) {
          best_ms = ms;
          best = i;
        }
      }
      C10_CUDA_CHECK(cudaEventDestroy(t0));
      C10_CUDA_CHECK(cudaEventDestroy(t1));
      if (best_ms < 0) {  // no candidate launched on these operands
        plan.unusable = true;
        return false;
      }
      plan.algo = found[best].algo;
      plan.tuned = true;
      log::debug("gemm {}x{}x{} ({}{}, {} out): algorithm {} of {}, {:.3f} ms (first {:.3f} ms)", M,
                 N, K, transpose_a ? "aT" : "a", transpose_b ? " bT" : " b",
                 fp32_out ? "fp32" : "bf16", best, count, best_ms, first_ms);
    }
  }
  TITAN_CUBLAS_CHECK(cublasLtMatmul(lt, plan.desc, &alpha, b.data_ptr(), plan.first, a.data_ptr(),
                                    plan.second, &beta, c, plan.out, out.data_ptr(), plan.out,
                                    &plan.algo, workspace.data_ptr(), kWorkspaceBytes, stream));
  return true;
}

}  // namespace titan::kernels
