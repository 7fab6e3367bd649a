// Hugging Face Llama safetensors import/export.
#include "titan/checkpoint/hf.h"
#include "titan/util/fs.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>

#include "titan/checkpoint/box.h"
#include "titan/checkpoint/safetensors.h"
#include "titan/dist/communicator.h"
#include "titan/dist/runtime.h"
#include "titan/parallel/fsdp.h"
#include "titan/util/error.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace titan::checkpoint {
namespace {

const std::vector<std::pair<std::string, std::string>>& layer_names() {
  static const std::vector<std::pair<std::string, std::string>> m = {
      {"attention_norm.weight", "input_layernorm.weight"},
      {"attention.wq.weight", "self_attn.q_proj.weight"},
      {"attention.wk.weight", "self_attn.k_proj.weight"},
      {"attention.wv.weight", "self_attn.v_proj.weight"},
      {"attention.wo.weight", "self_attn.o_proj.weight"},
      {"ffn_norm.weight", "post_attention_layernorm.weight"},
      {"feed_forward.w1.weight", "mlp.gate_proj.weight"},
      {"feed_forward.w3.weight", "mlp.up_proj.weight"},
      {"feed_forward.w2.weight", "mlp.down_proj.weight"}};
  return m;
}

}  // namespace

std::string hf_name(const std::string& t) {
  if (t == "tok_embeddings.weight") return "model.embed_tokens.weight";
  if (t == "norm.weight") return "model.norm.weight";
  if (t == "output.weight") return "lm_head.weight";
  static const std::regex re("^layers\\.([0-9]+)\\.(.+)$");
  std::smatch m;
  if (std::regex_match(t, m, re)) {
    for (const auto& [a, b] : layer_names()) {
      if (m[2] == a) return "model.layers." + std::string(m[1]) + "." + b;
    }
  }
  internal_fail("no Hugging Face name for parameter ", t);
}

std::string titan_name(const std::string& h) {
  if (h == "model.embed_tokens.weight") return "tok_embeddings.weight";
  if (h == "model.norm.weight") return "norm.weight";
  if (h == "lm_head.weight") return "output.weight";
  static const std::regex re("^model\\.layers\\.([0-9]+)\\.(.+)$");
  std::smatch m;
  if (std::regex_match(h, m, re)) {
    for (const auto& [a, b] : layer_names()) {
      if (m[2] == b) return "layers." + std::string(m[1]) + "." + a;
    }
  }
  fail("unknown Hugging Face Llama tensor ", h);
}

at::Tensor permute_to_hf(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({heads, rows / heads / 2, 2, cols}).transpose(1, 2).reshape({rows, cols});
}

at::Tensor permute_from_hf(const at::Tensor& w, int64_t heads) {
  const int64_t rows = w.size(0), cols = w.size(1);
  return w.view({heads, 2, rows / heads / 2, cols}).transpose(1, 2).reshape({rows, cols});
}

namespace {

// Which file holds each HF tensor.
std::map<std::string, std::string> weight_map(const std::string& folder) {
  std::map<std::string, std::string> out;
  const fs::path index = fs::path(folder) / "model.safetensors.index.json";
  if (util::path_exists(util::path_str(index))) {
    try {
      std::ifstream in(index);
      json j = json::parse(in);
      for (auto it = j.at("weight_map").begin(); it != j.at("weight_map").end(); ++it) {
        out[it.key()] = (fs::path(folder) / it->get<std::string>()).string();
      }
    } catch (const json::exception& e) {
      fail(index.string(), " is malformed: ", util::json_error_text(e.what()));
    }
    return out;
  }
  const fs::path single = fs::path(folder) / "model.safetensors";
  TITAN_CHECK(util::path_exists(util::path_str(single)), "Hugging Face folder ", folder,
              " holds neither model.safetensors.index.json nor model.safetensors");
  SafetensorsReader r(single.string());
  for (const auto& [name, _] : r.tensors()) out[name] = single.string();
  return out;
}

}  // namespace

bool adopt_hf_config(const std::string& folder, model::LlamaArgs& a) {
  const fs::path cfg = fs::path(folder) / "config.json";
  TITAN_CHECK(util::is_directory(util::path_str(folder)), "Hugging Face folder ", folder,
              " does not exist", util::relative_note(folder));
  TITAN_CHECK(util::path_exists(util::path_str(cfg)), "Hugging Face folder ", folder,
              " has no config.json");
  json j;
  try {
    std::ifstream in(cfg);
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail(cfg.string(), " is malformed: ", util::json_error_text(e.what()));
  }
  const std::string where = cfg.string();
  try {
    auto expect = [&](const char* key, int64_t want) {
      TITAN_CHECK(j.contains(key) && j[key].is_number_integer() && j[key].get<int64_t>() == want,
                  where, ": ", key, " is ", j.contains(key) ? j[key].dump() : "missing",
                  " but the model has ", want, " (pick the matching model.flavor)");
    };
    expect("hidden_size", a.dim);
    expect("num_hidden_layers", a.n_layers);
    expect("num_attention_heads", a.n_heads);
    expect("num_key_value_heads", a.n_kv_heads);
    expect("intermediate_size", a.ffn_hidden_dim());
    expect("vocab_size", a.vocab_size);
    if (j.contains("head_dim") && !j["head_dim"].is_null()) expect("head_dim", a.head_dim());
    if (j.contains("hidden_act")) {
      TITAN_CHECK(j["hidden_act"] == "silu", where, ": hidden_act is ", j["hidden_act"].dump(),
                  "; Llama 3 (and titan) use silu");
    }
    for (const char* bias : {"attention_bias", "mlp_bias"}) {
      TITAN_CHECK(!j.value(bias, false), where, ": ", bias,
                  " is true; Llama 3 (and titan) have no biases");
    }
    // Values that vary between Llama 3 releases: the folder's own win, with a log line.
    model::LlamaArgs b = a;
    // transformers < 5 writes rope_theta and rope_scaling at the top; transformers 5 writes
    // them together as rope_parameters (rope_type "default" meaning no scaling).
    const json* rope = nullptr;
    const char* rope_key = "rope_scaling";
    if (j.contains("rope_parameters") && j["rope_parameters"].is_object()) {
      rope = &j["rope_parameters"];
      rope_key = "rope_parameters";
      if (rope->contains("rope_theta")) b.rope_theta = (*rope)["rope_theta"].get<double>();
    } else if (j.contains("rope_scaling") && !j["rope_scaling"].is_null()) {
      rope = &j["rope_scaling"];
    }
    if (j.contains("rope_theta")) b.rope_theta = j["rope_theta"].get<double>();
    if (j.contains("rms_norm_eps")) b.norm_eps = j["rms_norm_eps"].get<double>();
    b.rope_scaling_factor = 0;
    const std::string type =
        rope ? rope->value("rope_type", rope->value("type", std::string("?"))) : "default";
    if (type != "default") {
      TITAN_CHECK(type == "llama3", where, ": ", rope_key, " type \"", type,
                  "\" is not supported; titan implements Llama 3.1's \"llama3\" scaling");
      b.rope_scaling_factor = rope->at("factor").get<double>();
      b.rope_low_freq_factor = rope->at("low_freq_factor").get<double>();
      b.rope_high_freq_factor = rope->at("high_freq_factor").get<double>();
      b.rope_original_max_positions = rope->at("original_max_position_embeddings").get<int64_t>();
      TITAN_CHECK(b.rope_scaling_factor > 0 && b.rope_high_freq_factor > b.rope_low_freq_factor,
                  where, ": ", rope_key,
                  " needs factor > 0 and high_freq_factor > low_freq_factor");
    }
    if (model::describe_rope(b) != model::describe_rope(a)) {
      log::info("model: RoPE {} from {} (the flavor has {})", model::describe_rope(b), where,
                model::describe_rope(a));
    }
    if (b.norm_eps != a.norm_eps) {
      log::info("model: rms_norm_eps {} from {} (the flavor has {})", b.norm_eps, where,
                a.norm_eps);
    }
    a = b;
    const bool tied = j.value("tie_word_embeddings", false);
    if (tied) {
      log::info(
          "model: {} ties the output projection to the embedding (tie_word_embeddings); titan "
          "starts output.weight as a copy of the embedding and trains the two separately",
          where);
    }
    return tied;
  } catch (const json::exception& e) {
    fail(where, " is malformed: ", util::json_error_text(e.what()));
  }
}

void import_hf(const std::string& folder, TrainerState& state) {
  const auto& a = state.args;
  model::LlamaArgs adopted = a;
  adopt_hf_config(folder, adopted);
  TITAN_CHECK(
      model::describe_rope(adopted) == model::describe_rope(a) && adopted.norm_eps == a.norm_eps,
      "Hugging Face folder ", folder, " describes RoPE ", model::describe_rope(adopted),
      " and rms_norm_eps ", adopted.norm_eps, ", this model ", model::describe_rope(a), " and ",
      a.norm_eps);
  auto files = weight_map(folder);
  std::map<std::string, std::unique_ptr<SafetensorsReader>> readers;
  auto reader = [&](const std::string& path) -> SafetensorsReader& {
    auto& r = readers[path];
    if (!r) r = std::make_unique<SafetensorsReader>(path);
    return *r;
  };
  const bool tied = !files.count("lm_head.weight");
  auto& fsdp = *state.model;
  int64_t elements = 0;
  std::vector<at::Tensor> hosts;
  for (size_t i = 0; i < fsdp.num_units(); ++i) {
    hosts.push_back(at::zeros({fsdp.unit(i).shard_numel}, at::kFloat));
  }
  for (const auto& sl : fsdp.shard_slices()) {
    const auto& p = *sl.param;
    std::string hname = hf_name(p.name);
    if (tied && hname == "lm_head.weight") hname = "model.embed_tokens.weight";
    TITAN_CHECK(files.count(hname), "Hugging Face folder ", folder, " has no tensor ", hname);
    SafetensorsReader& r = reader(files[hname]);
    const TensorInfo& info = r.info(hname);
    TITAN_CHECK(info.shape == p.global_shape, files[hname], ": ", hname, " has shape ",
                at::IntArrayRef(info.shape), ", expected ", at::IntArrayRef(p.global_shape));
    // The slice is a flat range of this rank's box (its tensor-parallel part): read the whole
    // rows of each of its rectangles (for wq/wk whole heads, to undo HF's rotary permutation)
    // and copy the rectangle's columns.
    const int64_t cols = p.global_shape.size() == 2 ? p.global_shape[1] : p.global_shape[0];
    const bool is_qk = p.name.find("attention.wq") != std::string::npos ||
                       p.name.find("attention.wk") != std::string::npos;
    const int64_t rows_per_read = is_qk ? a.head_dim() : 1;
    const Box box{p.box_offset(), p.shape};
    at::Tensor dst = hosts[sl.unit].narrow(0, sl.shard_offset, sl.numel);
    for (const Rect& rect : flat_range_rects(box, sl.param_offset, sl.numel)) {
      const int64_t r0 = rect.r0 / rows_per_read * rows_per_read;
      const int64_t r1 = (rect.r1 + rows_per_read - 1) / rows_per_read * rows_per_read;
      at::Tensor rows =
          r.read_range(hname, r0 * cols, (r1 - r0) * cols).view({r1 - r0, cols}).to(at::kFloat);
      if (is_qk) rows = permute_from_hf(rows, (r1 - r0) / rows_per_read);
      rect_view(dst, box, sl.param_offset, rect)
          .copy_(rows.narrow(0, rect.r0 - r0, rect.r1 - rect.r0)
                     .narrow(1, rect.c0, rect.c1 - rect.c0));
    }
    elements += sl.numel;
  }
  for (size_t i = 0; i < fsdp.num_units(); ++i) fsdp.unit(i).master.copy_(hosts[i]);
  fsdp.refresh_shadows();
  log::info("checkpoint: imported {} weights of this rank from Hugging Face folder {}{}", elements,
            folder, tied ? " (tied embeddings: output = embed_tokens)" : "");
}

void export_hf(const std::string& folder, TrainerState& state, dist::Runtime& runtime,
               const std::string& dtype) {
  const at::ScalarType dt = dtype == "bfloat16"  ? at::kBFloat16
                            : dtype == "float16" ? at::kHalf
                                                 : at::kFloat;
  auto& fsdp = *state.model;
  const auto& mesh = runtime.mesh();
  const int64_t pp = mesh.dims().pp, stage = mesh.coordinate("pp");
  // One writer per pipeline coordinate (its units), the first rank of its data-parallel group;
  // global rank 0 (the writer of pipeline coordinate 0) also writes the index and config.
  const bool writer = mesh.coordinate("dp_replicate") == 0 && mesh.coordinate("dp_shard") == 0 &&
                      mesh.coordinate("cp") == 0 && mesh.coordinate("tp") == 0;
  const bool leader = runtime.env().rank == 0;
  dist::Communicator* shard = mesh.group("dp_shard_cp");  // FSDP's group
  dist::Communicator* tp = mesh.group("tp");
  // Full tensors in HF order, gathered unit by unit (over FSDP shards, then over the
  // tensor-parallel parts: every tp rank's unit has the same layout).
  std::vector<std::pair<std::string, at::Tensor>> tensors;
  for (size_t i = 0; i < fsdp.num_units(); ++i) {
    const auto& u = fsdp.unit(i);
    at::Tensor full = u.master;
    if (shard) {
      full = at::empty({u.shard_numel * shard->size()}, u.master.options());
      shard->all_gather_into(full, u.master);
    }
    std::vector<at::Tensor> parts{full};
    if (tp) {
      at::Tensor all = at::empty({tp->size(), full.numel()}, full.options());
      tp->all_gather_into(all, full);
      parts = all.unbind(0);
    }
    if (!writer) continue;
    for (auto& part : parts) part = part.to(at::kCPU);
    for (const auto& p : u.layout.params) {
      std::vector<at::Tensor> pieces;
      for (const auto& part : parts)
        pieces.push_back(part.narrow(0, p.offset, p.numel).view(p.shape));
      at::Tensor t = p.tp.dim >= 0 ? at::cat(pieces, p.tp.dim) : pieces.front();
      if (p.name.find("attention.wq") != std::string::npos) {
        t = permute_to_hf(t, state.args.n_heads);
      } else if (p.name.find("attention.wk") != std::string::npos) {
        t = permute_to_hf(t, state.args.n_kv_heads);
      }
      tensors.emplace_back(hf_name(p.name), t.to(dt).contiguous());
    }
  }
  const std::string staging = folder + ".partial";
  c10d::Store* store = runtime.store();
  static int64_t exports = 0;
  const std::string key = "titan/hf_export/" + std::to_string(exports++) + "/";
  if (leader) {
    util::remove_tree(util::path_str(staging));
    util::make_directories(util::path_str(staging));
    if (store) store->set(key + "staging", std::vector<uint8_t>{1});
  }
  if (!writer) return;
  const auto timeout = std::chrono::seconds(600);
  if (!leader && store) store->wait({key + "staging"}, timeout);
  // Files of at most ~5 GB, in HF's naming (with pipelines: per stage, stage-numbered).
  constexpr int64_t kMaxFileBytes = int64_t(5) << 30;
  std::vector<std::vector<size_t>> groups(1);
  int64_t bytes = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const int64_t b = tensors[i].second.numel() * tensors[i].second.element_size();
    if (bytes > 0 && bytes + b > kMaxFileBytes) {
      groups.emplace_back();
      bytes = 0;
    }
    groups.back().push_back(i);
    bytes += b;
  }
  json weight_map = json::object();
  int64_t total = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    char name[96];
    if (pp == 1) {
      std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", g + 1, groups.size());
    } else {
      std::snprintf(name, sizeof(name), "model-pp%05lld-%05zu-of-%05zu.safetensors",
                    static_cast<long long>(stage), g + 1, groups.size());
    }
    std::vector<std::pair<std::string, TensorInfo>> decl;
    for (size_t i : groups[g]) {
      TensorInfo info;
      info.dtype = safetensors_dtype(dt);
      info.shape = tensors[i].second.sizes().vec();
      decl.emplace_back(tensors[i].first, info);
    }
    SafetensorsWriter w((fs::path(staging) / name).string(), decl, {{"format", "pt"}});
    for (size_t i : groups[g]) {
      w.write(tensors[i].first, tensors[i].second);
      weight_map[tensors[i].first] = name;
      total += tensors[i].second.numel() * tensors[i].second.element_size();
    }
    w.close();
  }
  if (!leader) {
    const std::string report = json{{"weight_map", weight_map}, {"bytes", total}}.dump();
    store->set(key + "stage/" + std::to_string(stage),
               std::vector<uint8_t>(report.begin(), report.end()));
    return;
  }
  // The leader merges every stage's files into one index.
  for (int64_t st = 1; st < pp; ++st) {
    const std::string k = key + "stage/" + std::to_string(st);
    store->wait({k}, timeout);
    const auto v = store->get(k);
    const json r = json::parse(std::string(v.begin(), v.end()));
    for (auto it = r["weight_map"].begin(); it != r["weight_map"].end(); ++it) {
      weight_map[it.key()] = it.value();
    }
    total += r["bytes"].get<int64_t>();
  }
  json index;
  index["metadata"]["total_size"] = total;
  index["weight_map"] = weight_map;
  std::ofstream(fs::path(staging) / "model.safetensors.index.json") << index.dump(2);
  const auto& a = state.args;
  json cfg = {{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"hidden_size", a.dim},
              {"intermediate_size", a.ffn_hidden_dim()},
              {"num_hidden_layers", a.n_layers},
              {"num_attention_heads", a.n_heads},
              {"num_key_value_heads", a.n_kv_heads},
              {"head_dim", a.head_dim()},
              {"vocab_size", a.vocab_size},
              {"rms_norm_eps", a.norm_eps},
              {"rope_theta", a.rope_theta},
              {"hidden_act", "silu"},
              {"tie_word_embeddings", false},
              {"attention_bias", false},
              {"mlp_bias", false},
              {"torch_dtype", dtype},
              {"max_position_embeddings", 131072}};
  // Both spellings: rope_theta + rope_scaling (transformers 4) and rope_parameters (5).
  json params = {{"rope_type", "default"}, {"rope_theta", a.rope_theta}};
  if (a.rope_scaling_factor > 0) {
    cfg["rope_scaling"] = {{"rope_type", "llama3"},
                           {"factor", a.rope_scaling_factor},
                           {"low_freq_factor", a.rope_low_freq_factor},
                           {"high_freq_factor", a.rope_high_freq_factor},
                           {"original_max_position_embeddings", a.rope_original_max_positions}};
    params = cfg["rope_scaling"];
    params["rope_theta"] = a.rope_theta;
  }
  cfg["rope_parameters"] = params;
  std::ofstream(fs::path(staging) / "config.json") << cfg.dump(2);
  if (util::path_exists(util::path_str(folder))) util::remove_tree(util::path_str(folder));
  util::rename_path(util::path_str(staging), util::path_str(folder));
  log::info("checkpoint: wrote Hugging Face weights ({:.1f} MiB, {}) to {}", total / 1048576.0,
            dtype, folder);
}

}  // namespace titan::checkpoint
