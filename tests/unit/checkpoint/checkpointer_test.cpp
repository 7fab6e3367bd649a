// The checkpointer in one process: a save loads back into a differently initialized model and
// optimizer exactly, model-only saves hold the export dtype, only indexed step folders count,
// retention keeps the newest k, and a checkpoint of another model shape is refused.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <memory>

#include "support/reference_llama.h"
#include "support/test_support.h"
#include "titan/checkpoint/checkpointer.h"
#include "titan/dist/runtime.h"
#include "titan/model/layout.h"
#include "titan/parallel/fsdp.h"
#include "titan/train/optimizer.h"
#include "titan/util/error.h"

using namespace titan;
namespace fs = std::filesystem;

namespace {

// A one-process job on the CPU: config, runtime, tiny model and its optimizer.
struct Job {
  config::JobConfig cfg;
  std::unique_ptr<dist::Runtime> runtime;
  model::LlamaArgs args = test::tiny_llama_args();
  std::unique_ptr<parallel::FsdpModel> fsdp;
  std::unique_ptr<train::Optimizer> optimizer;
  std::unique_ptr<checkpoint::Checkpointer> ck;

  Job(const std::string& dump_folder, int64_t seed, int64_t keep_latest_k = 10) {
    cfg.job.dump_folder = dump_folder;
    cfg.checkpoint.enable = true;
    cfg.checkpoint.keep_latest_k = keep_latest_k;
    runtime = std::make_unique<dist::Runtime>(dist::LaunchEnv{}, cfg, c10::Device(c10::kCPU));
    fsdp = std::make_unique<parallel::FsdpModel>(model::llama_units(args), nullptr, nullptr,
                                                 c10::Device(c10::kCPU), parallel::FsdpOptions{});
    fsdp->init_weights(seed);
    optimizer = std::make_unique<train::Optimizer>(fsdp->master_shards(), fsdp->grad_shards(),
                                                   train::OptimizerOptions{});
    checkpoint::TrainerState state;
    state.model = fsdp.get();
    state.optimizer = optimizer.get();
    state.args = args;
    state.flavor = "tiny";
    ck = std::make_unique<checkpoint::Checkpointer>(cfg, *runtime, state);
  }

  // Optimizer steps on random gradients, so weights and moments are far from their init.
  void train_steps(int n) {
    for (int s = 0; s < n; ++s) {
      for (size_t i = 0; i < fsdp->num_units(); ++i) fsdp->unit(i).grad.normal_();
      optimizer->step(1e-2, at::Tensor());
    }
  }
};

// Every parameter's values (padding excluded), unit by unit.
std::vector<at::Tensor> params_of(const parallel::FsdpModel& m,
                                  const std::vector<at::Tensor>& flat) {
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < m.num_units(); ++i) {
    for (const auto& p : m.unit(i).layout.params)
      out.push_back(flat[i].narrow(0, p.offset, p.numel));
  }
  return out;
}

void expect_all_equal(const std::vector<at::Tensor>& a, const std::vector<at::Tensor>& b,
                      const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i], b[i])) << what << " #" << i;
}

}  // namespace

TEST(CheckpointSaveLoad, FullSaveRestoresWeightsMomentsAndStepCount) {
  test::TempDir dir;
  Job a(dir.path(), /*seed=*/1);
  a.train_steps(3);
  a.ck->save(7, /*model_only=*/false, at::kFloat);
  const auto steps = checkpoint::Checkpointer::complete_steps(a.ck->folder());
  ASSERT_EQ(steps.size(), 1u);
  EXPECT_EQ(steps[0].first, 7);

  Job b(dir.file("other"), /*seed=*/2);
  const auto before = params_of(*b.fsdp, b.fsdp->master_shards());
  EXPECT_FALSE(at::equal(before[0], params_of(*a.fsdp, a.fsdp->master_shards())[0]));
  EXPECT_EQ(b.ck->load(steps[0].second, {"model", "optimizer", "train_state"}), 7);
  expect_all_equal(params_of(*b.fsdp, b.fsdp->master_shards()),
                   params_of(*a.fsdp, a.fsdp->master_shards()), "weights");
  expect_all_equal(params_of(*b.fsdp, b.optimizer->exp_avg()),
                   params_of(*a.fsdp, a.optimizer->exp_avg()), "exp_avg");
  expect_all_equal(params_of(*b.fsdp, b.optimizer->exp_avg_sq()),
                   params_of(*a.fsdp, a.optimizer->exp_avg_sq()), "exp_avg_sq");
  EXPECT_EQ(b.optimizer->step_count(), 3);
}

TEST(CheckpointSaveLoad, ModelOnlySaveHoldsExportDtypeAndLeavesOptimizerFresh) {
  test::TempDir dir;
  Job a(dir.path(), 1);
  a.train_steps(2);
  a.ck->save(4, /*model_only=*/true, at::kBFloat16);
  Job b(dir.file("other"), 2);
  b.ck->load(a.ck->folder() + "/step-4", {"model", "optimizer"});
  const auto want = params_of(*a.fsdp, a.fsdp->master_shards());
  const auto have = params_of(*b.fsdp, b.fsdp->master_shards());
  ASSERT_EQ(want.size(), have.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_TRUE(at::equal(have[i], want[i].to(at::kBFloat16).to(at::kFloat))) << i;
  }
  EXPECT_EQ(b.optimizer->step_count(), 0);
  for (const auto& m : b.optimizer->exp_avg()) EXPECT_EQ(m.abs().sum().item<double>(), 0.0);
}

TEST(CheckpointSaveLoad, OnlyIndexedStepFoldersAreComplete) {
  test::TempDir dir;
  for (const char* d : {"step-5", "step-12", "step-7.partial", "step-9", "step-x", "other"}) {
    fs::create_directories(dir.file(d));
  }
  for (const char* d : {"step-5", "step-12", "step-7.partial", "step-x", "other"}) {
    test::write_file(dir.file(d) + "/metadata.json", "{}");
  }
  test::write_file(dir.file("step-11"), "a file, not a folder");
  const auto steps = checkpoint::Checkpointer::complete_steps(dir.path());
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].first, 5);
  EXPECT_EQ(steps[1].first, 12);  // numeric order, not lexicographic
  EXPECT_EQ(fs::path(steps[1].second).filename(), "step-12");
  EXPECT_TRUE(checkpoint::Checkpointer::complete_steps(dir.file("missing")).empty());
}

TEST(CheckpointSaveLoad, RetentionKeepsTheNewestK) {
  test::TempDir dir;
  Job a(dir.path(), 1, /*keep_latest_k=*/2);
  for (int64_t step : {1, 2, 3, 4}) a.ck->save(step, false, at::kFloat);
  const auto steps = checkpoint::Checkpointer::complete_steps(a.ck->folder());
  ASSERT_EQ(steps.size(), 2u);
  EXPECT_EQ(steps[0].first, 3);
  EXPECT_EQ(steps[1].first, 4);
  EXPECT_FALSE(fs::exists(a.ck->folder() + "/step-1"));
  EXPECT_FALSE(fs::exists(a.ck->folder() + "/step-2"));
}

TEST(CheckpointSaveLoad, CheckpointOfAnotherModelShapeIsRefused) {
  test::TempDir dir;
  Job a(dir.path(), 1);
  a.ck->save(1, true, at::kFloat);
  config::JobConfig cfg;
  cfg.job.dump_folder = dir.file("other");
  dist::Runtime runtime(dist::LaunchEnv{}, cfg, c10::Device(c10::kCPU));
  model::LlamaArgs args = test::tiny_llama_args();
  args.n_layers = 3;
  parallel::FsdpModel fsdp(model::llama_units(args), nullptr, nullptr, c10::Device(c10::kCPU),
                           parallel::FsdpOptions{});
  fsdp.init_weights(0);
  checkpoint::TrainerState state;
  state.model = &fsdp;
  state.args = args;
  state.flavor = "tiny-3-layers";
  checkpoint::Checkpointer ck(cfg, runtime, state);
  try {
    ck.load(a.ck->folder() + "/step-1", {"model"});
    FAIL() << "a 2-layer checkpoint loaded into a 3-layer model";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("holds a different model"), std::string::npos) << e.what();
  }
}
