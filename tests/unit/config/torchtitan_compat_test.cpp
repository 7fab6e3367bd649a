// torchtitan compatibility of job files: every key of every TOML-reading torchtitan release
// (v0.1.0 .. v0.2.2) is accepted under its own spelling and lands where titan's printed config
// shows it under torchtitan's current name; the releases' llama3 job files load unchanged; keys
// whose feature titan lacks are rejected with a message naming the feature, never "unknown key".
#include <gtest/gtest.h>
#include <toml++/toml.hpp>

#include <map>
#include <sstream>

#include "support/test_support.h"
#include "titan/config/job_config.h"
#include "titan/util/error.h"

using titan::config::apply_cli;
using titan::config::apply_toml;
using titan::config::JobConfig;
using titan::config::load_job_config;
using titan::test::error_of;

namespace {

const std::string kData = std::string(TITAN_SOURCE_DIR) + "/tests/data/torchtitan/";

// A TOML value as canonical text (numbers as doubles), so 1 and 1.0 compare equal.
std::string canonical(const toml::node& n) {
  std::ostringstream out;
  out.precision(17);
  if (auto b = n.value_exact<bool>()) {
    out << (*b ? "true" : "false");
  } else if (auto i = n.value_exact<int64_t>()) {
    out << static_cast<double>(*i);
  } else if (auto d = n.value_exact<double>()) {
    out << *d;
  } else if (auto s = n.value_exact<std::string>()) {
    out << '"' << *s << '"';
  } else if (const toml::array* a = n.as_array()) {
    out << '[';
    for (const auto& el : *a) out << canonical(el) << ',';
    out << ']';
  }
  return out.str();
}

// Every "section.key" -> value of a parsed TOML table, nested tables flattened.
void flatten(const toml::table& t, const std::string& prefix,
             std::map<std::string, std::string>& out) {
  for (const auto& [k, v] : t) {
    const std::string path =
        prefix.empty() ? std::string(k.str()) : prefix + "." + std::string(k.str());
    if (const toml::table* sub = v.as_table()) {
      flatten(*sub, path, out);
    } else {
      out[path] = canonical(v);
    }
  }
}

std::map<std::string, std::string> flatten_text(const std::string& text) {
  std::map<std::string, std::string> out;
  flatten(toml::parse(text), "", out);
  return out;
}

// torchtitan's renames between releases: the name a key has in v0.2.2 (and in titan's
// printed config).
std::string current_name(const std::string& key) {
  static const std::map<std::string, std::string> renames = {
      {"job.print_args", "job.print_config"},
      {"lr_scheduler.lr_min", "lr_scheduler.min_lr_factor"},
      {"training.compile", "compile.enable"},
      {"training.seed", "debug.seed"},
      {"training.deterministic", "debug.deterministic"},
      {"training.debug_moe_force_load_balance", "debug.moe_force_load_balance"},
      {"checkpoint.enable_checkpoint", "checkpoint.enable"},
      {"checkpoint.initial_load_model_weights_only", "checkpoint.initial_load_model_only"},
      {"checkpoint.last_save_model_weights_only", "checkpoint.last_save_model_only"},
      {"memory_estimation.enabled", "memory_estimation.enable"},
      {"validation.enabled", "validation.enable"},
  };
  if (auto it = renames.find(key); it != renames.end()) return it->second;
  if (key.rfind("float8.", 0) == 0) return "quantize.linear." + key;
  if (key.rfind("mx.", 0) == 0) return "quantize.linear." + key;
  return key;
}

JobConfig load_file(const std::string& path) {
  return load_job_config({"--job.config_file", path});
}

}  // namespace

TEST(TorchtitanCompat, EveryKeyOfEveryReleaseLoadsUnderItsOwnName) {
  for (const char* release : {"v0.1.0", "v0.2.0", "v0.2.1", "v0.2.2"}) {
    SCOPED_TRACE(release);
    const std::string path = kData + release + "_all_keys.toml";
    JobConfig c;
    ASSERT_EQ(error_of([&] { c = load_file(path); }), "");
    const auto file = flatten_text(titan::test::read_file(path));
    const auto printed = flatten_text(titan::config::to_toml(c));
    EXPECT_GT(file.size(), 90u);
    for (const auto& [key, value] : file) {
      if (key == "mx.use_fp8_dim1_cast_triton_kernel") {
        // v0.1.0's switch became a kernel choice in v0.2.0: true means "triton".
        EXPECT_EQ(printed.at("quantize.linear.mx.mxfp8_dim1_cast_kernel_choice"), "\"triton\"");
        continue;
      }
      const std::string name = current_name(key);
      ASSERT_TRUE(printed.count(name)) << key << " is not printed as " << name;
      EXPECT_EQ(printed.at(name), value) << key;
    }
  }
}

TEST(TorchtitanCompat, FaultToleranceExtensionKeysLoad) {
  JobConfig c;
  apply_toml(c, R"(
[fault_tolerance]
enable = false
sync_steps = 7
should_quantize = true
fragment_sync_delay = 1
fragment_update_alpha = 0.5
module_fqns_per_model_fragment = [["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]]
num_fragments = 2
)",
             "ft.toml");
  titan::config::validate(c);
  EXPECT_EQ(c.fault_tolerance.sync_steps, 7);
  ASSERT_EQ(c.fault_tolerance.module_fqns_per_model_fragment.size(), 2u);
  EXPECT_EQ(c.fault_tolerance.module_fqns_per_model_fragment[1][2], "output");
}

TEST(TorchtitanCompat, ReleaseJobFilesLoadUnchanged) {
  {
    const JobConfig c = load_file(kData + "v0.1.0/llama3_8b.toml");
    EXPECT_EQ(c.model.flavor, "8B");
    EXPECT_EQ(c.model.tokenizer_path, "./assets/tokenizer/original/tokenizer.model");
    EXPECT_DOUBLE_EQ(c.optimizer.lr, 3e-4);
    EXPECT_EQ(c.training.seq_len, 8192);
    EXPECT_EQ(c.training.local_batch_size, 1);
    EXPECT_FALSE(c.compile.enable);
    EXPECT_FALSE(c.checkpoint.enable);
    EXPECT_FALSE(c.checkpoint.last_save_model_only);
    EXPECT_EQ(c.activation_checkpoint.selective_ac_option, "op");
    EXPECT_EQ(c.float8.filter_fqns, std::vector<std::string>{"output"});
  }
  {
    const JobConfig c = load_file(kData + "v0.1.0/debug_model.toml");
    EXPECT_EQ(c.model.flavor, "debugmodel");
    EXPECT_TRUE(c.job.use_for_integration_test);
    EXPECT_DOUBLE_EQ(c.lr_scheduler.min_lr_factor, 0.0);
    EXPECT_DOUBLE_EQ(*c.lr_scheduler.decay_ratio, 0.8);
  }
  for (const char* name : {"debug_model.toml", "llama3_8b.toml"}) {
    SCOPED_TRACE(name);
    const JobConfig c = load_file(kData + "v0.2.2/" + name);
    EXPECT_FALSE(c.validation.enable);
    EXPECT_EQ(c.validation.dataset, "c4_validation");
    EXPECT_EQ(c.compile.components, (std::vector<std::string>{"model", "loss"}));
  }
  const JobConfig d = load_file(kData + "v0.2.2/debug_model.toml");
  EXPECT_EQ(d.validation.freq, 5);
  EXPECT_EQ(d.validation.steps, 10);
  EXPECT_EQ(d.parallelism.pipeline_parallel_schedule, "Interleaved1F1B");
  EXPECT_EQ(d.model.hf_assets_path, "./tests/assets/tokenizer");
  // The 70B preset loads with its tensor parallelism, the 405B one with float8 and the float8
  // FSDP all-gather with precomputed scales (what stops it at start-up, float8 with tensor
  // parallelism, is a clear error tested in parallel_test).
  const JobConfig big = load_file(kData + "v0.2.2/llama3_70b.toml");
  EXPECT_EQ(big.parallelism.tensor_parallel_degree, 8);
  EXPECT_FALSE(big.parallelism.enable_async_tensor_parallel);
  const JobConfig huge = load_file(kData + "v0.2.2/llama3_405b.toml");
  EXPECT_EQ(huge.model.converters, std::vector<std::string>{"float8"});
  EXPECT_TRUE(huge.float8.enable_fsdp_float8_all_gather);
  EXPECT_TRUE(huge.float8.precompute_float8_dynamic_scale_for_fsdp);
}

TEST(TorchtitanCompat, KeysWhoseFeatureTitanLacksNameTheFeature) {
  struct Case {
    std::vector<std::string> args;
    std::string want;
  };
  const std::vector<Case> cases = {
      {{"--job.custom_config_module", "my.ext"}, "job.custom_config_module: extending the config"},
      {{"--experimental.custom_import", "pkg.mod"}, "importing Python modules"},
      {{"--training.dtype", "bfloat16"}, "pure bf16 training"},
      {{"--fault_tolerance.enable"}, "fault-tolerant training (TorchFT)"},
      {{"--fault_tolerance.semi_sync_method", "diloco"}, "semi-synchronous training"},
      {{"--checkpoint.initial_load_in_hf_quantized"}, "quantized Hugging Face checkpoints"},
      {{"--activation_checkpoint.visualize_memory_budget_pareto"}, "Pareto plot"},
      {{"--comm.mode", "fake_backend"}, "PyTorch testing mode"},
      {{"--quantize.grouped_mm.float8.fqns", "experts"}, "Llama 3 has no experts"},
      {{"--model.converters", "mx"}, "MX-format training"},
      {{"--parallelism.expert_tensor_parallel_degree", "2"}, "expert tensor parallelism"},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of([&] { load_job_config(c.args); });
    EXPECT_NE(msg.find(c.want), std::string::npos) << c.args[0] << ": " << msg;
    EXPECT_EQ(msg.find("unknown key"), std::string::npos) << msg;
  }
  // Accepted and harmless: these ask for nothing titan lacks.
  EXPECT_EQ(error_of([&] {
              load_job_config({"--training.dataloader.num_workers", "4",
                               "--activation_checkpoint.preserve_rng_state", "false",
                               "--training.gc_debug", "--debug.moe_force_load_balance",
                               "--compile.backend", "eager"});
            }),
            "");
}

TEST(TorchtitanCompat, PrintedConfigUsesTorchtitansCurrentNames) {
  JobConfig c;
  apply_toml(c,
             "[validation]\nenabled = true\n[checkpoint]\nlast_save_model_weights_only = false\n",
             "old.toml");
  const auto printed = flatten_text(titan::config::to_toml(c));
  EXPECT_EQ(printed.at("validation.enable"), "true");
  EXPECT_EQ(printed.at("checkpoint.last_save_model_only"), "false");
  EXPECT_FALSE(printed.count("validation.enabled"));
  EXPECT_FALSE(printed.count("checkpoint.last_save_model_weights_only"));
  EXPECT_FALSE(printed.count("quantize.linear.float8.enable_float8_linear"));
}

TEST(TorchtitanCompat, ListOfListsAndOptionalIntegersFromTheCommandLine) {
  JobConfig c;
  apply_cli(c, {"--parallelism.module_fqns_per_model_part",
                R"([["tok_embeddings", "layers.0"], ["layers.1", "norm", "output"]])",
                "--parallelism.pipeline_parallel_layers_per_stage", "4",
                "--lr_scheduler.total_steps", "100"});
  ASSERT_EQ(c.parallelism.module_fqns_per_model_part.size(), 2u);
  EXPECT_EQ(c.parallelism.module_fqns_per_model_part[0][1], "layers.0");
  EXPECT_EQ(*c.parallelism.pipeline_parallel_layers_per_stage, 4);
  EXPECT_EQ(*c.lr_scheduler.total_steps, 100);
  apply_cli(c, {"--parallelism.pipeline_parallel_layers_per_stage", "none"});
  EXPECT_FALSE(c.parallelism.pipeline_parallel_layers_per_stage.has_value());
  const std::string msg = error_of([&] {
    apply_cli(c, {"--parallelism.module_fqns_per_model_part", "[tok_embeddings"});
  });
  EXPECT_NE(msg.find("expected a list of lists of strings"), std::string::npos) << msg;
  // A plain string where torchtitan takes "list[str] | str" is a comma-separated list.
  apply_toml(c, "[quantize.grouped_mm.mx]\nfqns = \"a,b\"\n", "s.toml");
  EXPECT_EQ(c.grouped_mm.mx_fqns, (std::vector<std::string>{"a", "b"}));
}
