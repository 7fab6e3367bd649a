// titan_bench_float8: where float8 pays for one linear layer on this GPU. For M tokens and a
// grid of K (input) x N (output) features, times the three GEMMs of a projection (y = x W^T,
// dx = dy W, dW = dy^T x into an fp32 gradient) through titan's bf16 Linear and through its
// float8 tensorwise Linear (fused amax/cast kernels, packed transposed operands, _scaled_mm),
// and prints the speedup per shape and the smallest feature count from which every shape
// gains: the measurement behind quantize.linear.float8's auto_filter_small_kn rule.
// Usage: titan_bench_float8 [--tokens M] [--iters N]
#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "titan/ops/float8.h"
#include "titan/ops/linear.h"
#include "titan/util/device.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace {

using namespace titan;

// Milliseconds per call of `fn` (after warm-up), timed between device synchronizations.
template <typename F>
double time_ms(const c10::Device& device, int iters, F&& fn) {
  for (int i = 0; i < 3; ++i) fn();
  synchronize(device);
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  synchronize(device);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() /
         iters;
}

// Forward, input gradient and weight gradient of one projection.
void linear_step(const ops::Linear& lin, const at::Tensor& x, const at::Tensor& w,
                 const at::Tensor& dy, const at::Tensor& grad_w) {
  at::Tensor x_for_weight, dy_for_weight;
  lin.forward(x, w, &x_for_weight);
  lin.backward_input(dy, w, &dy_for_weight);
  lin.backward_weight(dy_for_weight, x_for_weight, grad_w, /*accumulate=*/false);
}

int run(int argc, char** argv) {
  int64_t tokens = 8192;
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tokens" && i + 1 < argc) {
      TITAN_CHECK(util::parse_int(argv[++i], tokens) && tokens > 0,
                  "--tokens: expected a positive integer");
    } else if (a == "--iters" && i + 1 < argc) {
      int64_t n = 0;
      TITAN_CHECK(util::parse_int(argv[++i], n) && n > 0, "--iters: expected a positive integer");
      iters = static_cast<int>(n);
    } else {
      fail("unknown argument \"", a, "\"; usage: titan_bench_float8 [--tokens M] [--iters N]");
    }
  }
  TITAN_CHECK(cuda_device_count() > 0,
              "titan_bench_float8 times float8 GEMMs: it needs an NVIDIA GPU with compute "
              "capability 8.9 or newer");
  const c10::Device device(c10::kCUDA, 0);
  const std::vector<int64_t> sizes = {512, 1024, 2048, 3072, 4096, 8192, 14336};
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(device);
  const ops::Float8Linear float8(ops::Float8Recipe::Tensorwise, /*emulate=*/false);
  std::printf(
      "%s: M = %lld tokens; bf16 / float8 time of a projection's three GEMMs with "
      "titan's kernels (> 1: float8 faster)\n",
      describe_device(device).name.c_str(), static_cast<long long>(tokens));
  std::printf("K \\ N ");
  for (int64_t n : sizes) std::printf("%8lld", static_cast<long long>(n));
  std::printf("\n");
  std::map<std::pair<int64_t, int64_t>, double> gain;
  for (int64_t k : sizes) {
    std::printf("%6lld", static_cast<long long>(k));
    for (int64_t n : sizes) {
      const at::Tensor x = at::randn({tokens, k}, bf16);
      const at::Tensor w = at::randn({n, k}, bf16) * 0.02;
      const at::Tensor dy = at::randn({tokens, n}, bf16);
      const at::Tensor grad_w = at::empty({n, k}, bf16.dtype(at::kFloat));
      const double t_bf16 =
          time_ms(device, iters, [&] { linear_step(ops::plain_linear(), x, w, dy, grad_w); });
      const double t_f8 = time_ms(device, iters, [&] { linear_step(float8, x, w, dy, grad_w); });
      gain[{k, n}] = t_bf16 / t_f8;
      std::printf("%8.2f", t_bf16 / t_f8);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
  for (int64_t t : sizes) {
    bool all = true;
    for (const auto& [kn, r] : gain) {
      if (kn.first >= t && kn.second >= t && r <= 1.0) all = false;
    }
    if (all) {
      std::printf("every shape with K >= %lld and N >= %lld gains from float8\n",
                  static_cast<long long>(t), static_cast<long long>(t));
      return 0;
    }
  }
  std::printf("no feature count from which every shape gains\n");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const titan::Error& e) {
    std::fprintf(stderr, "titan_bench_float8: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {  // e.g. a GPU without float8 GEMMs
    std::fprintf(stderr, "titan_bench_float8: %s\n", e.what());
    return 1;
  }
}
