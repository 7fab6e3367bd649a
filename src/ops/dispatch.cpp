// The fused-kernel switch.
#include "titan/ops/dispatch.h"

#include <atomic>

namespace titan::ops {
namespace {
std::atomic<bool> g_fused{true};
}

void set_fused_kernels(bool enabled) {
  g_fused = enabled;
}
bool fused_kernels_enabled() {
  return g_fused;
}

bool use_fused(const at::Tensor& t) {
#ifdef TITAN_WITH_CUDA
  return g_fused && t.is_cuda();
#else
  (void)t;
  return false;
#endif
}

}  // namespace titan::ops
