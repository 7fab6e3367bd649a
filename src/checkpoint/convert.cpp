// `titan_train convert`: titan checkpoint <-> Hugging Face folder, in one process on the CPU.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <iostream>

#include "titan/checkpoint/checkpointer.h"
#include "titan/checkpoint/hf.h"
#include "titan/dist/runtime.h"
#include "titan/model/layout.h"
#include "titan/parallel/fsdp.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace titan::checkpoint {
namespace {

const char* kUsage =
    "usage: titan_train convert --to hf    --input CHECKPOINT --output HF_FOLDER [--dtype D]\n"
    "       titan_train convert --to titan --input HF_FOLDER  --output CHECKPOINT_FOLDER\n"
    "CHECKPOINT: a step folder (…/checkpoint/step-N) or a checkpoint folder (newest step).\n"
    "D: float32 (default), bfloat16 or float16. The flavor is found from the model's dims;\n"
    "--model.flavor NAME picks it explicitly.\n";

// The flavor of that shape, the vocabulary aside where no flavor has it too (a vocabulary sized
// by a tokenizer, as torchtitan v0.1.0's jobs size it: the converted model keeps it).
std::string flavor_for(int64_t dim, int64_t layers, int64_t heads, int64_t kv, int64_t vocab) {
  std::string same_blocks;
  for (const auto& f : model::llama_flavor_names()) {
    auto a = model::llama_flavor(f);
    if (a.dim == dim && a.n_layers == layers && a.n_heads == heads && a.n_kv_heads == kv) {
      if (a.vocab_size == vocab) return f;
      if (same_blocks.empty()) same_blocks = f;
    }
  }
  TITAN_CHECK(!same_blocks.empty(), "convert: no titan flavor has dim ", dim, ", ", layers,
              " layers, ", heads, " heads and ", kv, " KV heads; pass --model.flavor");
  return same_blocks;
}

json read_json(const fs::path& p) {
  std::ifstream in(p);
  TITAN_CHECK(in.good(), "convert: cannot open ", p.string());
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail("convert: ", p.string(), " is malformed: ", util::json_error_text(e.what()));
  }
}

}  // namespace

int run_convert(const std::vector<std::string>& args) {
  std::string to, input, output, dtype = "float32", flavor;
  for (size_t i = 0; i < args.size(); ++i) {
    auto value = [&]() -> std::string {
      TITAN_CHECK(i + 1 < args.size(), "convert: ", args[i], " needs a value\n", kUsage);
      return args[++i];
    };
    if (args[i] == "--to") {
      to = value();
    } else if (args[i] == "--input") {
      input = value();
    } else if (args[i] == "--output") {
      output = value();
    } else if (args[i] == "--dtype") {
      dtype = value();
    } else if (args[i] == "--model.flavor") {
      flavor = value();
    } else if (args[i] == "--help" || args[i] == "-h") {
      std::cout << kUsage;
      return 0;
    } else {
      fail("convert: unknown argument ", args[i], "\n", kUsage);
    }
  }
  TITAN_CHECK(!to.empty() && !input.empty() && !output.empty(),
              "convert: --to (hf or titan), --input and --output are required\n", kUsage);
  TITAN_CHECK(to == "hf" || to == "titan", "convert: --to must be hf or titan, got \"", to, "\"");
  TITAN_CHECK(dtype == "float32" || dtype == "bfloat16" || dtype == "float16",
              "convert: --dtype must be float32, bfloat16 or float16, got ", dtype);
  TITAN_CHECK(util::path_exists(util::path_str(input)), "convert: --input ", input,
              " does not exist");

  std::string step_dir;
  if (to == "hf") {
    step_dir = input;
    if (!util::path_exists(util::path_str(fs::path(step_dir) / "metadata.json"))) {
      auto steps = Checkpointer::complete_steps(input);
      TITAN_CHECK(!steps.empty(), "convert: ", input, " holds no complete checkpoint");
      step_dir = steps.back().second;
    }
    if (flavor.empty()) {
      const json meta = read_json(fs::path(step_dir) / "metadata.json");
      const json m = meta.contains("model") ? meta["model"] : json();
      auto dim_of = [&](const char* key) -> int64_t {
        TITAN_CHECK(m.is_object() && m.contains(key) && m[key].is_number_integer(),
                    "convert: ", step_dir, "/metadata.json records no model.", key,
                    "; name the model with --model.flavor");
        return m[key].get<int64_t>();
      };
      flavor = flavor_for(dim_of("dim"), dim_of("n_layers"), dim_of("n_heads"),
                          dim_of("n_kv_heads"), dim_of("vocab_size"));
    }
  } else if (flavor.empty()) {
    auto c = read_json(fs::path(input) / "config.json");
    flavor = flavor_for(c.value("hidden_size", 0), c.value("num_hidden_layers", 0),
                        c.value("num_attention_heads", 0), c.value("num_key_value_heads", 0),
                        c.value("vocab_size", 0));
  }
  // A one-process CPU "job" holding the full model in fp32.
  config::JobConfig cfg;
  cfg.model.flavor = flavor;
  cfg.job.dump_folder = to == "titan" ? output : (fs::path(output).parent_path() / ".").string();
  cfg.checkpoint.folder = ".";
  cfg.checkpoint.enable = true;
  dist::LaunchEnv env;
  dist::Runtime runtime(env, cfg, c10::Device(c10::kCPU));
  TrainerState state;
  state.args = model::llama_flavor(flavor);
  state.flavor = flavor;
  if (to == "hf") {
    // The vocabulary is the checkpoint's (a job may size it from its tokenizer).
    const json meta = read_json(fs::path(step_dir) / "metadata.json");
    if (meta.contains("model") && meta["model"].contains("vocab_size") &&
        meta["model"]["vocab_size"].is_number_integer()) {
      state.args.vocab_size = meta["model"]["vocab_size"].get<int64_t>();
    }
    adopt_checkpoint_model_args(step_dir, state.args, flavor);
  } else {
    adopt_hf_config(input, state.args);
  }
  parallel::FsdpModel fsdp(model::llama_units(state.args), nullptr, nullptr, c10::Device(c10::kCPU),
                           parallel::FsdpOptions{});
  fsdp.init_weights(0);
  state.model = &fsdp;
  Checkpointer ck(cfg, runtime, state);
  if (to == "hf") {
    ck.load(step_dir, {"model"});
    export_hf(output, state, runtime, dtype);
  } else {
    import_hf(input, state);
    const at::ScalarType dt = dtype == "bfloat16"  ? at::kBFloat16
                              : dtype == "float16" ? at::kHalf
                                                   : at::kFloat;
    ck.save(0, /*model_only=*/true, dt);
    log::info("convert: wrote {}/step-0 (load it with checkpoint.initial_load_path)", output);
  }
  return 0;
}

}  // namespace titan::checkpoint
