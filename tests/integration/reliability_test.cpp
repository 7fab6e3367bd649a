// Nothing a user has is lost: diverged runs never save non-finite states nor lose the last
// finite checkpoint; two runs cannot share a dump folder; metrics.jsonl is a log kept across
// runs; dying or disagreeing ranks are named within the timeouts; resumes refuse other data
// and non-finite weights; finished runs extend from their newest full checkpoint; damaged or
// failed saves are named and cleaned up.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "support/test_support.h"
#include "titan/checkpoint/checkpointer.h"
#include "titan/checkpoint/safetensors.h"

using namespace titan;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kDebugConfig = std::string(TITAN_SOURCE_DIR) + "/configs/debug_model.toml";

std::vector<std::string> job(const std::string& dump, int64_t steps,
                             std::vector<std::string> extra = {}) {
  std::vector<std::string> a = {"--job.config_file",
                                kDebugConfig,
                                "--job.dump_folder",
                                dump,
                                "--training.steps",
                                std::to_string(steps),
                                "--training.seq_len",
                                "64",
                                "--training.local_batch_size",
                                "4",
                                "--metrics.log_freq",
                                "1",
                                "--lr_scheduler.warmup_steps",
                                "2"};
  a.insert(a.end(), extra.begin(), extra.end());
  return a;
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

std::vector<int64_t> steps_in(const std::string& dump) {
  std::vector<int64_t> out;
  for (const auto& [s, _] : checkpoint::Checkpointer::complete_steps(dump + "/checkpoint")) {
    out.push_back(s);
  }
  return out;
}

// Whether every model weight of a checkpoint step folder is finite.
bool weights_finite(const std::string& step_dir) {
  for (const auto& [name, t] : test::read_checkpoint_weights(step_dir)) {
    if (!at::isfinite(t).all().item<bool>()) return false;
  }
  return true;
}

// The records of metrics.jsonl, in order.
std::vector<json> records(const std::string& dump) {
  std::vector<json> out;
  std::ifstream in(dump + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
}

pid_t spawn_train(const std::vector<std::string>& args, const std::string& log) {
  const pid_t pid = fork();
  if (pid == 0) {
    FILE* f = std::freopen(log.c_str(), "w", stdout);
    (void)f;
    dup2(1, 2);
    putenv(strdup("TITAN_DEVICE=cpu"));
    putenv(strdup("OMP_NUM_THREADS=1"));
    std::vector<std::string> argv = {TITAN_TRAIN_BINARY};
    argv.insert(argv.end(), args.begin(), args.end());
    std::vector<char*> c;
    for (auto& a : argv) c.push_back(a.data());
    c.push_back(nullptr);
    execv(c[0], c.data());
    _exit(127);
  }
  return pid;
}

}  // namespace

// 1. The issue's run: lr 1e6 diverges within a few steps. No non-finite state is saved, the
// error names the first non-finite step at once (not at the next logged step), and the last
// finite checkpoint survives retention.
TEST(Reliability, DivergedRunNeverSavesNonFiniteState) {
  test::TempDir dir;
  const auto r = test::run_titan_train(
      job(dir.file("run"), 20,
          {"--metrics.log_freq", "10", "--checkpoint.enable", "--checkpoint.interval", "2",
           "--checkpoint.keep_latest_k", "2", "--optimizer.lr", "1e6"}));
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "training diverged")) << r.output;
  EXPECT_FALSE(contains(r.output, "internal error")) << r.output;
  const auto steps = steps_in(dir.file("run"));
  ASSERT_FALSE(steps.empty()) << r.output;
  for (int64_t s : steps) {
    EXPECT_TRUE(weights_finite(dir.file("run") + "/checkpoint/step-" + std::to_string(s))) << s;
  }
  // A resume loads a finite state (and diverges again at that lr).
  const auto again = test::run_titan_train(
      job(dir.file("run"), 20, {"--checkpoint.enable", "--checkpoint.interval", "2"}));
  EXPECT_TRUE(contains(again.output, "resuming after step " + std::to_string(steps.back())))
      << again.output;
}

// 1b. Checkpoints holding NaN (as older titan versions saved them): retention keeps the newest
// finite one, and a resume from a non-finite one is refused unless asked for.
TEST(Reliability, NonFiniteCheckpointsAreNeverTheOnlyOnesAndAreNotResumedSilently) {
  test::TempDir dir;
  const auto r = test::run_titan_train(
      job(dir.file("run"), 20,
          {"--metrics.log_freq", "10", "--checkpoint.enable", "--checkpoint.interval", "2",
           "--checkpoint.keep_latest_k", "2", "--optimizer.lr", "1e6"}),
      {"TITAN_TEST_ALLOW_NONFINITE_SAVE=1"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  const auto steps = steps_in(dir.file("run"));
  ASSERT_GE(steps.size(), 2u) << r.output;
  bool newest_finite_kept = false;
  for (int64_t s : steps) {
    newest_finite_kept |= weights_finite(dir.file("run") + "/checkpoint/step-" + std::to_string(s));
  }
  EXPECT_TRUE(newest_finite_kept) << "retention removed every finite checkpoint";
  ASSERT_FALSE(
      weights_finite(dir.file("run") + "/checkpoint/step-" + std::to_string(steps.back())));
  const auto refused = test::run_titan_train(
      job(dir.file("run"), 30, {"--checkpoint.enable", "--checkpoint.interval", "2"}));
  EXPECT_EQ(refused.exit_code, 2) << refused.output;
  EXPECT_TRUE(contains(refused.output, "non-finite (NaN/Inf) weight elements")) << refused.output;
  EXPECT_TRUE(contains(refused.output, "checkpoint.allow_nonfinite_load")) << refused.output;
  const auto forced =
      test::run_titan_train(job(dir.file("run"), 30,
                                {"--checkpoint.enable", "--checkpoint.interval", "2",
                                 "--checkpoint.load_only", "--checkpoint.allow_nonfinite_load"}));
  EXPECT_TRUE(contains(forced.output, "loaded anyway")) << forced.output;
}

// 2. A second run on a dump folder in use fails at start, naming the first run's host and pid;
// the lock goes with the process, however it ends.
TEST(Reliability, TwoRunsCannotShareADumpFolder) {
  test::TempDir dir;
  const pid_t first = spawn_train(job(dir.file("run"), 100000), dir.file("first.log"));
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(dir.file("run") + "/metrics.jsonl") &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const auto second = test::run_titan_train(job(dir.file("run"), 2));
  EXPECT_EQ(second.exit_code, 2) << second.output;
  EXPECT_TRUE(contains(second.output, "is in use by another titan run")) << second.output;
  EXPECT_TRUE(contains(second.output, "pid " + std::to_string(first))) << second.output;
  ::kill(first, SIGKILL);
  int status = 0;
  waitpid(first, &status, 0);
  const auto third = test::run_titan_train(job(dir.file("run"), 2));
  EXPECT_EQ(third.exit_code, 0) << third.output;
}

// 3. metrics.jsonl keeps every run's records: a resume drops only the interrupted tail after its
// checkpoint (and any cut line), re-running a finished job keeps everything, and a write error
// is reported.
TEST(Reliability, MetricsHistorySurvivesResumesAndReruns) {
  test::TempDir dir;
  const std::string run = dir.file("run");
  const std::vector<std::string> ck = {"--checkpoint.enable", "--checkpoint.interval", "3",
                                       "--checkpoint.last_save_model_only", "false"};
  ASSERT_EQ(test::run_titan_train(job(run, 6, ck)).exit_code, 0);
  // An interrupted tail: two records past the checkpoint, and a line cut by a crash.
  {
    std::ofstream out(run + "/metrics.jsonl", std::ios::app);
    out << R"({"step": 7, "loss": 1.0})"
        << "\n"
        << R"({"step": 8, "loss": 1.0})"
        << "\n"
        << R"({"step": 9, "lo)";
  }
  const auto resumed = test::run_titan_train(job(run, 9, ck));
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  std::vector<int64_t> steps;
  std::vector<std::string> events;
  for (const auto& r : records(run)) {
    if (r.contains("event"))
      events.push_back(r["event"].get<std::string>() + " " +
                       std::to_string(r["step"].get<int64_t>()));
    if (r.contains("loss")) steps.push_back(r["step"].get<int64_t>());
  }
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(events, (std::vector<std::string>{"start 0", "resume 6"}));
  // Re-running the finished job: nothing is lost, the rerun is recorded.
  ASSERT_EQ(test::run_titan_train(job(run, 9, ck)).exit_code, 0);
  EXPECT_EQ(records(run).size(), 9u + 3u);
  // A full disk: writing metrics fails loudly instead of leaving an empty log behind.
  fs::create_directories(dir.file("full"));
  fs::create_symlink("/dev/full", dir.file("full") + "/metrics.jsonl");
  const auto full = test::run_titan_train(job(dir.file("full"), 5));
  EXPECT_EQ(full.exit_code, 2) << full.output;
  EXPECT_TRUE(contains(full.output, "No space left on device")) << full.output;
}

// 4. A rank that dies during a save is named within the training timeout; a rank that dies
// mid-collective is named as dead by its peer, not reported as an internal error.
TEST(Reliability, DeadRanksAreNamedWithinTheTrainTimeout) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY};
  const auto args = job(
      dir.file("save"), 6,
      {"--checkpoint.enable", "--checkpoint.interval", "3", "--comm.train_timeout_seconds", "5"});
  argv.insert(argv.end(), args.begin(), args.end());
  auto results = test::run_ranks(argv, 2, {"TITAN_TEST_FAULT=1:save"}, 200);
  ASSERT_EQ(results.size(), 2u);
  EXPECT_EQ(results[1].exit_code, 137);
  EXPECT_EQ(results[0].exit_code, 2) << results[0].output;
  EXPECT_TRUE(contains(results[0].output,
                       "rank(s) 1 did not finish writing within 5 s "
                       "(comm.train_timeout_seconds)"))
      << results[0].output;
  EXPECT_FALSE(fs::exists(dir.file("save") + "/checkpoint/step-3.partial"));

  argv = {TITAN_TRAIN_BINARY};
  const auto args2 = job(dir.file("step"), 10, {"--comm.train_timeout_seconds", "30"});
  argv.insert(argv.end(), args2.begin(), args2.end());
  results = test::run_ranks(argv, 2, {"TITAN_TEST_FAULT=1:step3"}, 200);
  EXPECT_EQ(results[1].exit_code, 137);
  EXPECT_NE(results[0].exit_code, 0);
  EXPECT_FALSE(contains(results[0].output, "internal error")) << results[0].output;
  EXPECT_TRUE(contains(results[0].output, "rank 1 stopped")) << results[0].output;
}

// 5. Ranks that disagree on the world size, the config or the build fail at rendezvous, naming
// the rank that differs.
TEST(Reliability, RanksThatDisagreeFailAtRendezvous) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY};
  const auto args = job(dir.file("world"), 2, {"--comm.init_timeout_seconds", "20"});
  argv.insert(argv.end(), args.begin(), args.end());
  auto results = test::run_ranks(argv, 2, {}, 120, {}, {{}, {"WORLD_SIZE=3"}});
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(contains(r.output, "rank 1 has WORLD_SIZE 3 where rank 0 has 2")) << r.output;
  }
  // A rank with another override: a different job.
  results = test::run_ranks(argv, 2, {}, 120, {}, {{}, {"--optimizer.lr", "0.1"}});
  for (const auto& r : results) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_TRUE(contains(r.output, "rank 1 resolved a different job config than rank 0"))
        << r.output;
  }
}

// 6. A resume on other data is refused (both named) unless the change is declared.
TEST(Reliability, ResumeOnOtherDataIsRefusedUnlessDeclared) {
  test::TempDir dir;
  std::string a, b;
  for (int i = 0; i < 400; ++i) {
    a += "the quick brown fox " + std::to_string(i) + " jumps over the lazy dog.\n";
    b += "a completely different corpus line " + std::to_string(i * 7) + "\n";
  }
  test::write_file(dir.file("a.txt"), a);
  test::write_file(dir.file("b.txt"), b);
  const std::vector<std::string> ck = {"--checkpoint.enable",
                                       "--checkpoint.interval",
                                       "3",
                                       "--checkpoint.last_save_model_only",
                                       "false",
                                       "--training.dataset",
                                       "text"};
  auto with = [&](const std::string& file, std::vector<std::string> extra = {}) {
    auto args = job(dir.file("run"), 6, ck);
    args.push_back("--training.dataset_path");
    args.push_back(file);
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  };
  ASSERT_EQ(test::run_titan_train(with(dir.file("a.txt"))).exit_code, 0);
  const json meta =
      json::parse(test::read_file(dir.file("run") + "/checkpoint/step-6/metadata.json"));
  EXPECT_EQ(meta["data"]["tokenizer"]["vocab_size"], 258);
  EXPECT_EQ(meta["data"]["dataset"]["files"][0][0], "a.txt");
  auto refused = test::run_titan_train(with(dir.file("b.txt"), {"--training.steps", "9"}));
  EXPECT_EQ(refused.exit_code, 2) << refused.output;
  EXPECT_TRUE(contains(refused.output, "was trained on other data")) << refused.output;
  EXPECT_TRUE(contains(refused.output, "a.txt")) << refused.output;
  EXPECT_TRUE(contains(refused.output, "b.txt")) << refused.output;
  auto allowed = test::run_titan_train(
      with(dir.file("b.txt"), {"--training.steps", "9", "--checkpoint.allow_data_change"}));
  EXPECT_EQ(allowed.exit_code, 0) << allowed.output;
}

// 7, 9, 10. Checkpoints a run does not use are announced; extending a finished run resumes from
// its newest full checkpoint and says what it loaded; folders without an index are named.
TEST(Reliability, ExtendingAFinishedRunAndUnusedOrBrokenCheckpoints) {
  test::TempDir dir;
  const std::string run = dir.file("run");
  // step-3 full, step-6 weights only (torchtitan's default final save). One lr schedule for
  // every run (9 steps), so the extended run can match one that never stopped.
  const std::vector<std::string> ck = {"--checkpoint.enable",
                                       "--checkpoint.interval",
                                       "3",
                                       "--checkpoint.last_save_model_only",
                                       "true",
                                       "--lr_scheduler.total_steps",
                                       "9"};
  ASSERT_EQ(test::run_titan_train(job(run, 6, ck)).exit_code, 0);
  auto ext = test::run_titan_train(job(run, 9, ck));
  ASSERT_EQ(ext.exit_code, 0) << ext.output;
  EXPECT_TRUE(contains(ext.output,
                       "holds weights only (a finished run's final save); resuming "
                       "from " +
                           run + "/checkpoint/step-3"))
      << ext.output;
  EXPECT_TRUE(
      contains(ext.output,
               "(model, optimizer, dataloader, train_state (step 3), lr_scheduler (position 3))"))
      << ext.output;
  // The same losses as a run that never stopped.
  const auto ref = test::run_titan_train(job(dir.file("ref"), 9, ck));
  ASSERT_EQ(ref.exit_code, 0);
  auto losses = [](const std::string& dump) {
    std::map<int64_t, double> out;
    for (const auto& r : records(dump)) {
      if (r.contains("loss")) out[r["step"].get<int64_t>()] = r["loss"].get<double>();
    }
    return out;
  };
  EXPECT_EQ(losses(run), losses(dir.file("ref")));

  const auto unused = test::run_titan_train(job(run, 2));
  EXPECT_EQ(unused.exit_code, 0) << unused.output;
  EXPECT_TRUE(contains(unused.output, "that this run does NOT use")) << unused.output;

  fs::remove(run + "/checkpoint/step-9/metadata.json");
  const auto skipped = test::run_titan_train(job(run, 9, ck));
  EXPECT_TRUE(contains(skipped.output, "skipping " + run +
                                           "/checkpoint/step-9: it has no "
                                           "metadata.json"))
      << skipped.output;
}

// 11. A failed save leaves no partial folder; an asynchronous save's failure surfaces at the next
// step; logs written to a pipe carry no color codes; a tiny dataset warns once.
TEST(Reliability, FailedSavesAndSmallerThings) {
  test::TempDir dir;
  auto failed = test::run_titan_train(
      job(dir.file("sync"), 6, {"--checkpoint.enable", "--checkpoint.interval", "2"}),
      {"TITAN_TEST_FAIL_SAVE=4"});
  EXPECT_EQ(failed.exit_code, 2) << failed.output;
  EXPECT_FALSE(fs::exists(dir.file("sync") + "/checkpoint/step-4.partial"));
  EXPECT_FALSE(fs::exists(dir.file("sync") + "/checkpoint/step-4"));
  EXPECT_TRUE(fs::exists(dir.file("sync") + "/checkpoint/step-2"));

  auto async = test::run_titan_train(job(dir.file("async"), 8,
                                         {"--checkpoint.enable", "--checkpoint.interval", "2",
                                          "--checkpoint.async_mode", "async"}),
                                     {"TITAN_TEST_FAIL_SAVE=2"});
  EXPECT_EQ(async.exit_code, 2) << async.output;
  EXPECT_TRUE(contains(async.output, "test hook failed the save")) << async.output;
  int64_t last = 0;
  for (const auto& r : records(dir.file("async"))) {
    if (r.contains("loss")) last = r["step"].get<int64_t>();
  }
  EXPECT_LT(last, 4) << "the failure of step 2's save surfaced only at the next save";

  EXPECT_FALSE(contains(failed.output, "\033[")) << "color codes in piped output";

  test::write_file(dir.file("tiny.txt"), "tiny\n");
  auto tiny = test::run_titan_train(
      job(dir.file("tiny"), 2,
          {"--training.dataset", "text", "--training.dataset_path", dir.file("tiny.txt")}));
  EXPECT_EQ(tiny.exit_code, 0) << tiny.output;
  EXPECT_TRUE(contains(tiny.output, "holds less than one batch")) << tiny.output;
  size_t relooped = 0;
  for (size_t p = tiny.output.find("re-looping"); p != std::string::npos;
       p = tiny.output.find("re-looping", p + 1)) {
    ++relooped;
  }
  EXPECT_LE(relooped, 3u) << tiny.output.substr(0, 3000);
}

// 12. What a run would only find out late is checked at start-up: an unusable checkpoint folder,
// a missing or too small validation dataset, a checkpoint of another model (before the model is
// built). A resume whose lr schedule differs from the checkpoint's says so; a damaged newest
// checkpoint's error names the older ones; token shards of another tokenizer are named.
TEST(Reliability, StartupChecksAndResumeWarnings) {
  test::TempDir dir;
  auto no_steps = [](const std::string& out) { return !contains(out, "step:"); };
  // A file where the checkpoint folder should be.
  fs::create_directories(dir.file("blocked"));
  test::write_file(dir.file("blocked") + "/checkpoint", "not a folder\n");
  auto blocked = test::run_titan_train(
      job(dir.file("blocked"), 4, {"--checkpoint.enable", "--checkpoint.interval", "2"}));
  EXPECT_EQ(blocked.exit_code, 2) << blocked.output;
  EXPECT_TRUE(contains(blocked.output, "checkpoint.folder")) << blocked.output;
  EXPECT_TRUE(no_steps(blocked.output)) << blocked.output;

  auto validation = test::run_titan_train(job(dir.file("val"), 4,
                                              {"--validation.enable", "--validation.freq", "2",
                                               "--validation.dataset_path", dir.file("nowhere")}));
  EXPECT_EQ(validation.exit_code, 2) << validation.output;
  EXPECT_TRUE(contains(validation.output,
                       "validation.dataset_path: " + dir.file("nowhere") + " does not exist"))
      << validation.output;
  EXPECT_TRUE(no_steps(validation.output)) << validation.output;
  // Validation data too small for one batch, also before the first step.
  test::write_file(dir.file("small.jsonl"), "{\"text\": \"too short\"}\n");
  auto small = test::run_titan_train(job(dir.file("small"), 4,
                                         {"--validation.enable", "--validation.freq", "2",
                                          "--validation.dataset_path", dir.file("small.jsonl")}));
  EXPECT_EQ(small.exit_code, 2) << small.output;
  EXPECT_TRUE(contains(small.output, "holds less than one batch")) << small.output;
  EXPECT_TRUE(no_steps(small.output)) << small.output;

  // Four steps saved at 2 and 4, then resumed for six: the schedule stretched is named.
  const std::string run = dir.file("run");
  const std::vector<std::string> ck = {"--checkpoint.enable", "--checkpoint.interval", "2"};
  ASSERT_EQ(test::run_titan_train(job(run, 4, ck)).exit_code, 0);
  auto longer = test::run_titan_train(job(run, 6, ck));
  EXPECT_EQ(longer.exit_code, 0) << longer.output;
  EXPECT_TRUE(contains(longer.output,
                       "another learning-rate schedule (lr_scheduler.total_steps "
                       "(else training.steps) 4 -> 6)"))
      << longer.output;

  // Another flavor: refused before any weights are initialized.
  auto other = test::run_titan_train(
      job(run, 8, {"--checkpoint.enable", "--model.flavor", "debugmodel_gqa"}));
  EXPECT_EQ(other.exit_code, 2) << other.output;
  EXPECT_TRUE(contains(other.output, "holds a different model")) << other.output;
  EXPECT_FALSE(contains(other.output, "initialized weights")) << other.output;

  // The newest checkpoint damaged (its index cut short): the older ones are named.
  const std::string index = run + "/checkpoint/step-6/metadata.json";
  const std::string text = test::read_file(index);
  test::write_file(index, text.substr(0, text.size() / 2));
  auto damaged = test::run_titan_train(job(run, 8, ck));
  EXPECT_EQ(damaged.exit_code, 2) << damaged.output;
  EXPECT_TRUE(contains(damaged.output, "older checkpoints in " + run + "/checkpoint: step 2, 4"))
      << damaged.output;
  EXPECT_FALSE(contains(damaged.output, "[json.exception")) << damaged.output;

  // Token shards written with the byte tokenizer, trained with a BPE one.
  test::write_file(dir.file("docs.jsonl"), "{\"text\": \"hello world, again and again\"}\n");
  auto shards = test::run_process(
      {TITAN_TOKENIZE_BINARY, "--output", dir.file("shards"), dir.file("docs.jsonl")});
  ASSERT_EQ(shards.exit_code, 0) << shards.output;
  auto mismatch = test::run_titan_train(
      job(dir.file("mismatch"), 1,
          {"--training.dataset_path", dir.file("shards"), "--model.hf_assets_path",
           std::string(TITAN_SOURCE_DIR) + "/tests/data/torchtitan/v0.2.2/tokenizer"}));
  EXPECT_EQ(mismatch.exit_code, 0) << mismatch.output;
  EXPECT_TRUE(contains(mismatch.output,
                       "was written with a tokenizer of 258 ids, but the job's "
                       "tokenizer"))
      << mismatch.output;
}

// 4b. An unresolvable MASTER_ADDR fails within the init timeout, named.
TEST(Reliability, UnresolvableMasterAddressIsNamed) {
  TITAN_REQUIRE_GLOO();
  test::TempDir dir;
  std::vector<std::string> argv = {TITAN_TRAIN_BINARY};
  const auto args = job(dir.file("addr"), 2, {"--comm.init_timeout_seconds", "5"});
  argv.insert(argv.end(), args.begin(), args.end());
  auto results = test::run_ranks(argv, 2, {}, 120, {1}, {{}, {"MASTER_ADDR=no-such-host.invalid"}});
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results[0].exit_code, 2) << results[0].output;
  EXPECT_TRUE(contains(results[0].output, "MASTER_ADDR no-such-host.invalid")) << results[0].output;
}

// scripts/launch.sh with two ranks of a bash script.
test::ProcessResult launch_two_ranks(const std::string& script) {
  return test::run_process({"/bin/bash", std::string(TITAN_SOURCE_DIR) + "/scripts/launch.sh",
                            "/bin/bash", "-c", script},
                           {"NPROC=2"});
}

// 4c. scripts/launch.sh: when one rank fails, every process of every other rank ends too (its
// process group), and the launch exits with the failing rank's status.
TEST(Reliability, LaunchStopsEveryProcessOfEveryRankWhenOneFails) {
  test::TempDir dir;
  const std::string marker = dir.file("survivor");
  // Rank 1 fails after a moment; rank 0 starts a grandchild that would outlive a plain kill.
  const std::string script =
      "if [ \"$RANK\" = 1 ]; then sleep 1; exit 7; fi; "
      "(sleep 3; touch " +
      marker + ") & sleep 30";
  const auto r = launch_two_ranks(script);
  EXPECT_EQ(r.exit_code, 7) << r.output;
  EXPECT_TRUE(contains(r.output, "rank 1 exited with status 7; stopping the other ranks"))
      << r.output;
  // Nothing of rank 0 is left to create the marker.
  std::this_thread::sleep_for(std::chrono::seconds(4));
  EXPECT_FALSE(fs::exists(marker)) << "a process of rank 0 outlived the launch";
  // A rank the kernel kills (as its out-of-memory killer does) is said to be killed.
  const auto killed = launch_two_ranks("if [ \"$RANK\" = 1 ]; then kill -KILL $$; fi; sleep 30");
  EXPECT_EQ(killed.exit_code, 137) << killed.output;
  EXPECT_TRUE(contains(killed.output,
                       "rank 1 was killed by SIGKILL: most often the kernel's "
                       "out-of-memory killer"))
      << killed.output;
}

// 5. Host memory running out (here an address-space limit, as a CPU run of a model too large
// for the host meets it) is a clear error: the failed allocation, the plan's estimate, the
// bound that applies and what to change, exit status 2 (not an internal error). The start-up
// warning names the same bound.
TEST(Reliability, RunningOutOfHostMemoryIsAClearError) {
#ifdef TITAN_WITH_CUDA
  GTEST_SKIP() << "ulimit -v leaves CUDA no address space to start in";
#endif
  test::TempDir dir;
  std::string cmd = "ulimit -v 1500000 && exec '" + std::string(TITAN_TRAIN_BINARY) + "'";
  for (const auto& a : job(dir.file("oom"), 2, {"--model.flavor", "1B"})) cmd += " '" + a + "'";
  // One thread: no thread stacks and arenas reserved before the first large allocation (the
  // 1B embedding's 1.05 GB, more than the limit leaves once the libraries are loaded).
  const auto r =
      test::run_process({"/bin/sh", "-c", cmd}, {"TITAN_DEVICE=cpu", "OMP_NUM_THREADS=1"});
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_TRUE(contains(r.output, "titan_train: error: out of host memory: DefaultCPUAllocator"))
      << r.output;
  EXPECT_TRUE(contains(r.output, "GiB per rank: parameter state 22.3 GiB")) << r.output;
  EXPECT_TRUE(contains(r.output, "(ulimit -v), 1 rank(s) on this host")) << r.output;
  EXPECT_TRUE(contains(r.output, "to fit: a smaller model.flavor")) << r.output;
  EXPECT_TRUE(contains(r.output, "GiB at its peak")) << r.output;
  EXPECT_TRUE(contains(r.output, "but this process may use 1.4 GiB (ulimit -v)")) << r.output;
  EXPECT_FALSE(contains(r.output, "internal error")) << r.output;
}
