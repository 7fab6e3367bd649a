// Checkpoints end to end on CPU: exact resume (one process and FSDP), loading on other meshes,
// a save killed midway, damage reports, retention, async modes, and Hugging Face interop (a
// round trip through `titan_train convert`, and titan's logits against an independent PyTorch
// Llama reading the exported files), plus convert's usage errors.
#include <ATen/ATen.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <thread>

#include "support/reference_llama.h"
#include "support/test_support.h"
#include "titan/checkpoint/checkpointer.h"
#include "titan/checkpoint/hf.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/dist/runtime.h"
#include "titan/model/layout.h"
#include "titan/model/llama.h"
#include "titan/ops/rmsnorm.h"
#include "titan/ops/rope.h"
#include "titan/parallel/fsdp.h"

using namespace titan;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kDebugConfig = std::string(TITAN_SOURCE_DIR) + "/configs/debug_model.toml";
const std::string kShard0 = "shard-00000-of-00001.safetensors";

struct JobRun {
  int exit_code = 0;               // the largest of the ranks' exit codes
  std::string output;              // every rank's output
  std::map<int64_t, double> loss;  // step -> loss, from metrics.jsonl
  std::map<int64_t, double> grad_norm;
  std::map<int64_t, double> lr;
};

// The debug model at seq_len 64 with a loss logged every step; `local_batch` per rank.
std::vector<std::string> train_args(const std::string& dump, int64_t steps, int64_t local_batch) {
  return {"--job.config_file",
          kDebugConfig,
          "--job.dump_folder",
          dump,
          "--training.steps",
          std::to_string(steps),
          "--training.seq_len",
          "64",
          "--training.local_batch_size",
          std::to_string(local_batch),
          "--metrics.log_freq",
          "1",
          "--metrics.disable_color_printing"};
}

// Full checkpoints every `interval` steps and at the end.
std::vector<std::string> checkpoints_every(int64_t interval) {
  return {"--checkpoint.enable", "--checkpoint.interval", std::to_string(interval),
          "--checkpoint.last_save_model_only", "false"};
}

// --parallelism.<dim>_parallel_degree `degree` with data_parallel_shard_degree `dp_shard`.
std::vector<std::string> mesh_args(const std::string& dim, int degree, int64_t dp_shard) {
  return {"--parallelism." + dim + "_parallel_degree", std::to_string(degree),
          "--parallelism.data_parallel_shard_degree", std::to_string(dp_shard)};
}

std::vector<std::string> operator+(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Runs titan_train as `world` ranks (the same global batch of 8 for any world) and reads the
// losses this run logged.
// One compute thread per process, as run_ranks gives each rank: OpenMP threads that spin on
// a busy machine slow a run down many times over.
JobRun run_job_batch(const std::string& dump, int world, int64_t local_batch, int64_t steps,
                     std::vector<std::string> extra, std::vector<std::string> env = {}) {
  const std::vector<std::string> args = train_args(dump, steps, local_batch) + extra;
  JobRun run;
  std::vector<test::ProcessResult> results;
  if (world == 1) {
    results.push_back(
        test::run_titan_train(args, env + std::vector<std::string>{"OMP_NUM_THREADS=1"}));
  } else {
    results = test::run_ranks(std::vector<std::string>{TITAN_TRAIN_BINARY} + args, world, env, 600);
  }
  for (const auto& r : results) {
    run.exit_code = std::max(run.exit_code, r.exit_code);
    run.output += r.output;
  }
  // metrics.jsonl keeps every run's records: this run's follow its last start/resume event.
  std::ifstream in(dump + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = json::parse(line);
    if (j.contains("event")) {
      run.loss.clear();
      run.grad_norm.clear();
      run.lr.clear();
    }
    if (j.contains("loss")) {
      run.loss[j["step"].get<int64_t>()] = j["loss"].get<double>();
      run.grad_norm[j["step"].get<int64_t>()] = j["grad_norm"].get<double>();
      run.lr[j["step"].get<int64_t>()] = j["lr"].get<double>();
    }
  }
  return run;
}

JobRun run_job(const std::string& dump, int world, int64_t steps, std::vector<std::string> extra,
               std::vector<std::string> env = {}) {
  return run_job_batch(dump, world, 8 / world, steps, std::move(extra), std::move(env));
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// The trainer logged that it continues after `step`.
bool resumed_after(const JobRun& run, int64_t step) {
  return contains(run.output, "resuming after step " + std::to_string(step) + "\n");
}

std::string step_dir(const std::string& dump, int64_t step) {
  return dump + "/checkpoint/step-" + std::to_string(step);
}

// Copies step folder `step` of one job's checkpoints into another job's (which resumes from it).
void copy_step(const std::string& from_dump, int64_t step, const std::string& to_dump) {
  fs::create_directories(to_dump + "/checkpoint");
  fs::copy(step_dir(from_dump, step), step_dir(to_dump, step), fs::copy_options::recursive);
}

std::vector<int64_t> complete_steps(const std::string& dump) {
  std::vector<int64_t> out;
  for (const auto& [s, _] : checkpoint::Checkpointer::complete_steps(dump + "/checkpoint")) {
    out.push_back(s);
  }
  return out;
}

// `resumed` logged exactly steps first..last, and they equal `reference`'s: bitwise, or within
// `rel` relative.
void expect_steps_match(const JobRun& resumed, const JobRun& reference, int64_t first, int64_t last,
                        double rel, const std::string& what) {
  ASSERT_EQ(resumed.exit_code, 0) << what << "\n" << resumed.output;
  ASSERT_EQ(resumed.loss.size(), static_cast<size_t>(last - first + 1)) << what;
  EXPECT_EQ(resumed.loss.begin()->first, first) << what;
  for (int64_t s = first; s <= last; ++s) {
    ASSERT_TRUE(resumed.loss.count(s) && reference.loss.count(s)) << what << " step " << s;
    if (rel == 0) {
      EXPECT_EQ(resumed.loss.at(s), reference.loss.at(s)) << what << " step " << s;
      EXPECT_EQ(resumed.grad_norm.at(s), reference.grad_norm.at(s)) << what << " step " << s;
    } else {
      EXPECT_NEAR(resumed.loss.at(s), reference.loss.at(s), rel * reference.loss.at(s))
          << what << " step " << s;
    }
  }
}

// Copies `from_dump`'s step `step` into a fresh `to_dump`, runs 12 steps there on `world` ranks
// (saving every `every`), and expects it to resume after `step` and match `reference` from then.
void resume_elsewhere(const std::string& from_dump, int64_t step, const std::string& to_dump,
                      int world, int64_t every, const JobRun& reference, const std::string& what) {
  copy_step(from_dump, step, to_dump);
  const JobRun run = run_job(to_dump, world, 12, checkpoints_every(every));
  EXPECT_TRUE(resumed_after(run, step)) << what << "\n" << run.output;
  expect_steps_match(run, reference, step + 1, 12, 1e-5, what);
}

json read_json(const std::string& path) {
  std::ifstream in(path);
  return json::parse(in);
}

// Two HF folders hold the same tensors (names, shapes, values within 1e-5).
void expect_same_hf_folders(const std::string& got, const std::string& want) {
  const json ia = read_json(want + "/model.safetensors.index.json");
  const json ib = read_json(got + "/model.safetensors.index.json");
  ASSERT_EQ(ia["weight_map"].size(), ib["weight_map"].size());
  for (auto it = ia["weight_map"].begin(); it != ia["weight_map"].end(); ++it) {
    const std::string name = it.key();
    ASSERT_TRUE(ib["weight_map"].contains(name)) << name;
    const at::Tensor x =
        checkpoint::SafetensorsReader(want + "/" + it.value().get<std::string>()).read(name);
    const at::Tensor y =
        checkpoint::SafetensorsReader(got + "/" + ib["weight_map"][name].get<std::string>())
            .read(name);
    ASSERT_EQ(x.sizes(), y.sizes()) << name;
    EXPECT_LT(test::relative_error(y, x), 1e-5) << name;
  }
}

void flip_byte(const std::string& path, int64_t offset) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(offset);
  char c = 0;
  f.get(c);
  f.seekp(offset);
  f.put(static_cast<char>(c ^ 0x10));
}

// Starts titan_train without waiting for it; output goes to `log_path`.
pid_t spawn_titan_train(const std::vector<std::string>& args, const std::vector<std::string>& env,
                        const std::string& log_path) {
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 1);
    dup2(fd, 2);
    for (const auto& e : env) putenv(strdup(e.c_str()));
    putenv(strdup("TITAN_DEVICE=cpu"));
    putenv(strdup("OMP_NUM_THREADS=1"));
    std::vector<std::string> argv = std::vector<std::string>{TITAN_TRAIN_BINARY} + args;
    std::vector<char*> cargs;
    for (auto& a : argv) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    execv(cargs[0], cargs.data());
    _exit(127);
  }
  return pid;
}

// Runs a job whose saves pause between writing the shard file and committing, and SIGKILLs it
// while step-`step`.partial holds its shard file.
void kill_during_save(const std::vector<std::string>& args, const std::string& dump, int64_t step,
                      const std::string& log_path) {
  const std::string shard = step_dir(dump, step) + ".partial/" + kShard0;
  const pid_t pid = spawn_titan_train(args, {"TITAN_TEST_SAVE_DELAY_MS=4000"}, log_path);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  bool seen = false;
  while (std::chrono::steady_clock::now() < deadline) {
    if (fs::exists(shard)) {
      seen = true;
      break;
    }
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid) {
      ADD_FAILURE() << "titan_train ended before its step-" << step << " save:\n"
                    << test::read_file(log_path);
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(seen) << "step-" << step << ".partial never appeared:\n" << test::read_file(log_path);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << test::read_file(log_path);
}

}  // namespace

// 1. The same 30 steps, interrupted after step 20: steps 21..30 are bitwise the same.
TEST(CheckpointResume, OneProcessResumeIsBitwiseExact) {
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun full = run_job(dump, 1, 30, checkpoints_every(10));
  ASSERT_EQ(full.exit_code, 0) << full.output;
  ASSERT_EQ(full.loss.size(), 30u);
  EXPECT_EQ(complete_steps(dump), (std::vector<int64_t>{10, 20, 30}));
  const JobRun resumed =
      run_job(dump, 1, 30,
              checkpoints_every(10) + std::vector<std::string>{"--checkpoint.load_step", "20"});
  EXPECT_TRUE(resumed_after(resumed, 20)) << resumed.output;
  expect_steps_match(resumed, full, 21, 30, 0, "resume at 20");
}

// 1b. exclude_from_loading = ["lr_scheduler"] restarts the schedule (its warmup), as
// torchtitan's fresh scheduler does, while training continues after the checkpoint's step; the
// next checkpoints record the schedule's own position, so a resume from one of them continues
// the restarted schedule (and the re-saves of steps 4 and 6 replace the first run's).
TEST(CheckpointResume, ExcludingTheLrSchedulerRestartsItsSchedule) {
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun full = run_job(dump, 1, 6, checkpoints_every(2));
  ASSERT_EQ(full.exit_code, 0) << full.output;
  ASSERT_LT(full.lr.at(1), full.lr.at(3));  // the debug model warms up over 10 steps
  const JobRun restarted =
      run_job(dump, 1, 6,
              checkpoints_every(2) + std::vector<std::string>{"--checkpoint.load_step", "2",
                                                              "--checkpoint.exclude_from_loading",
                                                              "lr_scheduler"});
  ASSERT_EQ(restarted.exit_code, 0) << restarted.output;
  EXPECT_TRUE(resumed_after(restarted, 2)) << restarted.output;
  EXPECT_TRUE(contains(restarted.output,
                       "the lr schedule continues from its step 0 while "
                       "training continues after step 2"))
      << restarted.output;
  for (int64_t step = 3; step <= 6; ++step) {
    EXPECT_EQ(restarted.lr.at(step), full.lr.at(step - 2)) << "step " << step;
  }
  EXPECT_EQ(read_json(step_dir(dump, 4) + "/metadata.json")["lr_scheduler"]["last_step"], 2);
  const JobRun again = run_job(
      dump, 1, 6, checkpoints_every(2) + std::vector<std::string>{"--checkpoint.load_step", "4"});
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_TRUE(resumed_after(again, 4)) << again.output;
  for (int64_t step = 5; step <= 6; ++step) {
    EXPECT_EQ(again.lr.at(step), restarted.lr.at(step)) << "step " << step;
    EXPECT_EQ(again.loss.at(step), restarted.loss.at(step)) << "step " << step;
  }
}

// 2. FSDP over 2 ranks resumes to the uninterrupted 2-rank run's losses.
TEST(CheckpointResume, TwoRankFsdpResumeMatches) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun full = run_job(dump, 2, 30, checkpoints_every(10));
  ASSERT_EQ(full.exit_code, 0) << full.output;
  ASSERT_EQ(full.loss.size(), 30u);
  const json meta = read_json(step_dir(dump, 20) + "/metadata.json");
  EXPECT_EQ(meta["mesh"]["world"], 2);
  EXPECT_EQ(meta["mesh"]["dp_shard"], 2);
  EXPECT_EQ(meta["files"].size(), 2u);
  const JobRun resumed =
      run_job(dump, 2, 30,
              checkpoints_every(10) + std::vector<std::string>{"--checkpoint.load_step", "20"});
  EXPECT_TRUE(resumed_after(resumed, 20)) << resumed.output;
  expect_steps_match(resumed, full, 21, 30, 1e-5, "FSDP 2 resume at 20");
}

// 3. Checkpoints load on other meshes: FSDP 4 -> FSDP 2 -> one process, and one process ->
// FSDP 4; every resumed run continues the uninterrupted one-process run.
TEST(CheckpointResharding, FourToTwoToOneAndOneToFour) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const JobRun one = run_job(dir.file("one"), 1, 12, checkpoints_every(3));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const JobRun four = run_job(dir.file("four"), 4, 12, checkpoints_every(3));
  ASSERT_EQ(four.exit_code, 0) << four.output;
  EXPECT_EQ(read_json(step_dir(dir.file("four"), 3) + "/metadata.json")["files"].size(), 4u);

  resume_elsewhere(dir.file("four"), 3, dir.file("two"), 2, 3, one, "FSDP 4 -> FSDP 2");

  // The 2-rank run's own checkpoint (written after resharding) into one process.
  resume_elsewhere(dir.file("two"), 6, dir.file("single"), 1, 3, one, "FSDP 2 -> 1 process");

  resume_elsewhere(dir.file("one"), 9, dir.file("four_again"), 4, 3, one, "1 process -> FSDP 4");
}

// 3. HSDP 2x2 -> FSDP 4; replicas write no tensor data twice.
TEST(CheckpointResharding, HsdpTwoByTwoToFsdpFour) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  const JobRun one = run_job(dir.file("one"), 1, 12, {});
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const JobRun hsdp =
      run_job(dir.file("hsdp"), 4, 12,
              checkpoints_every(6) +
                  std::vector<std::string>{"--parallelism.data_parallel_replicate_degree", "2"});
  ASSERT_EQ(hsdp.exit_code, 0) << hsdp.output;
  const json meta = read_json(step_dir(dir.file("hsdp"), 6) + "/metadata.json");
  EXPECT_EQ(meta["mesh"]["dp_replicate"], 2);
  EXPECT_EQ(meta["mesh"]["dp_shard"], 2);
  for (const auto& [name, t] : meta["tensors"].items()) {
    for (const auto& c : t["chunks"]) {
      // Ranks 0 and 1 are replica 0.
      EXPECT_TRUE(c["file"] == "shard-00000-of-00004.safetensors" ||
                  c["file"] == "shard-00001-of-00004.safetensors")
          << name << " " << c["file"];
    }
  }
  resume_elsewhere(dir.file("hsdp"), 6, dir.file("fsdp"), 4, 6, one, "HSDP 2x2 -> FSDP 4");
}

// 4. A process killed while writing step 8 leaves step-8.partial; the next run removes it,
// resumes from step 4 and continues exactly. A killed re-save of an existing step leaves the
// existing step loadable.
// 2c. Checkpoints written under pipeline parallelism load on any other mesh (pp 2 -> 1 process,
// 1 process -> pp 4, pp 2 x FSDP 2 -> FSDP 4) and a resumed pipeline run continues exactly;
// the final save in HF format from a pipeline holds the one-process run's weights.
TEST(CheckpointResharding, PipelineCheckpointsLoadOnAnyMesh) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  auto pp = [](int degree, const char* schedule, int64_t microbatch) {
    return std::vector<std::string>{
        "--parallelism.pipeline_parallel_degree",          std::to_string(degree),
        "--parallelism.pipeline_parallel_schedule",        schedule,
        "--parallelism.pipeline_parallel_microbatch_size", std::to_string(microbatch)};
  };
  const JobRun one = run_job(dir.file("one"), 1, 12, checkpoints_every(3));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const JobRun pp2 =
      run_job_batch(dir.file("pp2"), 2, 8, 12, checkpoints_every(3) + pp(2, "1F1B", 2));
  expect_steps_match(pp2, one, 1, 12, 1e-5, "pp 2");
  // Every rank wrote its stage's tensors; the index covers the whole model.
  EXPECT_EQ(read_json(step_dir(dir.file("pp2"), 3) + "/metadata.json")["files"].size(), 2u);
  resume_elsewhere(dir.file("pp2"), 3, dir.file("pp2_to_one"), 1, 3, one, "pp 2 -> 1 process");
  {
    copy_step(dir.file("one"), 6, dir.file("one_to_pp4"));
    const JobRun r = run_job_batch(dir.file("one_to_pp4"), 4, 8, 12,
                                   checkpoints_every(3) + pp(4, "Interleaved1F1B", 2));
    EXPECT_TRUE(resumed_after(r, 6)) << r.output;
    expect_steps_match(r, one, 7, 12, 1e-5, "1 process -> pp 4");
  }
  {
    const JobRun mixed = run_job_batch(dir.file("pp2_fsdp2"), 4, 4, 12,
                                       checkpoints_every(3) + pp(2, "ZBVZeroBubble", 1));
    expect_steps_match(mixed, one, 1, 12, 1e-5, "pp 2 x FSDP 2");
    resume_elsewhere(dir.file("pp2_fsdp2"), 9, dir.file("mixed_to_fsdp4"), 4, 3, one,
                     "pp 2 x FSDP 2 -> FSDP 4");
  }
  {
    // A pipeline run resumed from its own checkpoint: the same steps, bit for bit.
    const JobRun resumed =
        run_job_batch(dir.file("pp2"), 2, 8, 12,
                      checkpoints_every(3) + pp(2, "1F1B", 2) +
                          std::vector<std::string>{"--checkpoint.load_step", "6"});
    EXPECT_TRUE(resumed_after(resumed, 6)) << resumed.output;
    expect_steps_match(resumed, pp2, 7, 12, 0, "pp 2 resumed");
  }
  {
    const std::vector<std::string> hf = {"--checkpoint.enable", "--checkpoint.interval", "1000",
                                         "--checkpoint.last_save_in_hf"};
    const JobRun a = run_job(dir.file("hf_one"), 1, 4, hf);
    const JobRun b = run_job_batch(dir.file("hf_pp"), 4, 8, 4, hf + pp(4, "GPipe", 2));
    ASSERT_EQ(a.exit_code, 0) << a.output;
    ASSERT_EQ(b.exit_code, 0) << b.output;
    expect_same_hf_folders(dir.file("hf_pp") + "/checkpoint/step-4-hf",
                           dir.file("hf_one") + "/checkpoint/step-4-hf");
  }
}

// 2d. Tensor-parallel checkpoints: each tp rank writes its box of the split parameters (tp rank
// 0 the norms), and they load on any mesh (tp 2 -> 1 process, 1 process -> tp 4, FSDP 2 x tp 2 ->
// FSDP 4); the final save in HF format from a TP run holds the one-process run's weights, and an
// HF folder imports into a TP run.
TEST(CheckpointResharding, TensorParallelCheckpointsLoadOnAnyMesh) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  auto tp = [](int degree, int64_t dp_shard) { return mesh_args("tensor", degree, dp_shard); };
  const JobRun one = run_job(dir.file("one"), 1, 12, checkpoints_every(3));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const JobRun tp2 = run_job_batch(dir.file("tp2"), 2, 8, 12, checkpoints_every(3) + tp(2, 1));
  expect_steps_match(tp2, one, 1, 12, 1e-5, "tp 2");
  {
    const json meta = read_json(step_dir(dir.file("tp2"), 3) + "/metadata.json");
    EXPECT_EQ(meta["mesh"]["tp"], 2);
    // wo is split by columns: two boxes; the norms are written once.
    const auto& wo = meta["tensors"]["layers.0.attention.wo.weight"];
    ASSERT_EQ(wo["chunks"].size(), 2u);
    EXPECT_EQ(wo["chunks"][1]["box"]["offset"], json({0, 128}));
    EXPECT_EQ(meta["tensors"]["norm.weight"]["chunks"].size(), 1u);
  }
  resume_elsewhere(dir.file("tp2"), 3, dir.file("tp2_to_one"), 1, 3, one, "tp 2 -> 1 process");
  {
    copy_step(dir.file("one"), 6, dir.file("one_to_tp4"));
    const JobRun r =
        run_job_batch(dir.file("one_to_tp4"), 4, 8, 12, checkpoints_every(3) + tp(4, 1));
    EXPECT_TRUE(resumed_after(r, 6)) << r.output;
    expect_steps_match(r, one, 7, 12, 1e-5, "1 process -> tp 4");
  }
  {
    const JobRun mixed =
        run_job_batch(dir.file("fsdp2_tp2"), 4, 4, 12, checkpoints_every(3) + tp(2, 2));
    expect_steps_match(mixed, one, 1, 12, 1e-5, "FSDP 2 x tp 2");
    resume_elsewhere(dir.file("fsdp2_tp2"), 9, dir.file("mixed_to_fsdp4"), 4, 3, one,
                     "FSDP 2 x tp 2 -> FSDP 4");
  }
  const std::vector<std::string> hf = {"--checkpoint.enable", "--checkpoint.interval", "1000",
                                       "--checkpoint.last_save_in_hf"};
  const JobRun a = run_job(dir.file("hf_one"), 1, 4, hf);
  const JobRun b = run_job_batch(dir.file("hf_tp"), 4, 4, 4, hf + tp(2, 2));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  ASSERT_EQ(b.exit_code, 0) << b.output;
  const std::string fa = dir.file("hf_one") + "/checkpoint/step-4-hf";
  expect_same_hf_folders(dir.file("hf_tp") + "/checkpoint/step-4-hf", fa);
  // The exported folder as the start of a tp 4 run and of a one-process run: the same steps.
  const std::vector<std::string> from_hf = {"--checkpoint.initial_load_path", fa,
                                            "--checkpoint.initial_load_in_hf"};
  const JobRun s1 = run_job(dir.file("from_hf_one"), 1, 3, from_hf);
  const JobRun s4 = run_job_batch(dir.file("from_hf_tp4"), 4, 8, 3, from_hf + tp(4, 1));
  ASSERT_EQ(s1.exit_code, 0) << s1.output;
  expect_steps_match(s4, s1, 1, 3, 1e-5, "HF folder into tp 4");
}

// 2e. Context-parallel checkpoints: FSDP shards over dp_shard x cp, so cp ranks write distinct
// shards; they load on any mesh (cp 2 -> 1 process, 1 process -> cp 2 x FSDP 2) and the HF
// export from a cp run (gathered over dp_shard x cp) holds the one-process run's weights.
TEST(CheckpointResharding, ContextParallelCheckpointsLoadOnAnyMesh) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  auto cp = [](int degree, int64_t dp_shard) { return mesh_args("context", degree, dp_shard); };
  const JobRun one = run_job(dir.file("one"), 1, 12, checkpoints_every(3));
  ASSERT_EQ(one.exit_code, 0) << one.output;
  const JobRun cp2 = run_job_batch(dir.file("cp2"), 2, 8, 12, checkpoints_every(3) + cp(2, 1));
  expect_steps_match(cp2, one, 1, 12, 1e-5, "cp 2");
  EXPECT_EQ(read_json(step_dir(dir.file("cp2"), 3) + "/metadata.json")["files"].size(), 2u);
  resume_elsewhere(dir.file("cp2"), 3, dir.file("cp2_to_one"), 1, 3, one, "cp 2 -> 1 process");
  {
    copy_step(dir.file("one"), 6, dir.file("one_to_cp2_fsdp2"));
    const JobRun r =
        run_job_batch(dir.file("one_to_cp2_fsdp2"), 4, 4, 12, checkpoints_every(3) + cp(2, 2));
    EXPECT_TRUE(resumed_after(r, 6)) << r.output;
    expect_steps_match(r, one, 7, 12, 1e-5, "1 process -> cp 2 x FSDP 2");
  }
  const std::vector<std::string> hf = {"--checkpoint.enable", "--checkpoint.interval", "1000",
                                       "--checkpoint.last_save_in_hf"};
  const JobRun a = run_job(dir.file("hf_one"), 1, 4, hf);
  const JobRun b = run_job_batch(dir.file("hf_cp"), 2, 8, 4, hf + cp(2, 1));
  ASSERT_EQ(a.exit_code, 0) << a.output;
  ASSERT_EQ(b.exit_code, 0) << b.output;
  expect_same_hf_folders(dir.file("hf_cp") + "/checkpoint/step-4-hf",
                         dir.file("hf_one") + "/checkpoint/step-4-hf");
}

TEST(CheckpointCrash, KilledSaveFallsBackToThePreviousCheckpoint) {
  test::TempDir dir;
  const JobRun reference = run_job(dir.file("reference"), 1, 12, {});
  ASSERT_EQ(reference.exit_code, 0) << reference.output;
  const std::string dump = dir.file("run");
  const auto args = train_args(dump, 12, 8) + checkpoints_every(4);

  kill_during_save(args, dump, 8, dir.file("killed.log"));
  EXPECT_EQ(complete_steps(dump), (std::vector<int64_t>{4}));
  EXPECT_TRUE(fs::exists(step_dir(dump, 8) + ".partial"));

  const JobRun resumed = run_job(dump, 1, 12, checkpoints_every(4));
  EXPECT_TRUE(contains(resumed.output, "removing " + step_dir(dump, 8) + ".partial"))
      << resumed.output;
  EXPECT_TRUE(resumed_after(resumed, 4)) << resumed.output;
  expect_steps_match(resumed, reference, 5, 12, 0, "resume after a killed save");
  EXPECT_FALSE(fs::exists(step_dir(dump, 8) + ".partial"));
  EXPECT_EQ(complete_steps(dump), (std::vector<int64_t>{4, 8, 12}));

  // Re-saving step 8 (from step 4) is killed while step-8 already exists.
  kill_during_save(args + std::vector<std::string>{"--checkpoint.load_step", "4"}, dump, 8,
                   dir.file("killed_again.log"));
  EXPECT_EQ(complete_steps(dump), (std::vector<int64_t>{4, 8, 12}));
  const JobRun from_eight = run_job(
      dump, 1, 12, checkpoints_every(4) + std::vector<std::string>{"--checkpoint.load_step", "8"});
  EXPECT_TRUE(resumed_after(from_eight, 8)) << from_eight.output;
  expect_steps_match(from_eight, reference, 9, 12, 0, "the older step 8 after a killed re-save");
}

// 5. Damaged checkpoints: the error names the file and what is wrong; exit code 2 (a titan
// error, not a crash or an internal error).
class CheckpointDamage : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    source_ = new test::TempDir();
    const JobRun r = run_job(source_->file("run"), 1, 5, checkpoints_every(5));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  static void TearDownTestSuite() {
    delete source_;
    source_ = nullptr;
  }
  void SetUp() override {
    ASSERT_NE(source_, nullptr);
    copy_step(source_->file("run"), 5, dump());
  }
  std::string dump() const { return dir_.file("run"); }
  std::string shard() const { return step_dir(dump(), 5) + "/" + kShard0; }
  std::string metadata() const { return step_dir(dump(), 5) + "/metadata.json"; }
  // Resumes from step 5 (nothing left to train); the load must fail.
  std::string load_fails() {
    const JobRun r =
        run_job(dump(), 1, 5,
                checkpoints_every(5) + std::vector<std::string>{"--checkpoint.load_step", "5"});
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(contains(r.output, "titan_train: error: ")) << r.output;
    return r.output;
  }

  static test::TempDir* source_;
  test::TempDir dir_;
};
test::TempDir* CheckpointDamage::source_ = nullptr;

TEST_F(CheckpointDamage, UndamagedCopyLoads) {
  const JobRun r = run_job(
      dump(), 1, 5, checkpoints_every(5) + std::vector<std::string>{"--checkpoint.load_step", "5"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(resumed_after(r, 5)) << r.output;
}

TEST_F(CheckpointDamage, FlippedDataByteIsCorrupted) {
  flip_byte(shard(), static_cast<int64_t>(fs::file_size(shard()) / 2));
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, shard())) << out;
  EXPECT_TRUE(contains(out, "corrupted")) << out;
  EXPECT_TRUE(contains(out, "fail their CRC-32C check")) << out;  // found by the block checksums
}

TEST_F(CheckpointDamage, FlippedRngByteIsCorrupted) {
  // The RNG state is the last tensor of the file.
  {
    checkpoint::SafetensorsReader r(shard());
    int64_t last_end = 0;
    for (const auto& [name, info] : r.tensors()) last_end = std::max(last_end, info.end);
    ASSERT_EQ(r.info("rng/cpu").end, last_end);
  }
  flip_byte(shard(), static_cast<int64_t>(fs::file_size(shard())) - 9);
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, shard())) << out;
  EXPECT_TRUE(contains(out, "corrupted")) << out;
}

TEST_F(CheckpointDamage, FlippedHeaderByteIsCorrupted) {
  // A tensor name inside the safetensors header.
  const std::string bytes = test::read_file(shard());
  const size_t at = bytes.find("model/layers.0.attention.wq.weight");
  ASSERT_NE(at, std::string::npos);
  flip_byte(shard(), static_cast<int64_t>(at + 8));
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, shard())) << out;
  EXPECT_TRUE(contains(out, "corrupted")) << out;
}

TEST_F(CheckpointDamage, TruncatedShardIsTruncated) {
  fs::resize_file(shard(), fs::file_size(shard()) - 4096);
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, shard())) << out;
  EXPECT_TRUE(contains(out, "truncated")) << out;
}

TEST_F(CheckpointDamage, MissingShardIsNamed) {
  fs::remove(shard());
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, kShard0)) << out;
  EXPECT_TRUE(contains(out, "misses")) << out;
}

TEST_F(CheckpointDamage, UnparsableIndexIsNamed) {
  test::write_file(metadata(), "{\"format\": \"titan-checkpoint\", \"tensors\": {");
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, metadata())) << out;
  EXPECT_TRUE(contains(out, "malformed")) << out;
}

TEST_F(CheckpointDamage, EditedIndexFailsItsChecksum) {
  json meta = read_json(metadata());
  meta["optimizer"]["steps"] = 12345;
  test::write_file(metadata(), meta.dump(1));
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, metadata())) << out;
  EXPECT_TRUE(contains(out, "does not match its CRC-32C")) << out;
}
TEST_F(CheckpointDamage, IndexOfAnotherStepIsNamed) {
  // A folder renamed (or copied) to another step's name.
  json meta = read_json(metadata());
  meta.erase("index_crc32c");
  meta["step"] = 4;
  test::write_file(metadata(), meta.dump());
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out,
                       "holds step 4 according to its index, but the folder is named for "
                       "step 5"))
      << out;
}
// Indexes without a checksum (older titan versions) are still checked entry by entry.
TEST_F(CheckpointDamage, IndexWithMissingEntriesIsNamed) {
  json meta = read_json(metadata());
  meta.erase("index_crc32c");
  meta.erase("files");
  test::write_file(metadata(), meta.dump());
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, metadata())) << out;
  EXPECT_TRUE(contains(out, "malformed")) << out;
}

TEST_F(CheckpointDamage, IndexWithMistypedEntryIsNamed) {
  json meta = read_json(metadata());
  meta.erase("index_crc32c");
  meta["tensors"]["norm.weight"]["chunks"][0]["numel"] = "many";
  test::write_file(metadata(), meta.dump());
  const std::string out = load_fails();
  EXPECT_TRUE(contains(out, metadata())) << out;
  EXPECT_TRUE(contains(out, "malformed")) << out;
}

// 6. keep_latest_k = 2 keeps the two newest saves; a load_step that is not there lists what is.
TEST(CheckpointRetention, KeepLatestTwoKeepsTheNewestTwo) {
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun r =
      run_job(dump, 1, 20,
              checkpoints_every(5) + std::vector<std::string>{"--checkpoint.keep_latest_k", "2"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(complete_steps(dump), (std::vector<int64_t>{15, 20}));
  std::vector<std::string> entries;
  for (const auto& e : fs::directory_iterator(dump + "/checkpoint")) {
    entries.push_back(e.path().filename().string());
  }
  std::sort(entries.begin(), entries.end());
  EXPECT_EQ(entries, (std::vector<std::string>{"step-15", "step-20"}));

  const JobRun missing = run_job(
      dump, 1, 20, checkpoints_every(5) + std::vector<std::string>{"--checkpoint.load_step", "10"});
  EXPECT_EQ(missing.exit_code, 2) << missing.output;
  EXPECT_TRUE(contains(missing.output, "checkpoint.load_step = 10")) << missing.output;
  EXPECT_TRUE(contains(missing.output, "(have: 15, 20)")) << missing.output;
}

TEST(CheckpointRetention, LoadStepWithoutAnyCheckpointIsAnError) {
  test::TempDir dir;
  const JobRun r =
      run_job(dir.file("run"), 1, 5,
              checkpoints_every(5) + std::vector<std::string>{"--checkpoint.load_step", "3"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "checkpoint.load_step = 3")) << r.output;
  EXPECT_TRUE(contains(r.output, "(have: none)")) << r.output;
}

// 7. async and async_with_pinned_mem (one staging buffer kept for both saves) write what a
// synchronous save writes, do not change training, and resume like it.
TEST(CheckpointAsync, AsyncModesSaveTheSameContentAndResumeTheSame) {
  test::TempDir dir;
  const JobRun sync = run_job(dir.file("sync"), 1, 10, checkpoints_every(5));
  ASSERT_EQ(sync.exit_code, 0) << sync.output;
  for (const std::string mode : {"async", "async_with_pinned_mem"}) {
    const std::string dump = dir.file(mode);
    const JobRun run =
        run_job(dump, 1, 10,
                checkpoints_every(5) + std::vector<std::string>{"--checkpoint.async_mode", mode});
    ASSERT_EQ(run.exit_code, 0) << run.output;
    EXPECT_TRUE(contains(run.output, "writing in the background")) << run.output;
    // The pinned mode stages both saves in the one buffer it took at the first.
    size_t staged = 0;
    for (size_t at = run.output.find("staged for asynchronous saves"); at != std::string::npos;
         at = run.output.find("staged for asynchronous saves", at + 1)) {
      ++staged;
    }
    EXPECT_EQ(staged, mode == "async" ? 0u : 1u) << run.output;
    expect_steps_match(run, sync, 1, 10, 0, mode + " run");
    ASSERT_EQ(complete_steps(dump), (std::vector<int64_t>{5, 10})) << mode;
    for (int64_t step : {5, 10}) {
      const std::string a = step_dir(dump, step), s = step_dir(dir.file("sync"), step);
      const json ma = read_json(a + "/metadata.json"), ms = read_json(s + "/metadata.json");
      for (const char* key :
           {"tensors", "files", "dataloader", "optimizer", "train_state", "mesh"}) {
        EXPECT_EQ(ma[key], ms[key]) << mode << " step " << step << " " << key;
      }
      checkpoint::SafetensorsReader ra(a + "/" + kShard0), rs(s + "/" + kShard0);
      ASSERT_EQ(ra.tensors().size(), rs.tensors().size());
      for (const auto& [name, info] : rs.tensors()) {
        ASSERT_TRUE(ra.has(name)) << mode << " " << name;
        EXPECT_TRUE(at::equal(ra.read(name), rs.read(name)))
            << mode << " step " << step << " " << name;
      }
    }
    const JobRun resumed =
        run_job(dump, 1, 10,
                checkpoints_every(5) + std::vector<std::string>{"--checkpoint.async_mode", mode,
                                                                "--checkpoint.load_step", "5"});
    EXPECT_TRUE(resumed_after(resumed, 5)) << resumed.output;
    expect_steps_match(resumed, sync, 6, 10, 0, mode + " resume");
  }
  const JobRun sync_resumed =
      run_job(dir.file("sync"), 1, 10,
              checkpoints_every(5) + std::vector<std::string>{"--checkpoint.load_step", "5"});
  expect_steps_match(sync_resumed, sync, 6, 10, 0, "sync resume");
}

namespace {

// A one-process CPU job holding a model of `args` (for loading checkpoints in the test).
struct LocalModel {
  config::JobConfig cfg;
  std::unique_ptr<dist::Runtime> runtime;
  std::unique_ptr<parallel::FsdpModel> fsdp;
  checkpoint::TrainerState state;
  std::unique_ptr<checkpoint::Checkpointer> ck;

  LocalModel(const model::LlamaArgs& args, const std::string& flavor, const std::string& dump,
             int64_t seed) {
    cfg.job.dump_folder = dump;
    cfg.checkpoint.enable = true;
    runtime = std::make_unique<dist::Runtime>(dist::LaunchEnv{}, cfg, c10::Device(c10::kCPU));
    fsdp = std::make_unique<parallel::FsdpModel>(model::llama_units(args), nullptr, nullptr,
                                                 c10::Device(c10::kCPU), parallel::FsdpOptions{});
    fsdp->init_weights(seed);
    state.model = fsdp.get();
    state.args = args;
    state.flavor = flavor;
    ck = std::make_unique<checkpoint::Checkpointer>(cfg, *runtime, state);
  }

  // Logits [S, vocab] in fp32 from titan's own forward code: embedding, blocks, final norm
  // and output projection.
  at::Tensor logits(const at::Tensor& tokens) {
    const auto& a = state.args;
    const int64_t s = tokens.numel(), v = a.vocab_size, d = a.dim;
    auto unit = [&](size_t i) { return fsdp->unit(i).master; };  // one process: the full unit
    at::Tensor h = model::embedding_forward(unit(0).narrow(0, 0, v * d).view({v, d}),
                                            tokens.view({1, s}), at::kFloat);
    auto [cos, sin] = ops::rope_tables(a, s, at::TensorOptions());
    const model::Rope rope{cos, sin};
    for (int64_t l = 0; l < a.n_layers; ++l) {
      const size_t i = static_cast<size_t>(l + 1);
      model::BlockSaved saved;
      h = model::block_forward(a, model::BlockPlan::whole(a),
                               model::block_views(fsdp->unit(i).layout, unit(i)), rope, h,
                               model::SavePolicy::InputOnly, saved);
    }
    const size_t head = fsdp->num_units() - 1;
    const auto& layout = fsdp->unit(head).layout;
    const auto& norm = layout.param("norm.weight");
    const auto& out = layout.param("output.weight");
    auto [y, rstd] =
        ops::rmsnorm_forward_ref(h.view({s, d}), unit(head).narrow(0, norm.offset, d), a.norm_eps);
    return at::matmul(y, unit(head).narrow(0, out.offset, v * d).view({v, d}).t());
  }
};

// An independent Llama in plain PyTorch (float64) with Hugging Face's conventions, reading an
// HF folder: rotate_half RoPE with Llama 3.1's "llama3" frequency scaling when config.json
// asks for it, RMSNorm, GQA by repeat_kv, SwiGLU, lm_head (or the embedding when tied).
const char* kHfLlamaPy = R"PY(
import json, math, os, sys
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

folder, tokens_path, out_path = sys.argv[1:4]
cfg = json.load(open(folder + "/config.json"))
assert cfg["hidden_act"] == "silu", cfg
W = {}
if os.path.exists(folder + "/model.safetensors.index.json"):
    index = json.load(open(folder + "/model.safetensors.index.json"))
    for f in sorted(set(index["weight_map"].values())):
        W.update(load_file(folder + "/" + f))
else:
    W.update(load_file(folder + "/model.safetensors"))
W = {k: v.to(torch.float64) for k, v in W.items()}
if cfg.get("tie_word_embeddings", False) and "lm_head.weight" not in W:
    W["lm_head.weight"] = W["model.embed_tokens.weight"]

D, L = cfg["hidden_size"], cfg["num_hidden_layers"]
H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
HD = cfg.get("head_dim", D // H)
eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
tokens = torch.tensor([int(t) for t in open(tokens_path).read().split(",")])
S = tokens.numel()

def rms_norm(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

def rotate_half(x):
    return torch.cat((-x[..., HD // 2:], x[..., :HD // 2]), dim=-1)

def repeat_kv(x, n):  # [KV, S, HD] -> [KV * n, S, HD], each KV head serving n query heads
    return x[:, None].expand(x.shape[0], n, S, HD).reshape(x.shape[0] * n, S, HD)

inv_freq = 1.0 / (theta ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD))
rs = cfg.get("rope_scaling")
if rs:
    # Llama 3.1: wavelengths beyond old/low are slowed by `factor`, below old/high kept, and
    # blended linearly in 1/wavelength between.
    assert rs.get("rope_type", rs.get("type")) == "llama3", rs
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    blend = ((old / wavelen - low) / (high - low)).clamp(0, 1)
    inv_freq = torch.where(wavelen > old / low, inv_freq / factor,
               torch.where(wavelen < old / high, inv_freq,
                           (1 - blend) * inv_freq / factor + blend * inv_freq))
freqs = torch.outer(torch.arange(S, dtype=torch.float64), inv_freq)
emb = torch.cat((freqs, freqs), dim=-1)
cos, sin = emb.cos()[None], emb.sin()[None]
mask = torch.full((S, S), float("-inf"), dtype=torch.float64).triu(1)

h = W["model.embed_tokens.weight"][tokens]
for l in range(L):
    p = "model.layers.%d." % l
    x = rms_norm(h, W[p + "input_layernorm.weight"])
    q = (x @ W[p + "self_attn.q_proj.weight"].T).view(S, H, HD).transpose(0, 1)
    k = (x @ W[p + "self_attn.k_proj.weight"].T).view(S, KV, HD).transpose(0, 1)
    v = (x @ W[p + "self_attn.v_proj.weight"].T).view(S, KV, HD).transpose(0, 1)
    q = q * cos + rotate_half(q) * sin
    k = k * cos + rotate_half(k) * sin
    k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
    att = torch.softmax(q @ k.transpose(-1, -2) / HD ** 0.5 + mask, dim=-1)
    h = h + (att @ v).transpose(0, 1).reshape(S, H * HD) @ W[p + "self_attn.o_proj.weight"].T
    x = rms_norm(h, W[p + "post_attention_layernorm.weight"])
    g = F.silu(x @ W[p + "mlp.gate_proj.weight"].T) * (x @ W[p + "mlp.up_proj.weight"].T)
    h = h + g @ W[p + "mlp.down_proj.weight"].T
logits = rms_norm(h, W["model.norm.weight"]) @ W["lm_head.weight"].T
save_file({"logits": logits.contiguous()}, out_path)
)PY";

// Hugging Face transformers as the reference where it is installed (the GPU machine): its
// LlamaForCausalLM scores the folder in float64.
const char* kTransformersLlamaPy = R"PY(
import sys
import torch
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

folder, tokens_path, out_path = sys.argv[1:4]
model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float64, attn_implementation="eager")
tokens = torch.tensor([[int(t) for t in open(tokens_path).read().split(",")]])
with torch.no_grad():
    logits = model(tokens).logits[0]
save_file({"logits": logits.contiguous()}, out_path)
)PY";

// Writes a random Llama folder as Hugging Face does: transformers' save_pretrained where it is
// installed, else config.json + model.safetensors by hand (HF names, rotate_half row order).
// argv: folder, config.json text; q/k weights are enlarged so attention (and RoPE) matter.
const char* kWriteHfFolderPy = R"PY(
import json, os, sys
import torch
from safetensors.torch import save_file

folder, cfg_text = sys.argv[1:3]
cfg = json.loads(cfg_text)
os.makedirs(folder, exist_ok=True)
torch.manual_seed(0)
try:
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:
    LlamaForCausalLM = None
if LlamaForCausalLM is not None:
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "q_proj" in name or "k_proj" in name:
                p.normal_(0, 0.3)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(folder, safe_serialization=True)
    print("written by transformers")
    sys.exit(0)
D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
H, KV, F = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
HD = D // H
W = {"model.embed_tokens.weight": 0.05 * torch.randn(V, D),
     "model.norm.weight": 1 + 0.1 * torch.randn(D)}
if not cfg.get("tie_word_embeddings", False):
    W["lm_head.weight"] = 0.05 * torch.randn(V, D)
for l in range(L):
    p = "model.layers.%d." % l
    W[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(D)
    W[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(D)
    W[p + "self_attn.q_proj.weight"] = 0.3 * torch.randn(H * HD, D)
    W[p + "self_attn.k_proj.weight"] = 0.3 * torch.randn(KV * HD, D)
    W[p + "self_attn.v_proj.weight"] = 0.05 * torch.randn(KV * HD, D)
    W[p + "self_attn.o_proj.weight"] = 0.05 * torch.randn(D, H * HD)
    W[p + "mlp.gate_proj.weight"] = 0.05 * torch.randn(F, D)
    W[p + "mlp.up_proj.weight"] = 0.05 * torch.randn(F, D)
    W[p + "mlp.down_proj.weight"] = 0.05 * torch.randn(D, F)
save_file(W, folder + "/model.safetensors", metadata={"format": "pt"})
cfg.update({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"})
json.dump(cfg, open(folder + "/config.json", "w"), indent=2)
print("written by hand")
)PY";

bool python_has_torch_and_safetensors() {
  return test::python_can_import("torch, safetensors.torch");
}

// Runs the Python reference on HF folder `hf` for `tokens`; returns its logits [S, vocab].
// `transformers`: score with Hugging Face transformers instead of the hand-written Llama.
at::Tensor python_logits(const test::TempDir& dir, const std::string& hf, const at::Tensor& tokens,
                         bool transformers = false) {
  test::write_file(dir.file("hf_llama.py"), transformers ? kTransformersLlamaPy : kHfLlamaPy);
  std::string csv;
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    csv += (i ? "," : "") + std::to_string(tokens[i].item<int64_t>());
  }
  test::write_file(dir.file("tokens.csv"), csv);
  const auto r = test::run_process({test::python(), dir.file("hf_llama.py"), hf,
                                    dir.file("tokens.csv"), dir.file("logits.safetensors")},
                                   {"OMP_NUM_THREADS=1"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  if (r.exit_code != 0) return at::Tensor();
  return checkpoint::SafetensorsReader(dir.file("logits.safetensors")).read("logits");
}

// max |a - b| / max |b|
double max_relative_error(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  return (x - y).abs().max().item<double>() / y.abs().max().item<double>();
}

at::Tensor fixed_tokens(int64_t n, int64_t vocab) {
  return (at::arange(n, at::kLong) * 131 + 7).remainder(vocab);
}

// Mean next-token cross-entropy of logits [S, V] on tokens [S] (S - 1 predictions).
double next_token_loss(const at::Tensor& logits, const at::Tensor& tokens) {
  const int64_t s = tokens.numel();
  at::Tensor lp = at::log_softmax(logits.to(at::kDouble).narrow(0, 0, s - 1), 1);
  return -lp.gather(1, tokens.narrow(0, 1, s - 1).view({-1, 1})).mean().item<double>();
}

}  // namespace

// 8b. titan checkpoint -> HF -> titan gives back every weight bit for bit (fp32).
TEST(CheckpointHf, ConvertRoundTripIsExact) {
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun r = run_job(dump, 1, 5, checkpoints_every(5));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto to_hf = test::run_titan_train(
      {"convert", "--to", "hf", "--input", step_dir(dump, 5), "--output", dir.file("hf")});
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  const json cfg = read_json(dir.file("hf") + "/config.json");
  EXPECT_EQ(cfg["hidden_size"], 256);
  EXPECT_EQ(cfg["num_attention_heads"], 16);
  EXPECT_EQ(cfg["rope_theta"], 500000.0);
  {
    checkpoint::SafetensorsReader hf(dir.file("hf") + "/model-00001-of-00001.safetensors");
    EXPECT_EQ(hf.tensors().size(), 3u + 9 * 6);
    EXPECT_EQ(hf.info("model.layers.5.self_attn.q_proj.weight").shape,
              (std::vector<int64_t>{256, 256}));
    EXPECT_EQ(hf.info("lm_head.weight").dtype, "F32");
  }
  auto back = test::run_titan_train(
      {"convert", "--to", "titan", "--input", dir.file("hf"), "--output", dir.file("back")});
  ASSERT_EQ(back.exit_code, 0) << back.output;
  const std::string orig_dir = step_dir(dump, 5), back_dir = dir.file("back") + "/step-0";
  const json orig = read_json(orig_dir + "/metadata.json");
  const json round = read_json(back_dir + "/metadata.json");
  EXPECT_TRUE(round["model_only"].get<bool>());
  int compared = 0;
  for (const auto& [name, t] : orig["tensors"].items()) {
    if (contains(name, "optim.")) continue;  // the moments are not part of HF weights
    ASSERT_TRUE(round["tensors"].contains(name)) << name;
    EXPECT_TRUE(at::equal(test::read_checkpoint_tensor(back_dir, name),
                          test::read_checkpoint_tensor(orig_dir, name)))
        << name;
    ++compared;
  }
  EXPECT_EQ(compared, 3 + 9 * 6);
  EXPECT_EQ(static_cast<int>(round["tensors"].size()), compared);
}

// 8b. checkpoint.initial_load_in_hf with no initial_load_path loads model.hf_assets_path, as
// torchtitan does (the folder then serves the tokenizer too; an exported one holds none, so the
// byte tokenizer stays): the same steps as naming the folder in initial_load_path. With neither
// key the config is an error naming both.
TEST(CheckpointHf, InitialLoadInHfFallsBackToHfAssetsPath) {
  test::TempDir dir;
  const JobRun r = run_job(dir.file("run"), 1, 2, checkpoints_every(2));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto to_hf = test::run_titan_train({"convert", "--to", "hf", "--input",
                                      step_dir(dir.file("run"), 2), "--output", dir.file("hf")});
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;
  const JobRun named = run_job(
      dir.file("named"), 1, 2,
      {"--checkpoint.initial_load_in_hf", "--checkpoint.initial_load_path", dir.file("hf")});
  const JobRun assets =
      run_job(dir.file("assets"), 1, 2,
              {"--checkpoint.initial_load_in_hf", "--model.hf_assets_path", dir.file("hf")});
  ASSERT_EQ(named.exit_code, 0) << named.output;
  ASSERT_EQ(assets.exit_code, 0) << assets.output;
  EXPECT_TRUE(contains(assets.output, "loading Hugging Face weights from model.hf_assets_path"))
      << assets.output;
  expect_steps_match(assets, named, 1, 2, 0, "initial load from model.hf_assets_path");
  EXPECT_LT(named.loss.at(1), r.loss.at(1));  // the trained weights, not a fresh start
  const auto neither =
      test::run_titan_train(train_args(dir.file("neither"), 1, 8) +
                            std::vector<std::string>{"--checkpoint.initial_load_in_hf"});
  EXPECT_EQ(neither.exit_code, 2) << neither.output;
  EXPECT_TRUE(contains(neither.output,
                       "set checkpoint.initial_load_path (or "
                       "model.hf_assets_path)"))
      << neither.output;
}

// 8c. The trained debug model exported to HF: an independent PyTorch Llama reading the HF files
// computes the logits titan computes from its own checkpoint.
TEST(CheckpointHf, ExportedDebugModelMatchesIndependentPythonLlama) {
  if (!python_has_torch_and_safetensors())
    GTEST_SKIP() << "needs python3 with torch and safetensors";
  test::TempDir dir;
  const std::string dump = dir.file("run");
  const JobRun r = run_job(dump, 1, 10, checkpoints_every(10));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // A checkpoint folder (not a step folder) is accepted as input too: its newest step.
  auto to_hf = test::run_titan_train(
      {"convert", "--to", "hf", "--input", dump + "/checkpoint", "--output", dir.file("hf")});
  ASSERT_EQ(to_hf.exit_code, 0) << to_hf.output;

  const auto args = model::llama_flavor("debugmodel");
  LocalModel m(args, "debugmodel", dir.file("local"), /*seed=*/99);
  EXPECT_EQ(m.ck->load(step_dir(dump, 10), {"model"}), 10);
  // Training moved the norms away from their initial ones, so their mapping is tested too.
  EXPECT_GT((m.fsdp->unit(1).master.narrow(0, 0, args.dim) - 1).abs().max().item<double>(), 1e-4);
  const at::Tensor tokens = fixed_tokens(24, args.vocab_size);
  const at::Tensor ours = m.logits(tokens);
  const at::Tensor theirs = python_logits(dir, dir.file("hf"), tokens);
  ASSERT_TRUE(theirs.defined());
  ASSERT_EQ(ours.sizes(), theirs.sizes());
  EXPECT_LT(max_relative_error(ours, theirs), 1e-4);
}

// 8c with grouped-query attention: a tiny model (4 heads, 2 KV heads) with random weights,
// saved through the Checkpointer and exported with export_hf.
TEST(CheckpointHf, GqaModelMatchesIndependentPythonLlama) {
  if (!python_has_torch_and_safetensors())
    GTEST_SKIP() << "needs python3 with torch and safetensors";
  test::TempDir dir;
  const model::LlamaArgs args = test::tiny_llama_args();
  ASSERT_EQ(args.n_heads, 2 * args.n_kv_heads);
  LocalModel source(args, "tiny", dir.file("source"), /*seed=*/3);
  at::manual_seed(5);
  for (size_t i = 0; i < source.fsdp->num_units(); ++i) {
    auto& u = source.fsdp->unit(i);
    for (const auto& p : u.layout.params) {
      at::Tensor w = u.master.narrow(0, p.offset, p.numel);
      if (contains(p.name, "norm")) {
        w.copy_(1 + 0.2 * at::randn({p.numel}));
      } else {
        w.copy_(0.1 * at::randn({p.numel}));
      }
    }
  }
  source.ck->save(1, /*model_only=*/true, at::kFloat);
  checkpoint::export_hf(dir.file("hf"), source.state, *source.runtime, "float32");
  EXPECT_EQ(read_json(dir.file("hf") + "/config.json")["num_key_value_heads"], 2);

  LocalModel m(args, "tiny", dir.file("local"), /*seed=*/4);
  m.ck->load(source.ck->folder() + "/step-1", {"model"});
  const at::Tensor tokens = fixed_tokens(20, args.vocab_size);
  const at::Tensor ours = m.logits(tokens);
  const at::Tensor theirs = python_logits(dir, dir.file("hf"), tokens);
  ASSERT_TRUE(theirs.defined());
  ASSERT_EQ(ours.sizes(), theirs.sizes());
  EXPECT_LT(max_relative_error(ours, theirs), 1e-4);
  // The comparison is sensitive to the q/k permutation: skipping it breaks the match.
  LocalModel wrong(args, "tiny", dir.file("wrong"), 4);
  wrong.ck->load(source.ck->folder() + "/step-1", {"model"});
  for (size_t i = 1; i + 1 < wrong.fsdp->num_units(); ++i) {
    auto& u = wrong.fsdp->unit(i);
    const auto& wq = u.layout.param("attention.wq.weight");
    at::Tensor q = u.master.narrow(0, wq.offset, wq.numel).view(wq.shape);
    q.copy_(checkpoint::permute_to_hf(q.clone(), args.n_heads));
  }
  EXPECT_GT(max_relative_error(wrong.logits(tokens), theirs), 1e-3);
}

// 8d. HF folders as Hugging Face writes Llama 3.1 / 3.2 models (RoPE scaling "llama3", a
// rope_theta and rms_norm_eps other than the flavor's, tied embeddings), written by
// transformers where it is installed (the GPU machine) and by hand otherwise: `convert --to
// titan` adopts config.json's values, titan's loss on the imported weights equals the
// independent reference's (transformers where installed) to 1e-5 in fp32, and `convert --to
// hf` writes a folder that scores the same.
TEST(CheckpointHf, RopeScalingAndTiedFoldersImportExactlyAndRoundTrip) {
  if (!python_has_torch_and_safetensors())
    GTEST_SKIP() << "needs python3 with torch and safetensors";
  const bool transformers = test::python_can_import("transformers");
  struct Case {
    const char* name;
    std::string extra;  // config.json entries beyond the dims
  };
  const std::vector<Case> cases = {
      {"llama31_scaled",
       R"("rope_theta": 10000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": false,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64})"},
      {"llama32_tied", R"("rope_theta": 500000.0, "rms_norm_eps": 1e-05,
                          "tie_word_embeddings": true, "rope_scaling": null)"},
  };
  const auto flavor = model::llama_flavor("debugmodel");
  const at::Tensor tokens = fixed_tokens(128, flavor.vocab_size);
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    test::TempDir dir;
    const std::string config =
        std::string(R"({"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 16,
            "num_key_value_heads": 16, "intermediate_size": 768, "vocab_size": 2048,
            "head_dim": 16, "max_position_embeddings": 2048, )") +
        c.extra + "}";
    test::write_file(dir.file("write.py"), kWriteHfFolderPy);
    auto w = test::run_process({test::python(), dir.file("write.py"), dir.file("hf"), config});
    ASSERT_EQ(w.exit_code, 0) << w.output;
    auto in = test::run_titan_train(
        {"convert", "--to", "titan", "--input", dir.file("hf"), "--output", dir.file("conv")});
    ASSERT_EQ(in.exit_code, 0) << in.output;
    // The adopted values are announced and recorded in the checkpoint.
    const std::string conv = dir.file("conv") + "/step-0";
    model::LlamaArgs args = flavor;
    checkpoint::adopt_checkpoint_model_args(conv, args, "debugmodel");
    if (std::string(c.name) == "llama31_scaled") {
      EXPECT_TRUE(contains(in.output, "RoPE theta 10000, llama3 scaling (factor 8")) << in.output;
      EXPECT_EQ(args.rope_theta, 10000.0);
      EXPECT_EQ(args.norm_eps, 1e-6);
      EXPECT_EQ(args.rope_original_max_positions, 64);
    } else {
      EXPECT_TRUE(contains(in.output, "tie_word_embeddings")) << in.output;
      EXPECT_EQ(args.rope_scaling_factor, 0.0);
    }
    LocalModel m(args, "debugmodel", dir.file("local"), /*seed=*/1);
    m.ck->load(conv, {"model"});
    const double ours = next_token_loss(m.logits(tokens), tokens);
    const at::Tensor ref_logits = python_logits(dir, dir.file("hf"), tokens, transformers);
    ASSERT_TRUE(ref_logits.defined());
    const double theirs = next_token_loss(ref_logits, tokens);
    EXPECT_NEAR(ours, theirs, 1e-5 * theirs) << (transformers ? "transformers" : "reference");
    // Without adopting (the flavor's own RoPE), the scaled model computes something else.
    if (std::string(c.name) == "llama31_scaled") {
      LocalModel plain(flavor, "debugmodel", dir.file("plain"), 1);
      for (size_t i = 0; i < m.fsdp->num_units(); ++i) {
        plain.fsdp->unit(i).master.copy_(m.fsdp->unit(i).master);
      }
      EXPECT_GT(std::abs(next_token_loss(plain.logits(tokens), tokens) - theirs), 1e-3);
    }
    // And back to HF: the written folder scores the same.
    auto out = test::run_titan_train(
        {"convert", "--to", "hf", "--input", conv, "--output", dir.file("hf2")});
    ASSERT_EQ(out.exit_code, 0) << out.output;
    const json cfg2 = read_json(dir.file("hf2") + "/config.json");
    EXPECT_EQ(cfg2["rope_theta"].get<double>(), args.rope_theta);
    EXPECT_EQ(cfg2["rms_norm_eps"].get<double>(), args.norm_eps);
    EXPECT_EQ(cfg2.contains("rope_scaling") && !cfg2["rope_scaling"].is_null(),
              args.rope_scaling_factor > 0);
    const at::Tensor back = python_logits(dir, dir.file("hf2"), tokens, transformers);
    ASSERT_TRUE(back.defined());
    EXPECT_NEAR(next_token_loss(back, tokens), theirs, 1e-5 * theirs);
  }
}

// Folders titan cannot compute exactly are rejected with the key named.
TEST(CheckpointHf, UnsupportedRopeScalingIsRejected) {
  test::TempDir dir;
  fs::create_directories(dir.file("hf"));
  test::write_file(dir.file("hf") + "/config.json",
                   R"({"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 16,
                       "num_key_value_heads": 16, "intermediate_size": 768, "vocab_size": 2048,
                       "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})");
  auto r = test::run_titan_train(
      {"convert", "--to", "titan", "--input", dir.file("hf"), "--output", dir.file("out")});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "rope_scaling type \"yarn\" is not supported")) << r.output;
}

// 9. convert's usage errors exit non-zero with a message.
TEST(CheckpointConvert, UsageErrorsAreReported) {
  test::TempDir dir;
  struct Case {
    std::vector<std::string> args;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"convert", "--to", "hf", "--input", dir.file("nowhere"), "--output", dir.file("out")},
       "--input " + dir.file("nowhere") + " does not exist"},
      {{"convert", "--to", "onnx", "--input", dir.path(), "--output", dir.file("out")},
       "--to must be hf or titan, got \"onnx\""},
      {{"convert", "--to", "hf", "--input", dir.path(), "--output", dir.file("out"),
        "--frobnicate"},
       "unknown argument --frobnicate"},
      {{"convert", "--to", "hf", "--output", dir.file("out")}, "--input and --output are required"},
      {{"convert", "--to", "hf", "--input"}, "--input needs a value"},
      {{"convert", "--to", "hf", "--input", dir.path(), "--output", dir.file("out"), "--dtype",
        "int8"},
       "--dtype must be float32, bfloat16 or float16"},
      {{"convert", "--to", "hf", "--input", dir.path(), "--output", dir.file("out")},
       "holds no complete checkpoint"},
      {{"convert", "--to", "titan", "--input", dir.path(), "--output", dir.file("out")},
       "config.json"},
  };
  for (const auto& c : cases) {
    const auto r = test::run_titan_train(c.args);
    EXPECT_NE(r.exit_code, 0) << r.output;
    EXPECT_TRUE(contains(r.output, "titan_train: error: ")) << r.output;
    EXPECT_TRUE(contains(r.output, c.message)) << "want \"" << c.message << "\" in:\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(dir.file("out")));
}
