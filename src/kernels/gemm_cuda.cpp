// bf16 and float8 (tensorwise-scaled) GEMMs through cuBLASLt with the algorithm chosen by timing:
// at a shape's first use titan times cuBLASLt's candidate algorithms on the real operands and
// keeps the fastest for the run (TITAN_GEMM_TUNING=0 keeps cuBLAS's own pick, through ATen).
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
// the three operand types, the three operands' alignments, whether a separate addend is read,
// and float8's fast accumulation.
using Key = std::array<int64_t, 17>;
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
  // debug.deterministic (ATen's deterministic mode): no choice by timing, which can differ from
  // run to run; cuBLAS's heuristic pick depends on the shapes alone.
  return enabled && !at::globalContext().deterministicAlgorithms();
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

namespace {

// One column-major product D[m, n] = alpha op(first) op(second) + beta C (C: the addend, or D
// itself when accumulating), with float8 dequantization scales where given.
struct Problem {
  int device = 0;
  bool trans_first = false, trans_second = false;
  int64_t m = 0, n = 0, k = 0;
  const void* first = nullptr;
  const void* second = nullptr;
  int64_t ld_first = 0, ld_second = 0, ld_out = 0;
  cudaDataType_t type_first = CUDA_R_16BF, type_second = CUDA_R_16BF, type_out = CUDA_R_16BF;
  void* out = nullptr;
  const void* c = nullptr;  // the addend or out
  bool accumulate = false, has_addend = false;
  const void* scale_first = nullptr;   // device fp32 (float8 operands)
  const void* scale_second = nullptr;  // device fp32 (float8 operands)
  bool fast_accum = false;
};

const char* type_name(cudaDataType_t t) {
  switch (t) {
    case CUDA_R_16BF: return "bf16";
    case CUDA_R_32F: return "fp32";
    case CUDA_R_8F_E4M3: return "e4m3";
    case CUDA_R_8F_E5M2: return "e5m2";
    default: return "?";
  }
}

// Runs `p` with its shape's tuned algorithm (timing the candidates at the first call that may
// overwrite the output); false, with nothing done, where cuBLASLt offers or launches nothing.
bool run(const Problem& p, const at::Tensor& like) {
  const c10::cuda::CUDAGuard device_guard(like.device());
  const Key key = {p.device,
                   p.trans_first,
                   p.trans_second,
                   p.m,
                   p.n,
                   p.k,
                   p.ld_first,
                   p.ld_second,
                   p.ld_out,
                   (int64_t{p.type_first} << 16) | (int64_t{p.type_second} << 8) | p.type_out,
                   alignment_of(p.first),
                   alignment_of(p.second),
                   std::min(alignment_of(p.out), alignment_of(p.c)),
                   p.has_addend,
                   p.fast_accum,
                   p.scale_first != nullptr,
                   p.scale_second != nullptr};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream().stream();
  at::Tensor workspace = at::empty({kWorkspaceBytes}, like.options().dtype(at::kByte));
  const float alpha = 1.f, beta = p.accumulate || p.has_addend ? 1.f : 0.f;
  std::lock_guard<std::mutex> lock(g_mu);
  cublasLtHandle_t lt = handle_for(p.device);
  Plan& plan = g_plans[key];
  if (plan.unusable) return false;
  if (!plan.desc) {
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t op_first = p.trans_first ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_second = p.trans_second ? CUBLAS_OP_T : CUBLAS_OP_N;
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA,
                                                      &op_first, sizeof(op_first)));
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB,
                                                      &op_second, sizeof(op_second)));
    if (p.fast_accum) {
      const int8_t on = 1;
      TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                                                        &on, sizeof(on)));
    }
    // Stored (column-major) dims: first is m x k (k x m when transposed), second k x n (n x k).
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.first, p.type_first,
                                                  p.trans_first ? p.k : p.m,
                                                  p.trans_first ? p.m : p.k, p.ld_first));
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.second, p.type_second,
                                                  p.trans_second ? p.n : p.k,
                                                  p.trans_second ? p.k : p.n, p.ld_second));
    TITAN_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&plan.out, p.type_out, p.m, p.n, p.ld_out));
  }
  // This call's scale pointers (read when the product is launched).
  if (p.scale_first) {
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        plan.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &p.scale_first, sizeof(p.scale_first)));
  }
  if (p.scale_second) {
    TITAN_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(
        plan.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &p.scale_second, sizeof(p.scale_second)));
  }
  auto launch = [&](const cublasLtMatmulAlgo_t* algo) {
    return cublasLtMatmul(lt, plan.desc, &alpha, p.first, plan.first, p.second, plan.second, &beta,
                          p.c, plan.out, p.out, plan.out, algo, workspace.data_ptr(),
                          kWorkspaceBytes, stream);
  };
  // Timing overwrites the output, so only a call that overwrites it anyway (no accumulation
  // into it, not captured into a CUDA graph) tunes; the others use the heuristic's first pick
  // meanwhile.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool may_tune = !p.accumulate && capture == cudaStreamCaptureStatusNone;
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
      log::debug("gemm {}x{}x{} ({} x {}): cuBLASLt offers no algorithm; ATen runs it", p.n, p.m,
                 p.k, type_name(p.type_second), type_name(p.type_first));
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
        if (launch(&found[i].algo) != CUBLAS_STATUS_SUCCESS) continue;
        constexpr int kReps = 3;
        C10_CUDA_CHECK(cudaEventRecord(t0, stream));
        for (int r = 0; r < kReps; ++r) TITAN_CUBLAS_CHECK(launch(&found[i].algo));
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
      // Row-major terms: out[n, m] = (second)^T-side [n, k] times the first's [k, m].
      log::debug("gemm {}x{}x{} ({} x {} -> {}{}): algorithm {} of {}, {:.3f} ms (first {:.3f} ms)",
                 p.n, p.m, p.k, type_name(p.type_second), type_name(p.type_first),
                 type_name(p.type_out), p.fast_accum ? ", fast accumulation" : "", best, count,
                 best_ms, first_ms);
    }
  }
  TITAN_CUBLAS_CHECK(launch(&plan.algo));
  return true;
}

}  // namespace

bool gemm(const at::Tensor& a, bool transpose_a, const at::Tensor& b, bool transpose_b,
          const at::Tensor& out, bool accumulate, const at::Tensor& addend) {
  TITAN_INTERNAL_CHECK(gemm_supported(a, b, out), "gemm: unsupported operands");
  TITAN_INTERNAL_CHECK(
      !addend.defined() || (!accumulate && addend.scalar_type() == out.scalar_type() &&
                            addend.sizes() == out.sizes() && addend.strides() == out.strides() &&
                            addend.data_ptr() != out.data_ptr()),
      "gemm: the addend must be laid out as the output, and apart from it");
  const int64_t M = out.size(0), N = out.size(1);
  const int64_t K = transpose_a ? a.size(0) : a.size(1);
  TITAN_INTERNAL_CHECK((transpose_a ? a.size(1) : a.size(0)) == M &&
                           (transpose_b ? b.size(1) : b.size(0)) == K &&
                           (transpose_b ? b.size(0) : b.size(1)) == N,
                       "gemm: shapes do not agree");
  // Row-major out[M, N] is column-major out^T[N, M] = op(b)^T op(a)^T. Read column-major, b's
  // buffer holds b^T, so cuBLAS's first operand is b's buffer, transposed where b is, and the
  // second is a's.
  Problem p;
  p.device = a.get_device();
  p.trans_first = transpose_b;
  p.trans_second = transpose_a;
  p.m = N;
  p.n = M;
  p.k = K;
  p.first = b.data_ptr();
  p.second = a.data_ptr();
  p.ld_first = b.stride(0);
  p.ld_second = a.stride(0);
  p.ld_out = out.stride(0);
  p.type_out = out.scalar_type() == at::kFloat ? CUDA_R_32F : CUDA_R_16BF;
  p.out = out.data_ptr();
  p.c = addend.defined() ? addend.data_ptr() : out.data_ptr();
  p.accumulate = accumulate;
  p.has_addend = addend.defined();
  return run(p, a);
}

bool gemm_float8(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& scale_a,
                 const at::Tensor& scale_b, const at::Tensor& out, bool fast_accum,
                 const at::Tensor& addend) {
  auto float8 = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat8_e4m3fn || t.scalar_type() == at::kFloat8_e5m2;
  };
  // cuBLASLt declines operands or scales that do not start on 16 bytes (NOT_SUPPORTED).
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  auto scalar = [&](const at::Tensor& s) {
    return s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == a.device() &&
           aligned(s);
  };
  auto rows16 = [&](const at::Tensor& t) {
    return t.dim() == 2 && t.device() == a.device() && t.numel() > 0 && t.stride(1) == 1 &&
           t.stride(0) >= t.size(1) && t.stride(0) % 16 == 0 && t.size(0) % 16 == 0 &&
           t.size(1) % 16 == 0 && aligned(t);
  };
  if (!a.is_cuda() || !float8(a) || !float8(bt) ||
      (a.scalar_type() == at::kFloat8_e5m2 && bt.scalar_type() == at::kFloat8_e5m2) ||
      !scalar(scale_a) || !scalar(scale_b) || !rows16(a) || !rows16(bt) ||
      (out.scalar_type() != at::kBFloat16 && out.scalar_type() != at::kFloat) || out.dim() != 2 ||
      out.device() != a.device() || out.stride(1) != 1 || out.stride(0) < out.size(1) ||
      out.stride(0) % 8 != 0 || a.size(1) != bt.size(1) || out.size(0) != a.size(0) ||
      out.size(1) != bt.size(0)) {
    return false;
  }
  if (addend.defined() &&
      (addend.scalar_type() != out.scalar_type() || addend.sizes() != out.sizes() ||
       addend.strides() != out.strides() || addend.device() != out.device() ||
       addend.data_ptr() == out.data_ptr() || !aligned(addend))) {
    return false;
  }
  auto type_of = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat8_e4m3fn ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2;
  };
  // Row-major out[M, N] = a[M, K] bt[N, K]^T is column-major out^T[N, M] = bt^T-as-stored
  // transposed times a: the first operand is bt's buffer (transposed), the second a's (as
  // stored): the "TN" layout float8 products need.
  Problem p;
  p.device = a.get_device();
  p.trans_first = true;
  p.trans_second = false;
  p.m = bt.size(0);
  p.n = a.size(0);
  p.k = a.size(1);
  p.first = bt.data_ptr();
  p.second = a.data_ptr();
  p.ld_first = bt.stride(0);
  p.ld_second = a.stride(0);
  p.ld_out = out.stride(0);
  p.type_first = type_of(bt);
  p.type_second = type_of(a);
  p.type_out = out.scalar_type() == at::kFloat ? CUDA_R_32F : CUDA_R_16BF;
  p.out = out.data_ptr();
  p.c = addend.defined() ? addend.data_ptr() : out.data_ptr();
  p.has_addend = addend.defined();
  p.scale_first = scale_b.data_ptr();
  p.scale_second = scale_a.data_ptr();
  p.fast_accum = fast_accum;
  return run(p, a);
}

}  // namespace titan::kernels
