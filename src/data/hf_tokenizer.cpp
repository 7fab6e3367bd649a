// Loads Hugging Face tokenizer.json files of byte-level BPE models (GPT-2, Llama 3) and the
// ByteLevel byte <-> character map they store their vocabulary in.
#include <nlohmann/json.hpp>

#include <array>
#include <filesystem>
#include <optional>
#include <unordered_map>
#include <unordered_set>

#include "io.h"
#include "titan/data/bpe_tokenizer.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"
#include "titan/util/strings.h"

namespace titan::data {
namespace {

using nlohmann::json;

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 onwards.
struct ByteLevelMap {
  std::array<std::string, 256> to_text;
  std::unordered_map<uint32_t, uint8_t> to_byte;  // code point -> byte
  ByteLevelMap() {
    std::array<uint32_t, 256> cp{};
    std::array<bool, 256> direct{};
    for (int b = 0; b < 256; ++b) {
      direct[b] = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    }
    uint32_t extra = 0;
    for (int b = 0; b < 256; ++b) cp[b] = direct[b] ? static_cast<uint32_t>(b) : 256 + extra++;
    for (int b = 0; b < 256; ++b) {
      std::string s;
      const uint32_t c = cp[b];
      if (c < 0x80) {
        s.push_back(static_cast<char>(c));
      } else {
        s.push_back(static_cast<char>(0xC0 | (c >> 6)));
        s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
      }
      to_text[b] = s;
      to_byte[c] = static_cast<uint8_t>(b);
    }
  }
};

const ByteLevelMap& byte_level_map() {
  static const ByteLevelMap m;
  return m;
}

std::string type_of(const json& j) {
  if (j.is_object() && j.contains("type") && j["type"].is_string()) {
    return j["type"].get<std::string>();
  }
  return "";
}

// Escapes a literal string for use inside a PCRE2 pattern.
std::string regex_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (std::string_view("\\^$.|?*+()[]{}-/").find(c) != std::string_view::npos) out += '\\';
    out += c;
  }
  return out;
}

// Walks the pre_tokenizer tree and returns the one regex it splits by.
void collect_pattern(const json& pt, const std::string& where, std::string& pattern) {
  if (pt.is_null()) return;
  const std::string type = type_of(pt);
  auto set = [&](const std::string& p) {
    TITAN_CHECK(pattern.empty(), where,
                ": pre_tokenizer splits by more than one regex; titan supports one (a Split or a "
                "ByteLevel with use_regex)");
    pattern = p;
  };
  if (type == "Sequence") {
    TITAN_CHECK(pt.contains("pretokenizers") && pt["pretokenizers"].is_array(), where,
                ": pre_tokenizer Sequence lacks \"pretokenizers\"");
    for (const auto& p : pt["pretokenizers"]) collect_pattern(p, where, pattern);
  } else if (type == "Split") {
    const std::string behavior = pt.value("behavior", "Isolated");
    TITAN_CHECK(behavior == "Isolated", where, ": pre_tokenizer Split with behavior \"", behavior,
                "\" is not supported (expected \"Isolated\")");
    TITAN_CHECK(!pt.value("invert", false), where,
                ": pre_tokenizer Split with invert = true is not supported");
    const json& p = pt.contains("pattern") ? pt["pattern"] : json();
    if (p.is_object() && p.contains("Regex") && p["Regex"].is_string()) {
      set(p["Regex"].get<std::string>());
    } else if (p.is_object() && p.contains("String") && p["String"].is_string()) {
      set(regex_escape(p["String"].get<std::string>()));
    } else {
      fail(where, ": pre_tokenizer Split needs pattern {\"Regex\": ...} or {\"String\": ...}");
    }
  } else if (type == "ByteLevel") {
    TITAN_CHECK(!pt.value("add_prefix_space", false), where,
                ": ByteLevel pre_tokenizer with add_prefix_space = true is not supported");
    if (pt.value("use_regex", true)) set(std::string(kGpt2SplitPattern));
  } else {
    fail(where, ": pre_tokenizer type \"", type,
         "\" is not supported (expected Split, ByteLevel or a Sequence of them)");
  }
}

bool has_byte_level_decoder(const json& d) {
  const std::string type = type_of(d);
  if (type == "ByteLevel") return true;
  if (type == "Sequence" && d.contains("decoders") && d["decoders"].is_array()) {
    for (const auto& x : d["decoders"]) {
      if (has_byte_level_decoder(x)) return true;
    }
  }
  return false;
}

// tokenizer_config.json's bos_token / eos_token: a string or {"content": ...}.
template <class Json>
std::string config_token(const Json& cfg, const char* key) {
  if (!cfg.contains(key)) return "";
  const Json& v = cfg[key];
  if (v.is_string()) return v.template get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].template get<std::string>();
  }
  return "";
}

}  // namespace

std::string byte_level_encode(std::string_view bytes) {
  const auto& m = byte_level_map();
  std::string out;
  for (unsigned char b : bytes) out += m.to_text[b];
  return out;
}

bool byte_level_decode(std::string_view text, std::string& bytes) {
  const auto& m = byte_level_map();
  bytes.clear();
  for (size_t i = 0; i < text.size();) {
    const auto c = static_cast<unsigned char>(text[i]);
    uint32_t cp;
    if (c < 0x80) {
      cp = c;
      i += 1;
    } else if ((c & 0xE0) == 0xC0 && i + 1 < text.size()) {
      cp = ((c & 0x1Fu) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3Fu);
      i += 2;
    } else {
      return false;  // every ByteLevel character is below U+0800
    }
    auto it = m.to_byte.find(cp);
    if (it == m.to_byte.end()) return false;
    bytes.push_back(static_cast<char>(it->second));
  }
  return true;
}

std::unique_ptr<BpeTokenizer> load_hf_tokenizer(const std::string& path) {
  const std::string where = "tokenizer.json " + path;
  json j;
  try {
    j = json::parse(io::read_file(path, "tokenizer"));
  } catch (const json::exception& e) {
    fail(where, ": malformed JSON (", util::json_error_text(e.what()), ")");
  }
  TITAN_CHECK(j.is_object() && j.contains("model") && j["model"].is_object(), where,
              ": no \"model\" object; not a Hugging Face tokenizer.json");
  const json& model = j["model"];
  const std::string type = model.value("type", "");
  TITAN_CHECK(type == "BPE", where, ": model.type is \"", type,
              "\"; titan supports byte-level \"BPE\" models only");
  TITAN_CHECK(model.contains("vocab") && model["vocab"].is_object(), where,
              ": model.vocab must be an object of token -> id");
  TITAN_CHECK(model.contains("merges") && model["merges"].is_array(), where,
              ": model.merges must be an array");
  TITAN_CHECK(!model.contains("dropout") || model["dropout"].is_null(), where,
              ": BPE dropout is not supported");
  TITAN_CHECK(
      !model.value("byte_fallback", false), where,
      ": byte_fallback BPE (SentencePiece style) is not supported; expected byte-level BPE");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    TITAN_CHECK(!model.contains(key) || model[key].is_null() ||
                    (model[key].is_string() && model[key].get<std::string>().empty()),
                where, ": model.", key, " is not supported");
  }
  TITAN_CHECK(!j.contains("normalizer") || j["normalizer"].is_null(), where, ": normalizer \"",
              type_of(j["normalizer"]), "\" is not supported (byte-level BPE needs none)");
  TITAN_CHECK(j.contains("decoder") && has_byte_level_decoder(j["decoder"]), where,
              ": the decoder is not ByteLevel; titan supports byte-level BPE tokenizers only");

  BpeSpec spec;
  spec.pattern.clear();
  collect_pattern(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : json(), where, spec.pattern);
  TITAN_CHECK(!spec.pattern.empty(), where,
              ": the pre_tokenizer does not split by a regex (expected a Split with the Llama 3 "
              "regex, or ByteLevel with use_regex = true)");
  spec.whole_piece_lookup = model.value("ignore_merges", false);

  std::unordered_map<std::string, int32_t> vocab;  // ByteLevel text -> id
  vocab.reserve(model["vocab"].size());
  for (const auto& [text, value] : model["vocab"].items()) {
    TITAN_CHECK(value.is_number_integer(), where, ": model.vocab[\"", text,
                "\"] is not an integer id");
    vocab[text] = value.get<int32_t>();
  }
  // Added tokens: special ones (and any outside the vocab) are never produced by encode();
  // their text in a document is plain text. Non-special ones in the vocab stay mergeable.
  std::unordered_map<std::string, int32_t> added;
  std::unordered_set<int32_t> not_mergeable;
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    for (const auto& a : j["added_tokens"]) {
      TITAN_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() &&
                      a.contains("content") && a["content"].is_string(),
                  where, ": each added_tokens entry needs an integer \"id\" and a \"content\"");
      const auto id = a["id"].get<int32_t>();
      const auto content = a["content"].get<std::string>();
      added[content] = id;
      auto in_vocab = vocab.find(content);
      if (a.value("special", true) || in_vocab == vocab.end() || in_vocab->second != id) {
        not_mergeable.insert(id);
        spec.specials.push_back(BpeSpec::Token{content, id});
      }
    }
  }
  // A vocab entry that is not ByteLevel text can never be produced (the model looks up
  // ByteLevel text), as in Hugging Face's tokenizers; it keeps its id, decoded as written.
  // torchtitan's test tokenizer is such a vocabulary: raw text, and no merges.
  std::string bytes;
  int64_t unreachable = 0;
  std::string unreachable_example;
  for (const auto& [text, id] : vocab) {
    if (not_mergeable.count(id)) continue;  // e.g. GPT-2's <|endoftext|>, also in vocab
    if (!byte_level_decode(text, bytes)) {
      if (unreachable++ == 0) unreachable_example = text;
      spec.specials.push_back(BpeSpec::Token{text, id});
      continue;
    }
    spec.tokens.push_back(BpeSpec::Token{bytes, id});
  }
  if (unreachable > 0) {
    log::warn(
        "{}: {} vocab entries (e.g. {}) are not ByteLevel text and can never be produced, "
        "as in Hugging Face tokenizers",
        where, unreachable, json(unreachable_example).dump());
  }
  // Without an unk_token, a byte with no token of its own is dropped from the text, as Hugging
  // Face's BPE drops characters it has no token for.
  spec.drop_bytes_without_token = !model.contains("unk_token") || model["unk_token"].is_null();
  spec.merges_listed = true;  // an empty list means no merges, not tiktoken's rule

  const json& merges = model["merges"];
  spec.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& m = merges[i];
    std::string left, right;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      TITAN_CHECK(space != std::string::npos && s.find(' ', space + 1) == std::string::npos, where,
                  ": merge ", i, " \"", s, "\" is not \"<left> <right>\"");
      left = s.substr(0, space);
      right = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      left = m[0].get<std::string>();
      right = m[1].get<std::string>();
    } else {
      fail(where, ": merge ", i, " is neither \"a b\" nor [\"a\", \"b\"]");
    }
    auto l = vocab.find(left), r = vocab.find(right), res = vocab.find(left + right);
    TITAN_CHECK(l != vocab.end() && r != vocab.end() && res != vocab.end(), where, ": merge ", i,
                " (\"", left, "\", \"", right, "\") uses a token missing from model.vocab");
    spec.merges.push_back(
        BpeSpec::Merge{l->second, r->second, res->second, static_cast<uint32_t>(i)});
  }

  // BOS/EOS: Llama 3's names, else tokenizer_config.json beside the file.
  auto lookup = [&](const std::string& name) -> int32_t {
    if (auto it = added.find(name); it != added.end()) return it->second;
    if (auto it = vocab.find(name); it != vocab.end()) return it->second;
    return -1;
  };
  const auto config_path = std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::optional<nlohmann::ordered_json> cfg;
  if (util::path_exists(util::path_str(config_path))) {
    try {
      cfg = nlohmann::ordered_json::parse(io::read_file(config_path.string(), "tokenizer config"));
    } catch (const json::exception& e) {
      fail("tokenizer_config.json ", config_path.string(), ": malformed JSON (",
           util::json_error_text(e.what()), ")");
    }
  }
  if (cfg) {
    // The special tokens it names join the tokenizer as torchtitan adds them (Hugging Face's
    // add_special_tokens): the standard keys, then added_tokens_decoder in file order; one
    // that the tokenizer lacks takes the next id after the vocab and the added tokens (its id
    // in added_tokens_decoder is not used, as in Hugging Face).
    std::vector<std::string> named;
    for (const char* key : {"bos_token", "eos_token", "pad_token", "unk_token", "sep_token",
                            "cls_token", "mask_token"}) {
      const std::string name = config_token(*cfg, key);
      if (!name.empty()) named.push_back(name);
    }
    const auto decoder = cfg->find("added_tokens_decoder");
    if (decoder != cfg->end() && decoder->is_object()) {
      for (const auto& [id, entry] : decoder->items()) {
        if (entry.is_object() && entry.contains("content") && entry["content"].is_string()) {
          named.push_back(entry["content"].get<std::string>());
        }
      }
    }
    // (Past every id in use, too, where a vocab's ids have gaps.)
    int32_t next_id = static_cast<int32_t>(vocab.size());
    for (const auto& [text, id] : vocab) next_id = std::max(next_id, id + 1);
    for (const auto& [name, id] : added) next_id = std::max(next_id, id + 1);
    for (const auto& name : named) {
      if (lookup(name) >= 0) continue;
      added[name] = next_id;
      spec.specials.push_back(BpeSpec::Token{name, next_id++});
    }
  }
  spec.bos_id = lookup("<|begin_of_text|>");
  spec.eos_id = lookup("<|end_of_text|>");
  if (cfg && spec.bos_id < 0) spec.bos_id = lookup(config_token(*cfg, "bos_token"));
  if (cfg && spec.eos_id < 0) spec.eos_id = lookup(config_token(*cfg, "eos_token"));
  TITAN_CHECK(spec.bos_id >= 0 && spec.eos_id >= 0, where,
              ": no BOS/EOS token: expected added tokens <|begin_of_text|> and <|end_of_text|>, "
              "or bos_token/eos_token in a tokenizer_config.json next to it");

  int64_t vocab_size = 0;
  for (const auto& t : spec.tokens) vocab_size = std::max<int64_t>(vocab_size, t.id + 1);
  for (const auto& t : spec.specials) vocab_size = std::max<int64_t>(vocab_size, t.id + 1);
  spec.description = where + " (" + std::to_string(spec.tokens.size()) + " tokens, " +
                     std::to_string(spec.merges.size()) + " merges, " +
                     std::to_string(static_cast<int64_t>(spec.specials.size()) - unreachable) +
                     " added tokens, " +
                     (unreachable > 0 ? std::to_string(unreachable) + " never produced, " : "") +
                     "vocab " + std::to_string(vocab_size) + ")";
  return std::make_unique<BpeTokenizer>(std::move(spec));
}

}  // namespace titan::data
