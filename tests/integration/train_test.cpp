// titan_train end to end on CPU: the default job trains, logs every metric, is deterministic,
// and gradient accumulation equals one large batch.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "support/test_support.h"

using namespace titan;

namespace {

const std::string kDebugConfig = std::string(TITAN_SOURCE_DIR) + "/configs/debug_model.toml";

std::vector<double> train(const test::TempDir& dir, const std::string& name,
                          std::vector<std::string> extra) {
  std::vector<std::string> args = {"--job.config_file",
                                   kDebugConfig,
                                   "--job.dump_folder",
                                   dir.file(name),
                                   "--metrics.log_freq",
                                   "1",
                                   "--metrics.disable_color_printing"};
  args.insert(args.end(), extra.begin(), extra.end());
  auto r = test::run_titan_train(args);
  EXPECT_EQ(r.exit_code, 0) << r.output;
  return test::read_losses(dir.file(name) + "/metrics.jsonl");
}

}  // namespace

TEST(Training, DebugModelLossFallsAndEveryMetricIsLogged) {
  test::TempDir dir;
  auto losses = train(dir, "run", {"--training.steps", "40", "--training.seq_len", "128"});
  ASSERT_EQ(losses.size(), 40u);
  EXPECT_GT(losses.front(), 7.0);  // about ln(2048) at initialization
  EXPECT_LT(losses.back(), losses.front() - 3.0);
  std::ifstream in(dir.file("run") + "/metrics.jsonl");
  std::string line;
  std::getline(in, line);
  auto j = nlohmann::json::parse(line);
  // The log opens with the run's start event, then one record per logged step.
  EXPECT_EQ(j["event"], "start");
  EXPECT_EQ(j["step"], 0);
  std::getline(in, line);
  j = nlohmann::json::parse(line);
  for (const char* key : {"step", "loss", "grad_norm", "lr", "tps", "tflops", "mfu",
                          "max_memory_gib", "step_seconds", "data_seconds"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_GT(j["tps"].get<double>(), 0);
  EXPECT_TRUE(j["mfu"].is_null());  // a CPU has no peak rate to compare with
}

// torchtitan's debug job file, unchanged, run where torchtitan runs it: the root of a torchtitan
// checkout, whose tests/assets hold its test tokenizer and the c4_test dataset (here a small
// JSONL file standing in for data.json). Only the length of the run is overridden.
namespace {

// torchtitan's tests/assets/c4_test/data.json in a checkout, here a small JSONL file.
void write_c4_test(const std::string& checkout) {
  std::filesystem::create_directories(checkout + "/tests/assets/c4_test");
  std::string jsonl;
  for (int i = 0; i < 64; ++i) {
    jsonl += nlohmann::json{{"text", "Document " + std::to_string(i) +
                                         ": the quick brown fox jumps over the lazy dog, and "
                                         "the dog sleeps on."},
                            {"url", "https://example.com/" + std::to_string(i)}}
                 .dump() +
             "\n";
  }
  test::write_file(checkout + "/tests/assets/c4_test/data.json", jsonl);
}

// titan_train on torchtitan's `job_file`, run from the checkout's root as torchtitan runs it,
// with `overrides` after it.
test::ProcessResult run_in_checkout(const std::string& checkout, const std::string& job_file,
                                    const std::string& overrides) {
  const std::string command = "cd '" + checkout + "' && exec '" + TITAN_TRAIN_BINARY +
                              "' --job.config_file '" + job_file + "' " + overrides +
                              " --metrics.disable_color_printing";
  return test::run_process({"/bin/sh", "-c", command}, {"TITAN_DEVICE=cpu"});
}

}  // namespace

TEST(Training, TorchtitansDebugJobRunsUnchangedInATorchtitanCheckout) {
  test::TempDir dir;
  const std::string checkout = dir.file("torchtitan");
  const std::string fixtures = std::string(TITAN_SOURCE_DIR) + "/tests/data/torchtitan/v0.2.2/";
  std::filesystem::create_directories(checkout + "/tests/assets/tokenizer");
  for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
    std::filesystem::copy_file(fixtures + "tokenizer/" + name,
                               checkout + "/tests/assets/tokenizer/" + name);
  }
  write_c4_test(checkout);
  auto r = run_in_checkout(checkout, fixtures + "debug_model.toml",
                           "--training.steps 3 --training.seq_len 64");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("vocab 2004"), std::string::npos) << r.output;  // BOS/EOS added
  EXPECT_NE(r.output.find("tests/assets/c4_test"), std::string::npos) << r.output;
  const auto losses = test::read_losses(checkout + "/outputs/metrics.jsonl");
  ASSERT_EQ(losses.size(), 3u);
  EXPECT_GT(losses.front(), 7.0);  // about ln(2048)
  EXPECT_LT(losses.back(), losses.front());
}

// v0.1.0's debug job: a tiktoken test tokenizer (2000 ranks + 256 special tokens) in
// model.tokenizer_path, whose ids size the model's vocabulary (v0.1.0 sets vocab_size from the
// tokenizer; the flavor's 2048 would not hold id 2255).
TEST(Training, TorchtitanV010DebugJobSizesTheVocabularyFromItsTokenizer) {
  test::TempDir dir;
  const std::string checkout = dir.file("torchtitan");
  const std::string fixtures = std::string(TITAN_SOURCE_DIR) + "/tests/data/torchtitan/v0.1.0/";
  std::filesystem::create_directories(checkout + "/tests/assets");
  std::filesystem::copy_file(fixtures + "test_tiktoken.model",
                             checkout + "/tests/assets/test_tiktoken.model");
  write_c4_test(checkout);
  auto r = run_in_checkout(checkout, fixtures + "debug_model.toml",
                           "--training.steps 2 --training.seq_len 64 --checkpoint.enable");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("model: vocab 2048 -> 2256"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("vocab 2256 | RoPE"), std::string::npos) << r.output;
  const auto losses = test::read_losses(checkout + "/outputs/metrics.jsonl");
  ASSERT_EQ(losses.size(), 2u);
  EXPECT_GT(losses.front(), 7.0);  // about ln(2256)
  // The checkpoint converts to Hugging Face's format with its vocabulary.
  r = test::run_titan_train({"convert", "--to", "hf", "--input", checkout + "/outputs/checkpoint",
                             "--output", dir.file("hf")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto config = nlohmann::json::parse(test::read_file(dir.file("hf") + "/config.json"));
  EXPECT_EQ(config["vocab_size"], 2256);
}

// job.save_config_file lands under the dump folder, as torchtitan writes it: JSON nested by
// section for a .json name (unset optional values null), TOML that loads back otherwise.
TEST(Training, SavedConfigLandsUnderTheDumpFolder) {
  test::TempDir dir;
  train(dir, "run",
        {"--training.steps", "1", "--training.seq_len", "32", "--job.save_config_file",
         "config/job.json"});
  const auto j = nlohmann::json::parse(test::read_file(dir.file("run") + "/config/job.json"));
  EXPECT_EQ(j["training"]["steps"], 1);
  // Neither file name is saved: a job started from the saved file must not rewrite it.
  EXPECT_EQ(j["job"]["save_config_file"], "");
  EXPECT_EQ(j["job"]["config_file"], "");
  EXPECT_TRUE(j["lr_scheduler"]["total_steps"].is_null());
  EXPECT_EQ(j["quantize"]["linear"]["float8"]["filter_fqns"], std::vector<std::string>{"output"});
  train(
      dir, "toml",
      {"--training.steps", "1", "--training.seq_len", "32", "--job.save_config_file", "job.toml"});
  const std::string saved = test::read_file(dir.file("toml") + "/job.toml");
  auto r = test::run_titan_train({"--job.config_file", dir.file("toml") + "/job.toml",
                                  "--job.print_config", "--training.steps", "2"});
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("seq_len = 32"), std::string::npos) << r.output;
  EXPECT_EQ(test::read_file(dir.file("toml") + "/job.toml"), saved);
}

TEST(Training, SameSeedSameLossesOtherSeedOtherLosses) {
  test::TempDir dir;
  std::vector<std::string> common = {"--training.steps", "5", "--training.seq_len", "64"};
  auto a = train(dir, "a", common);
  auto b = train(dir, "b", common);
  auto extra = common;
  extra.insert(extra.end(), {"--debug.seed", "1"});
  auto c = train(dir, "c", extra);
  ASSERT_EQ(a.size(), 5u);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
}

TEST(Training, GradientAccumulationEqualsOneLargeBatch) {
  test::TempDir dir;
  std::vector<std::string> common = {"--training.steps", "6", "--training.seq_len", "64"};
  auto big = common;
  big.insert(big.end(), {"--training.local_batch_size", "8"});
  auto accum = common;
  accum.insert(accum.end(),
               {"--training.local_batch_size", "2", "--training.global_batch_size", "8"});
  auto a = train(dir, "big", big);
  auto b = train(dir, "accum", accum);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 6u);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-5 * a[i]) << i;
}

TEST(Training, EveryShippedConfigLoads) {
  for (const auto& entry :
       std::filesystem::directory_iterator(std::string(TITAN_SOURCE_DIR) + "/configs")) {
    auto r = test::run_titan_train({"--job.config_file", entry.path().string(), "--help"});
    EXPECT_EQ(r.exit_code, 0) << entry.path();
    auto p = test::run_process({TITAN_TRAIN_BINARY, "--job.config_file", entry.path().string(),
                                "--job.print_config", "--training.steps", "-3"});
    // The file parses; only the deliberate override fails validation.
    EXPECT_NE(p.output.find("training.steps: value -3 is out of range"), std::string::npos)
        << entry.path() << p.output;
  }
}

TEST(Training, BadGlobalBatchIsRejected) {
  auto r = test::run_titan_train({"--job.config_file", kDebugConfig, "--training.global_batch_size",
                                  "12", "--training.local_batch_size", "8"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("training.global_batch_size (12) must be a multiple"), std::string::npos)
      << r.output;
}
