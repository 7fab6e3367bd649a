// The data pipeline end to end: scripts/make_example_data.sh makes a JSONL corpus and a BPE
// tokenizer.model, titan_train trains the debug model from it through
// configs/debug_model_jsonl.toml (loss falls, validation runs), and titan_tokenize's shards of
// the same corpus give exactly the same run.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "support/test_support.h"

using namespace titan;
namespace fs = std::filesystem;

namespace {

const std::string kSource = TITAN_SOURCE_DIR;

int64_t count_lines(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  int64_t n = 0;
  while (std::getline(in, line)) ++n;
  return n;
}

}  // namespace

TEST(DataPipeline, ExampleJsonlAndBpeTrainTheDebugModelAndShardsGiveTheSameRun) {
  test::TempDir dir;
  const std::string data = dir.file("example_data");
  auto made = test::run_process(
      {"/bin/bash", kSource + "/scripts/make_example_data.sh", data},
      {std::string("TITAN_TOKENIZE=") + TITAN_TOKENIZE_BINARY, "EXAMPLE_DOCS=6000"});
  ASSERT_EQ(made.exit_code, 0) << made.output;
  EXPECT_EQ(count_lines(data + "/train.jsonl"), 6000);
  EXPECT_EQ(count_lines(data + "/validation.jsonl"), 500);
  const int64_t ranks = count_lines(data + "/tokenizer.model");
  EXPECT_GE(ranks, 800);         // the corpus' small vocabulary supports ~900 of the 1000 asked for
  EXPECT_LE(ranks + 256, 2000);  // fits the debug model's vocabulary

  // clang-format off
  const std::vector<std::string> common = {
      "--job.config_file", kSource + "/configs/debug_model_jsonl.toml",
      "--model.tokenizer_path", data + "/tokenizer.model",
      "--training.steps", "20",
      "--training.seq_len", "128",
      "--validation.dataset_path", data + "/validation.jsonl",
      "--validation.freq", "20",
      "--validation.steps", "2",
      "--validation.seq_len", "128",
      "--metrics.log_freq", "1",
      "--metrics.disable_color_printing"};
  // clang-format on

  auto from_jsonl = common;
  from_jsonl.insert(from_jsonl.end(), {"--training.dataset_path", data + "/train.jsonl",
                                       "--job.dump_folder", dir.file("run_jsonl")});
  auto r = test::run_titan_train(from_jsonl);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tokenizer: tiktoken file " + data + "/tokenizer.model"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("dataset: JSONL file " + data + "/train.jsonl"), std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("validate step:"), std::string::npos) << r.output;
  const auto jsonl_losses = test::read_losses(dir.file("run_jsonl") + "/metrics.jsonl");
  ASSERT_EQ(jsonl_losses.size(), 20u);
  EXPECT_GT(jsonl_losses.front(), 6.5);  // about ln(2000) at initialization
  EXPECT_LT(jsonl_losses.back(), jsonl_losses.front() - 2.0);

  // The same corpus through titan_tokenize's shards: identical batches, identical losses.
  auto tok = test::run_process({TITAN_TOKENIZE_BINARY, "--tokenizer_path",
                                data + "/tokenizer.model", "--output", dir.file("shards"),
                                "--shard_tokens", "100000", data + "/train.jsonl"});
  ASSERT_EQ(tok.exit_code, 0) << tok.output;
  EXPECT_NE(tok.output.find("100.0%"), std::string::npos) << tok.output;
  int shards = 0;
  for (const auto& e : fs::directory_iterator(dir.file("shards"))) {
    shards += e.path().extension() == ".bin";
  }
  EXPECT_GE(shards, 2) << tok.output;
  auto again = test::run_process(
      {TITAN_TOKENIZE_BINARY, "--output", dir.file("shards"), data + "/train.jsonl"});
  EXPECT_NE(again.exit_code, 0);
  EXPECT_NE(again.output.find("already holds shards"), std::string::npos) << again.output;

  auto from_shards = common;
  from_shards.insert(from_shards.end(), {"--training.dataset_path", dir.file("shards"),
                                         "--job.dump_folder", dir.file("run_shards")});
  r = test::run_titan_train(from_shards);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("token shard(s) under " + dir.file("shards")), std::string::npos)
      << r.output;
  EXPECT_EQ(test::read_losses(dir.file("run_shards") + "/metrics.jsonl"), jsonl_losses);
}

TEST(DataPipeline, BadDatasetPathsFailWithTheirName) {
  test::TempDir dir;
  auto r = test::run_titan_train({"--job.config_file", kSource + "/configs/debug_model.toml",
                                  "--training.dataset_path", dir.file("missing.jsonl"),
                                  "--training.steps", "1"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(
      r.output.find("training.dataset_path: " + dir.file("missing.jsonl") + " does not exist"),
      std::string::npos)
      << r.output;
  r = test::run_titan_train({"--job.config_file", kSource + "/configs/debug_model.toml",
                             "--model.tokenizer_path", dir.file("tokenizer.model"),
                             "--training.steps", "1"});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(
      r.output.find("model.tokenizer_path: " + dir.file("tokenizer.model") + " does not exist"),
      std::string::npos)
      << r.output;
}
