// Config: TOML + CLI parsing, aliases, and every class of bad input.
#include <gtest/gtest.h>

#include "support/test_support.h"
#include "titan/config/job_config.h"
#include "titan/util/error.h"

using titan::Error;
using titan::config::apply_cli;
using titan::config::apply_toml;
using titan::config::JobConfig;
using titan::config::load_job_config;

namespace {

using titan::test::error_of;

}  // namespace

TEST(JobConfig, DefaultsMatchTorchtitan) {
  JobConfig c;
  EXPECT_EQ(c.training.local_batch_size, 8);
  EXPECT_EQ(c.training.seq_len, 2048);
  EXPECT_EQ(c.training.steps, 10000);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 8e-4);
  EXPECT_DOUBLE_EQ(c.optimizer.beta2, 0.95);
  EXPECT_EQ(c.lr_scheduler.warmup_steps, 200);
  EXPECT_FALSE(c.lr_scheduler.decay_ratio.has_value());
  EXPECT_EQ(c.parallelism.data_parallel_shard_degree, -1);
  EXPECT_EQ(c.activation_checkpoint.mode, "selective");
  EXPECT_EQ(c.comm.train_timeout_seconds, 100);
  EXPECT_EQ(c.checkpoint.async_mode, "disabled");
}

TEST(JobConfig, TomlSetsValuesOfEveryType) {
  JobConfig c;
  apply_toml(c, R"(
[training]
steps = 42
max_norm = 0.5
dataset_path = "/data/x"
[lr_scheduler]
decay_ratio = 0.25
[model]
converters = []
[metrics]
enable_tensorboard = true
[activation_checkpoint]
selective_ac_option = 3
)",
             "job.toml");
  EXPECT_EQ(c.training.steps, 42);
  EXPECT_DOUBLE_EQ(c.training.max_norm, 0.5);
  EXPECT_EQ(c.training.dataset_path, "/data/x");
  EXPECT_DOUBLE_EQ(*c.lr_scheduler.decay_ratio, 0.25);
  EXPECT_TRUE(c.metrics.enable_tensorboard);
  EXPECT_EQ(c.activation_checkpoint.selective_ac_option, "3");
}

TEST(JobConfig, IntegerAcceptedWhereFloatExpected) {
  JobConfig c;
  apply_toml(c, "[optimizer]\nlr = 1\n", "x.toml");
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 1.0);
}

TEST(JobConfig, CliOverridesInAllForms) {
  JobConfig c;
  apply_cli(c, {"--training.steps", "7", "--optimizer.lr=0.01", "--metrics.enable_tensorboard",
                "--parallelism.data_parallel_shard_degree", "-1", "--training.local-batch-size",
                "3", "--checkpoint.exclude_from_loading", "optimizer,dataloader",
                "--debug.deterministic", "false"});
  EXPECT_EQ(c.training.steps, 7);
  EXPECT_DOUBLE_EQ(c.optimizer.lr, 0.01);
  EXPECT_TRUE(c.metrics.enable_tensorboard);
  EXPECT_EQ(c.parallelism.data_parallel_shard_degree, -1);
  EXPECT_EQ(c.training.local_batch_size, 3);
  ASSERT_EQ(c.checkpoint.exclude_from_loading.size(), 2u);
  EXPECT_EQ(c.checkpoint.exclude_from_loading[1], "dataloader");
  EXPECT_FALSE(c.debug.deterministic);
}

TEST(JobConfig, NoPrefixSwitchesABooleanOffAsTorchtitansCommandLine) {
  JobConfig c;
  apply_toml(c, "[profiling]\nenable_memory_snapshot = true\n[checkpoint]\nenable = true\n",
             "on.toml");
  apply_cli(c, {"--profiling.no_enable_memory_snapshot", "--checkpoint.no-enable"});
  EXPECT_FALSE(c.profiling.enable_memory_snapshot);
  EXPECT_FALSE(c.checkpoint.enable);
  // Only booleans have a negative form, and it takes no value.
  std::string msg = error_of([&] { apply_cli(c, {"--training.no_steps"}); });
  EXPECT_NE(msg.find("unknown key training.no_steps"), std::string::npos) << msg;
  msg = error_of([&] { apply_cli(c, {"--checkpoint.no_enable=true"}); });
  EXPECT_NE(msg.find("takes no value"), std::string::npos) << msg;
}

TEST(JobConfig, OlderSpellingsAreAliases) {
  JobConfig c;
  apply_toml(c, R"(
[training]
batch_size = 5
data_parallel_shard_degree = 2
tensor_parallel_degree = 1
seed = 9
[experimental]
pipeline_parallel_degree = 1
[checkpoint]
enable_checkpoint = true
[float8]
enable_fsdp_float8_all_gather = true
)",
             "old.toml");
  EXPECT_EQ(c.training.local_batch_size, 5);
  EXPECT_EQ(c.parallelism.data_parallel_shard_degree, 2);
  EXPECT_EQ(c.debug.seed, std::optional<int64_t>(9));
  EXPECT_TRUE(c.checkpoint.enable);
  EXPECT_TRUE(c.float8.enable_fsdp_float8_all_gather);
  apply_cli(c, {"--job.print_args"});
  EXPECT_TRUE(c.job.print_config);
}

TEST(JobConfig, QuantizeSectionIsNestedTable) {
  JobConfig c;
  apply_toml(c, "[quantize.linear.float8]\nemulate = true\nfilter_fqns = [\"output\", \"x\"]\n",
             "q.toml");
  EXPECT_TRUE(c.float8.emulate);
  EXPECT_EQ(c.float8.filter_fqns.size(), 2u);
}

TEST(JobConfig, UnknownKeyNamesPathAndSuggestsNearest) {
  JobConfig c;
  std::string msg = error_of([&] { apply_cli(c, {"--training.stpes", "10"}); });
  EXPECT_NE(msg.find("unknown key training.stpes"), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean training.steps?"), std::string::npos) << msg;
  msg = error_of([&] { apply_toml(c, "[optimiser]\nlr = 0.1\n", "f.toml"); });
  EXPECT_NE(msg.find("unknown key optimiser.lr"), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean optimizer.lr?"), std::string::npos) << msg;
  EXPECT_NE(msg.find("f.toml:2:"), std::string::npos) << msg;
  // Every unknown key of a file is named at once.
  msg = error_of([&] { apply_toml(c, "[training]\nstpes = 3\n[bogus]\nx = 1\n", "g.toml"); });
  EXPECT_NE(msg.find("unknown key training.stpes (g.toml:2:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("unknown key bogus.x (g.toml:4:"), std::string::npos) << msg;
}

TEST(JobConfig, WrongTypeNamesKeyExpectedTypeAndLocation) {
  JobConfig c;
  std::string msg = error_of([&] { apply_toml(c, "[training]\nsteps = \"ten\"\n", "t.toml"); });
  EXPECT_NE(msg.find("training.steps: expected an integer, got string"), std::string::npos) << msg;
  EXPECT_NE(msg.find("t.toml:2:9"), std::string::npos) << msg;
  msg = error_of([&] { apply_cli(c, {"--optimizer.lr", "fast"}); });
  EXPECT_NE(msg.find("optimizer.lr: expected a number, got \"fast\""), std::string::npos) << msg;
  msg = error_of([&] { apply_cli(c, {"--training.steps", "1.5"}); });
  EXPECT_NE(msg.find("expected an integer"), std::string::npos) << msg;
  msg = error_of([&] { apply_toml(c, "[model]\nconverters = [1]\n", "l.toml"); });
  EXPECT_NE(msg.find("model.converters: expected a list of strings"), std::string::npos) << msg;
}

TEST(JobConfig, ImpossibleValuesNameTheRange) {
  JobConfig c;
  std::string msg = error_of([&] { apply_cli(c, {"--training.steps", "0"}); });
  EXPECT_NE(msg.find("training.steps: value 0 is out of range: expected >= 1"), std::string::npos)
      << msg;
  msg = error_of([&] { apply_cli(c, {"--lr_scheduler.decay_ratio", "1.5"}); });
  EXPECT_NE(msg.find("expected in [0, 1]"), std::string::npos) << msg;
  msg = error_of([&] { apply_cli(c, {"--optimizer.lr", "0"}); });
  EXPECT_NE(msg.find("expected > 0"), std::string::npos) << msg;
  msg = error_of([&] { apply_cli(c, {"--lr_scheduler.decay_type", "cosin"}); });
  EXPECT_NE(msg.find("\"cosin\" is not one of: linear, sqrt, cosine; did you mean \"cosine\"?"),
            std::string::npos)
      << msg;
}

TEST(JobConfig, CrossFieldValidation) {
  std::string msg = error_of([] { load_job_config({"--model.flavor", "8b"}); });
  EXPECT_NE(msg.find("model.flavor: unknown flavor \"8b\""), std::string::npos) << msg;
  EXPECT_NE(msg.find("did you mean \"8B\"?"), std::string::npos) << msg;
  msg = error_of([] { load_job_config({"--activation_checkpoint.selective_ac_option", "x"}); });
  EXPECT_NE(msg.find("activation_checkpoint.selective_ac_option"), std::string::npos) << msg;
  msg = error_of([] { load_job_config({"--parallelism.expert_parallel_degree", "2"}); });
  EXPECT_NE(msg.find("parallelism.expert_parallel_degree = 2"), std::string::npos) << msg;
  // Tensor and context parallelism are accepted.
  EXPECT_EQ(error_of([] {
              load_job_config({"--parallelism.context_parallel_degree", "2",
                               "--parallelism.tensor_parallel_degree", "2"});
            }),
            "");
  // Float8 training is accepted; its recipe and the all-gather combinations are checked.
  EXPECT_EQ(error_of([] { load_job_config({"--model.converters", "float8"}); }), "");
  msg = error_of([] {
    load_job_config(
        {"--model.converters", "float8", "--quantize.linear.float8.recipe_name", "columnwise"});
  });
  EXPECT_NE(msg.find("quantize.linear.float8.recipe_name: unknown recipe \"columnwise\""),
            std::string::npos)
      << msg;
  msg = error_of([] {
    load_job_config({"--quantize.linear.float8.recipe_name", "rowwise",
                     "--quantize.linear.float8.enable_fsdp_float8_all_gather"});
  });
  EXPECT_NE(msg.find("applies to the tensorwise recipe only"), std::string::npos) << msg;
  msg = error_of([] {
    load_job_config({"--quantize.linear.float8.filter_fqns", "layers.0.attention.wq"});
  });
  EXPECT_NE(msg.find("names layers"), std::string::npos) << msg;
}

TEST(JobConfig, MalformedTomlReportsLineAndColumn) {
  JobConfig c;
  std::string msg = error_of([&] { apply_toml(c, "[training]\nsteps = = 3\n", "bad.toml"); });
  EXPECT_NE(msg.find("bad.toml:2:"), std::string::npos) << msg;
  EXPECT_NE(msg.find("malformed TOML"), std::string::npos) << msg;
}

TEST(JobConfig, ConfigFileLoadsFirstThenOverrides) {
  titan::test::TempDir dir;
  titan::test::write_file(dir.file("job.toml"), "[training]\nsteps = 5\nseq_len = 64\n");
  JobConfig c =
      load_job_config({"--training.steps", "9", "--job.config_file", dir.file("job.toml")});
  EXPECT_EQ(c.training.steps, 9);
  EXPECT_EQ(c.training.seq_len, 64);
  std::string msg = error_of([&] {
    load_job_config({"--job.config_file", dir.file("none.toml")});
  });
  EXPECT_NE(msg.find("cannot open"), std::string::npos) << msg;
}

TEST(JobConfig, ConfigFileGivenTwiceOrInsideAJobFileIsRefused) {
  titan::test::TempDir dir;
  titan::test::write_file(dir.file("a.toml"), "[training]\nsteps = 5\n");
  titan::test::write_file(dir.file("b.toml"), "[training]\nsteps = 6\n");
  std::string msg = error_of([&] {
    load_job_config({"--job.config_file", dir.file("a.toml"), "--job.config_file",
                     dir.file("b.toml")});
  });
  EXPECT_NE(msg.find("job.config_file: given twice"), std::string::npos) << msg;
  // The same file twice is one job file.
  JobConfig c = load_job_config(
      {"--job.config_file", dir.file("a.toml"), "--job.config_file=" + dir.file("a.toml")});
  EXPECT_EQ(c.training.steps, 5);
  EXPECT_EQ(c.job.config_file, dir.file("a.toml"));
  // A job file naming another one would suggest an include that nothing reads.
  titan::test::write_file(dir.file("c.toml"),
                          "[job]\nconfig_file = \"a.toml\"\n[training]\nsteps = 7\n");
  msg = error_of([&] { load_job_config({"--job.config_file", dir.file("c.toml")}); });
  EXPECT_NE(msg.find("c.toml: [job] config_file = 'a.toml': a job file cannot name another"),
            std::string::npos)
      << msg;
}

TEST(JobConfig, SeedNoneMeansUnseeded) {
  JobConfig c;
  EXPECT_EQ(c.debug.seed, std::optional<int64_t>(0));
  apply_cli(c, {"--debug.seed", "None"});
  EXPECT_FALSE(c.debug.seed.has_value());
  apply_cli(c, {"--debug.seed", "3"});
  EXPECT_EQ(c.debug.seed, std::optional<int64_t>(3));
  EXPECT_NE(error_of([&] { apply_cli(c, {"--debug.seed", "-1"}); }).find("debug.seed"),
            std::string::npos);
}

TEST(JobConfig, PrintedConfigParsesBackToTheSameValues) {
  JobConfig c;
  apply_cli(c, {"--training.steps", "77", "--lr_scheduler.decay_ratio", "0.3"});
  std::string text = titan::config::to_toml(c);
  JobConfig d;
  apply_toml(d, text, "printed");
  EXPECT_EQ(d.training.steps, 77);
  EXPECT_DOUBLE_EQ(*d.lr_scheduler.decay_ratio, 0.3);
  EXPECT_EQ(titan::config::to_toml(d), text);
}

TEST(JobConfigCli, BadInputExitsNonZeroWithMessage) {
  auto r = titan::test::run_titan_train({"--training.stpes", "3"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.output.find("did you mean training.steps?"), std::string::npos) << r.output;
  r = titan::test::run_titan_train({"--help"});
  EXPECT_EQ(r.exit_code, 0);
  EXPECT_NE(r.output.find("--training.steps"), std::string::npos);
}

TEST(JobConfigDocs, ConfigReferenceInDocsIsCurrent) {
  const std::string path = std::string(TITAN_SOURCE_DIR) + "/docs/CONFIG.md";
  EXPECT_EQ(titan::test::read_file(path), titan::config::markdown_reference())
      << "docs/CONFIG.md is stale: regenerate with titan_train --help-markdown > docs/CONFIG.md";
}

TEST(JobConfig, ConfigFileThatIsADirectoryIsRejected) {
  titan::test::TempDir dir;
  const std::string msg = error_of([&] { load_job_config({"--job.config_file", dir.path()}); });
  EXPECT_NE(msg.find("is a directory; expected a TOML job file"), std::string::npos) << msg;
}
