// Helpers shared by the test suites: temporary folders, running titan_train, comparing tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <string>
#include <vector>

#include "titan/model/llama_args.h"
#include "titan/parallel/fsdp.h"

namespace titan::test {

// A fresh folder under the system temp dir, removed on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

struct ProcessResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs `argv` (argv[0] a path) with extra environment entries, capturing its output.
ProcessResult run_process(const std::vector<std::string>& argv,
                          const std::vector<std::string>& env = {});
// Runs titan_train with `args`.
ProcessResult run_titan_train(const std::vector<std::string>& args,
                              const std::vector<std::string>& env = {});

std::string read_file(const std::string& path);
void write_file(const std::string& path, const std::string& text);

// ||a - b|| / ||b|| in float64.
double relative_error(const at::Tensor& a, const at::Tensor& b);

// GPU tests: options of dtype `t` on the CUDA device, and the relative tolerance of a kernel's
// output against its fp32-internal ATen reference (bf16 outputs are rounded once more).
at::TensorOptions cuda_options(at::ScalarType t);
double kernel_tolerance(at::ScalarType t);

// Causal grouped-query attention of q [B, S, H, hd], k/v [B, S, Hkv, hd] (any device or
// dtype) computed in fp32 with autograd: the output [B, S, H, hd] and the gradients of q, k, v
// for `dout`.
struct AttentionResult {
  at::Tensor out, dq, dk, dv;
};
AttentionResult causal_attention_reference(const at::Tensor& q, const at::Tensor& k,
                                           const at::Tensor& v, const at::Tensor& dout);
// The same through TeraPipe's TokenSliceAttention: token slices of `lengths` forward in order
// (each attending to the keys/values cached from the earlier ones), backward in reverse;
// results in q's dtype, assembled over the sequence.
AttentionResult sliced_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& dout, const std::vector<int64_t>& lengths);

// The message of the titan::Error `fn` throws, or "" when it throws none.
std::string error_of(const std::function<void()>& fn);

// Losses per step from a metrics.jsonl file.
std::vector<double> read_losses(const std::string& jsonl_path);

// The Python used for cross-checks: $TITAN_TEST_PYTHON, else the first python3 on PATH, else
// /usr/bin/python3.
std::string python();
// Whether that Python can run `import <modules>`.
bool python_can_import(const std::string& modules);

// One optimizer step's forward and backward of `tokens` ([B, S + 1]) through the whole model
// as one pipeline stage, with the activation-checkpoint mode and option of the config; weight
// gradients land in `fsdp`'s shard gradients (reductions finished). Returns the loss sum.
at::Tensor single_stage_step(const model::LlamaArgs& args, parallel::FsdpModel& fsdp,
                             const at::Tensor& tokens, double grad_scale,
                             const std::string& ac_mode = "none",
                             const std::string& ac_option = "2");

// A tensor of a titan checkpoint step folder, assembled from its chunks (stored dtype, full
// shape); `name` as the index lists it ("layers.0.attention.wq.weight", "optim.exp_avg/...").
at::Tensor read_checkpoint_tensor(const std::string& step_dir, const std::string& name);
// Every model weight of a checkpoint step folder, by parameter name.
std::map<std::string, at::Tensor> read_checkpoint_weights(const std::string& step_dir);

// Whether this build can run several CPU ranks (LibTorch with Gloo; pip wheels ship none).
bool gloo_available();

}  // namespace titan::test

// Skips a test that needs several CPU processes where the build has no Gloo (GPU builds
// against a pip PyTorch), saying so.
#define TITAN_REQUIRE_GLOO()                                                                \
  do {                                                                                      \
    if (!::titan::test::gloo_available())                                                   \
      GTEST_SKIP() << "needs several CPU ranks, and this LibTorch has no Gloo (pip wheel)"; \
  } while (0)

namespace titan::test {

// Starts `world` processes of `argv` as ranks of one job on loopback (RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT set; a free port chosen), waits up to
// `timeout_s` and kills whatever still runs. `ranks_to_start` (empty: all) starts a subset;
// `rank_env[r]` adds (or overrides) environment entries (NAME=VALUE) of rank r only; its other
// entries (options and their values) are appended to that rank's arguments.
std::vector<ProcessResult> run_ranks(const std::vector<std::string>& argv, int world,
                                     const std::vector<std::string>& env, double timeout_s,
                                     const std::vector<int>& ranks_to_start = {},
                                     const std::vector<std::vector<std::string>>& rank_env = {});
// A TCP port free on 127.0.0.1 right now.
int free_port();

}  // namespace titan::test
