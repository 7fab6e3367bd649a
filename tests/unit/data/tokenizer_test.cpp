// Tokenizers: byte-level BPE round trips on any bytes, ids identical to python3-tiktoken, the
// tokenizer.json and tokenizer.model loaders agreeing, Llama 3 special tokens, loader errors
// and the tokenizer selection of build_tokenizer().
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "support/test_support.h"
#include "titan/data/bpe_tokenizer.h"
#include "titan/data/bpe_trainer.h"
#include "titan/data/corpus.h"
#include "titan/data/pretokenizer.h"
#include "titan/util/error.h"

using namespace titan;
using nlohmann::json;

namespace {

// Text in many scripts and shapes, all valid UTF-8 (also sent to tiktoken).
std::vector<std::string> varied_texts() {
  std::vector<std::string> t = {
      "",
      "Hello, world! This is a test of the tokenizer.",
      "日本語のテキストと中文文本，还有한국어 문장도 있습니다。",
      "مرحبا بالعالم، هذا اختبار للنص العربي.",
      "Привет, мир! Съешь же ещё этих мягких французских булок.",
      "Emoji: I \u2764\ufe0f \U0001F355 and \U0001F468\u200D\U0001F469\u200D\U0001F467 "
      "family \U0001F3F3\ufe0f\u200D\U0001F308!",
      "a  b   c\t\td\n\n\ne \r\n f    \n   \n\t ",
      "1234567890 3.14159 1,000,000 2024-01-01 007 0x1F",
      "def f(x):\n    return x**2 + 1  # comment\n\nint main() { return 0; }\n",
      "I'm you're they've he'll she'd it's DON'T I'M We'Ve",
      "<|begin_of_text|> hi <|end_of_text|><|eot_id|><|endoftext|>",
      std::string(300, 'a'),
      std::string(5000, ' ') + "x",
      std::string(1000, '\n'),
      "a\u00a0b\u2003c\u3000d\u180ee\u0085f\u2028g\vh\x1ci\x1fj",
      "\u01c5emo \u03a9 \u03c9 \u00df \u1e9e \u017ftra\u00dfe 's 'S '\u017f 'K '\u212a",
      "Tab\tseparated\tvalues\n1\t2\t3\n",
      "   leading and trailing spaces   ",
      "mixed日本English混合text123数字",
  };
  std::string abc;
  for (int i = 0; i < 100; ++i) abc += "abc";
  t.push_back(abc);
  std::string words;
  for (int i = 0; i < 60; ++i) words += "supercalifragilistic";  // a 1200-byte piece
  t.push_back(words);
  for (int64_t i = 0; i < 20; ++i) t.push_back(data::corpus_document("validation", i));
  return t;
}

// A small BPE trained on multilingual text, as tiktoken ranks.
const std::vector<std::string>& test_ranks() {
  static const std::vector<std::string> ranks = [] {
    data::BpeTrainer trainer;
    for (int64_t i = 0; i < 3000; ++i) trainer.add_text(data::corpus_document("train", i));
    for (int rep = 0; rep < 20; ++rep) {
      for (const auto& t : varied_texts()) {
        if (t.size() < 200) trainer.add_text(t);
      }
    }
    return trainer.train(900);
  }();
  return ranks;
}

// tokenizer.json equivalent to the ranks, as HF's tiktoken converter writes one: every split
// of a token into two tokens is a merge, ordered by the token's rank.
json hf_tokenizer_json(const std::vector<std::string>& ranks, bool merges_as_pairs) {
  std::map<std::string, int32_t> rank_of;
  for (size_t i = 0; i < ranks.size(); ++i) rank_of[ranks[i]] = static_cast<int32_t>(i);
  json vocab = json::object();
  for (size_t i = 0; i < ranks.size(); ++i) vocab[data::byte_level_encode(ranks[i])] = i;
  json merges = json::array();
  for (size_t i = 0; i < ranks.size(); ++i) {
    std::vector<std::tuple<int32_t, int32_t, std::string, std::string>> local;
    for (size_t k = 1; k < ranks[i].size(); ++k) {
      const std::string l = ranks[i].substr(0, k), r = ranks[i].substr(k);
      if (rank_of.count(l) && rank_of.count(r)) {
        local.emplace_back(rank_of[l], rank_of[r], data::byte_level_encode(l),
                           data::byte_level_encode(r));
      }
    }
    std::sort(local.begin(), local.end());
    for (const auto& [lr, rr, l, r] : local) {
      if (merges_as_pairs) {
        merges.push_back(json::array({l, r}));
      } else {
        merges.push_back(l + " " + r);
      }
    }
  }
  json added = json::array();
  const auto names = data::llama3_special_tokens();
  for (size_t i = 0; i < names.size(); ++i) {
    added.push_back({{"id", ranks.size() + i},
                     {"content", names[i]},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = added;
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       json::array({{{"type", "Split"},
                     {"pattern", {{"Regex", std::string(data::kLlama3SplitPattern)}}},
                     {"behavior", "Isolated"},
                     {"invert", false}},
                    {{"type", "ByteLevel"},
                     {"add_prefix_space", false},
                     {"trim_offsets", true},
                     {"use_regex", false}}})}};
  j["post_processor"] = nullptr;
  j["decoder"] = {{"type", "ByteLevel"},
                  {"add_prefix_space", true},
                  {"trim_offsets", true},
                  {"use_regex", true}};
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", true},
                {"vocab", vocab},
                {"merges", merges}};
  return j;
}

// Both files of the test tokenizer in a temp folder.
struct TestTokenizerFiles {
  test::TempDir dir;
  std::string model = dir.file("tokenizer.model");
  std::string json_path = dir.file("tokenizer.json");
  TestTokenizerFiles() {
    data::write_tiktoken_file(model, test_ranks());
    test::write_file(json_path, hf_tokenizer_json(test_ranks(), false).dump());
  }
};

std::string random_bytes(std::mt19937& rng, size_t n) {
  std::string s(n, '\0');
  for (auto& c : s) {
    const uint32_t r = rng();
    // Bias towards the bytes that make UTF-8 interesting.
    switch (r % 4) {
      case 0: c = static_cast<char>(0x80 + (r >> 8) % 0x80); break;
      case 1: c = static_cast<char>(0xC0 + (r >> 8) % 0x40); break;
      case 2: c = static_cast<char>(" \n\tae1'."[(r >> 8) % 8]); break;
      default: c = static_cast<char>(r >> 8);
    }
  }
  return s;
}

std::string escape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    char buf[8];
    if (c >= 0x20 && c < 0x7F) {
      out += static_cast<char>(c);
    } else {
      std::snprintf(buf, sizeof(buf), "\\x%02x", c);
      out += buf;
    }
  }
  return out.size() > 200 ? out.substr(0, 200) + "..." : out;
}

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const titan::Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST(Tokenizer, ByteTokenizerRoundTripsAndNamesSpecials) {
  data::ByteTokenizer tok;
  const std::string text = "h\xffi \x00!";
  EXPECT_EQ(tok.decode(tok.encode(text)), text);
  EXPECT_EQ(tok.decode({tok.bos_id(), 'a', tok.eos_id()}), "<|begin_of_text|>a<|end_of_text|>");
}

TEST(Tokenizer, PretokenizerSplitsLikeTheLlama3Regex) {
  data::Pretokenizer pre(data::kLlama3SplitPattern, "test");
  EXPECT_TRUE(pre.jit());
  auto split = [&](std::string_view text) {
    std::vector<std::string_view> views;
    pre.split(text, views);
    return std::vector<std::string>(views.begin(), views.end());
  };
  EXPECT_EQ(split("Hello world"), (std::vector<std::string>{"Hello", " world"}));
  EXPECT_EQ(split("I'm 12345 ok!!\n\n  x"),
            (std::vector<std::string>{"I", "'m", " ", "123", "45", " ok", "!!\n\n", " ", " x"}));
  EXPECT_EQ(split("WE'LL go"), (std::vector<std::string>{"WE", "'LL", " go"}));
  // U+180E is not White_Space (PCRE2's own \s would say it is).
  EXPECT_EQ(split("x\u180ey"), (std::vector<std::string>{"x", "\u180ey"}));
  // Invalid UTF-8: each bad byte is a piece; valid runs around it are split as usual.
  EXPECT_EQ(split("ab\xff\xfe cd\xc3"),
            (std::vector<std::string>{"ab", "\xff", "\xfe", " cd", "\xc3"}));
}

TEST(Tokenizer, Utf8ValidationRejectsOverlongsSurrogatesAndTruncation) {
  EXPECT_EQ(data::valid_utf8_prefix("plain ascii text"), 16u);
  EXPECT_EQ(data::valid_utf8_prefix("\xc3\xa9\xe2\x82\xac\xf0\x9f\x8d\x95"), 9u);
  EXPECT_EQ(data::valid_utf8_prefix("a\xc0\xaf"), 1u);         // overlong '/'
  EXPECT_EQ(data::valid_utf8_prefix("ab\xed\xa0\x80"), 2u);    // surrogate U+D800
  EXPECT_EQ(data::valid_utf8_prefix("\xf4\x90\x80\x80"), 0u);  // above U+10FFFF
  EXPECT_EQ(data::valid_utf8_prefix("abc\xe2\x82"), 3u);       // truncated
  EXPECT_EQ(data::valid_utf8_prefix("\x80"), 0u);              // lone continuation
}

TEST(Tokenizer, BpeRoundTripsVariedText) {
  TestTokenizerFiles files;
  for (const auto& path : {files.model, files.json_path}) {
    auto tok = data::build_tokenizer(path, "");
    for (const auto& text : varied_texts()) {
      const auto ids = tok->encode(text);
      EXPECT_EQ(tok->decode(ids), text) << path << ": " << escape(text);
      for (int32_t id : ids) {
        ASSERT_TRUE(id >= 0 && id < tok->vocab_size()) << id;
        EXPECT_NE(id, tok->bos_id());
        EXPECT_NE(id, tok->eos_id());
      }
    }
    // Merges happen: the corpus text takes far fewer tokens than bytes.
    const std::string doc = data::corpus_document("validation", 0);
    EXPECT_LT(tok->encode(doc).size() * 2, doc.size()) << path;
  }
}

TEST(Tokenizer, BpeRoundTripsRandomInvalidBytes) {
  TestTokenizerFiles files;
  auto tok = data::load_tiktoken_tokenizer(files.model);
  std::mt19937 rng(1234);
  for (int i = 0; i < 2000; ++i) {
    const std::string text = random_bytes(rng, rng() % 300);
    ASSERT_EQ(tok->decode(tok->encode(text)), text) << escape(text);
  }
  for (const std::string& text :
       std::vector<std::string>{"\xc0\xaf", "\xed\xa0\x80\xed\xbf\xbf", "\xf4\x90\x80\x80",
                                "\xe2\x82", "\xff\xfe\xfd", std::string("a\0b", 3)}) {
    EXPECT_EQ(tok->decode(tok->encode(text)), text) << escape(text);
  }
}

TEST(Tokenizer, HugePiecesRoundTrip) {
  TestTokenizerFiles files;
  auto tok = data::load_tiktoken_tokenizer(files.model);
  std::string abab;
  for (int i = 0; i < (1 << 19); ++i) abab += "ab";
  for (const std::string& text : {std::string(1 << 20, ' ') + "x", std::string(1 << 20, '\n'), abab,
                                  std::string(1 << 20, '7')}) {
    const auto ids = tok->encode(text);
    EXPECT_LE(ids.size(), text.size());
    EXPECT_EQ(tok->decode(ids), text);
  }
}

TEST(Tokenizer, IdsMatchPythonTiktokenAndBothFileFormats) {
  TestTokenizerFiles files;
  const auto texts = varied_texts();
  test::write_file(files.dir.file("input.json"),
                   json{{"pattern", std::string(data::kLlama3SplitPattern)},
                        {"specials", data::llama3_special_tokens()},
                        {"texts", texts}}
                       .dump());
  test::write_file(files.dir.file("reference.py"), R"PY(
import base64, json, sys, tiktoken
model, inputs, output = sys.argv[1:4]
ranks = {}
for line in open(model, "rb").read().splitlines():
    if line:
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
spec = json.load(open(inputs, encoding="utf-8"))
base = max(ranks.values()) + 1
specials = {name: base + i for i, name in enumerate(spec["specials"])}
enc = tiktoken.Encoding("titan_test", pat_str=spec["pattern"], mergeable_ranks=ranks,
                        special_tokens=specials)
out = {"ids": [enc.encode_ordinary(t) for t in spec["texts"]],
       "specials": {n: enc.encode(n, allowed_special="all") for n in
                    ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>", "<|reserved_special_token_250|>"]},
       "n_vocab": enc.n_vocab}
json.dump(out, open(output, "w"))
)PY");
  auto r = test::run_process({test::python(), files.dir.file("reference.py"), files.model,
                              files.dir.file("input.json"), files.dir.file("output.json")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json ref = json::parse(test::read_file(files.dir.file("output.json")));
  ASSERT_EQ(ref["ids"].size(), texts.size());

  auto from_model = data::load_tiktoken_tokenizer(files.model);
  auto from_json = data::load_hf_tokenizer(files.json_path);
  test::write_file(files.dir.file("pairs.json"), hf_tokenizer_json(test_ranks(), true).dump());
  auto from_pairs = data::load_hf_tokenizer(files.dir.file("pairs.json"));
  EXPECT_EQ(from_model->vocab_size(), ref["n_vocab"].get<int64_t>());
  EXPECT_EQ(from_json->vocab_size(), from_model->vocab_size());
  for (size_t i = 0; i < texts.size(); ++i) {
    const auto expected = ref["ids"][i].get<std::vector<int32_t>>();
    EXPECT_EQ(from_model->encode(texts[i]), expected) << "text " << i << ": " << escape(texts[i]);
    EXPECT_EQ(from_json->encode(texts[i]), expected) << "text " << i << ": " << escape(texts[i]);
    EXPECT_EQ(from_pairs->encode(texts[i]), expected) << "text " << i;
  }
  for (const auto& [name, ids] : ref["specials"].items()) {
    ASSERT_EQ(ids.size(), 1u);
    EXPECT_EQ(from_model->special_id(name), ids[0].get<int32_t>()) << name;
    EXPECT_EQ(from_json->special_id(name), ids[0].get<int32_t>()) << name;
  }
  EXPECT_EQ(from_json->bos_id(), from_model->bos_id());
  EXPECT_EQ(from_json->eos_id(), from_model->eos_id());
}

TEST(Tokenizer, Llama3SpecialTokensFollowTheLastRank) {
  const auto names = data::llama3_special_tokens();
  ASSERT_EQ(names.size(), 256u);
  EXPECT_EQ(names[0], "<|begin_of_text|>");
  EXPECT_EQ(names[1], "<|end_of_text|>");
  EXPECT_EQ(names[2], "<|reserved_special_token_0|>");
  EXPECT_EQ(names[6], "<|start_header_id|>");
  EXPECT_EQ(names[7], "<|end_header_id|>");
  EXPECT_EQ(names[8], "<|reserved_special_token_4|>");
  EXPECT_EQ(names[9], "<|eot_id|>");
  EXPECT_EQ(names[10], "<|reserved_special_token_5|>");
  EXPECT_EQ(names[255], "<|reserved_special_token_250|>");

  TestTokenizerFiles files;
  auto tok = data::load_tiktoken_tokenizer(files.model);
  const auto base = static_cast<int32_t>(test_ranks().size());
  EXPECT_EQ(tok->vocab_size(), base + 256);
  EXPECT_EQ(tok->bos_id(), base);
  EXPECT_EQ(tok->eos_id(), base + 1);
  EXPECT_EQ(tok->special_id("<|start_header_id|>"), base + 6);
  EXPECT_EQ(tok->special_id("<|end_header_id|>"), base + 7);
  EXPECT_EQ(tok->special_id("<|eot_id|>"), base + 9);
  EXPECT_EQ(tok->decode({tok->bos_id(), base + 9, tok->eos_id()}),
            "<|begin_of_text|><|eot_id|><|end_of_text|>");
  // In text, special-token strings are plain text.
  const auto ids = tok->encode("<|end_of_text|>");
  EXPECT_GT(ids.size(), 1u);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), tok->eos_id()), 0);
  EXPECT_EQ(tok->decode({static_cast<int32_t>(tok->vocab_size() + 5)}),
            "<|unknown:" + std::to_string(tok->vocab_size() + 5) + "|>");
}

TEST(Tokenizer, HfMergesFollowTheirOwnOrder) {
  // vocab: the 256 bytes, "bc" and "ab"; merge (b, c) ranks before (a, b). "abc" becomes
  // [a, bc] (HF semantics), not [ab, c].
  json vocab = json::object();
  for (int b = 0; b < 256; ++b)
    vocab[data::byte_level_encode(std::string(1, static_cast<char>(b)))] = b;
  vocab["bc"] = 256;
  vocab["ab"] = 257;
  json j = {{"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"b c", "a b"})}}},
            {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}}},
            {"decoder", {{"type", "ByteLevel"}}},
            {"added_tokens", json::array({{{"id", 258}, {"content", "<s>"}, {"special", true}},
                                          {{"id", 259}, {"content", "</s>"}, {"special", true}}})}};
  test::TempDir dir;
  test::write_file(dir.file("tokenizer.json"), j.dump());
  test::write_file(dir.file("tokenizer_config.json"),
                   json{{"bos_token", "<s>"}, {"eos_token", {{"content", "</s>"}}}}.dump());
  auto tok = data::load_hf_tokenizer(dir.file("tokenizer.json"));
  EXPECT_EQ(tok->encode("abc"), (std::vector<int32_t>{'a', 256}));
  EXPECT_EQ(tok->encode("ab"), (std::vector<int32_t>{257}));
  EXPECT_EQ(tok->bos_id(), 258);  // from tokenizer_config.json
  EXPECT_EQ(tok->eos_id(), 259);
  EXPECT_EQ(tok->vocab_size(), 260);
  // GPT-2's pre-tokenizer (ByteLevel with use_regex) keeps a space with the next word.
  EXPECT_EQ(tok->decode(tok->encode(" abc abc\xff ")), " abc abc\xff ");
  EXPECT_EQ(tok->encode(" ab").front(), ' ');
}

TEST(Tokenizer, TiktokenFileErrorsNameTheLine) {
  test::TempDir dir;
  auto load = [&](const std::string& content) {
    test::write_file(dir.file("tokenizer.model"), content);
    return error_of([&] { data::load_tiktoken_tokenizer(dir.file("tokenizer.model")); });
  };
  std::vector<std::string> bytes;
  for (int b = 0; b < 256; ++b) bytes.emplace_back(1, static_cast<char>(b));
  data::write_tiktoken_file(dir.file("bytes.model"), bytes);
  const std::string good = test::read_file(dir.file("bytes.model"));
  EXPECT_EQ(load(good), "(no error)");
  EXPECT_NE(load(good + "!!!! 256\n").find("line 257: token \"!!!!\" is not valid base64"),
            std::string::npos);
  EXPECT_NE(load(good + "YWI= x\n").find("line 257: rank \"x\""), std::string::npos);
  EXPECT_NE(load("YQ==\n").find("line 1: expected \"<base64 token> <rank>\""), std::string::npos);
  EXPECT_NE(load("YQ== 0\n").find("no token for the single byte 0x00"), std::string::npos);
  EXPECT_NE(load("").find("no ranks"), std::string::npos);
  EXPECT_NE(load(std::string("\x0a\x05\x0a\x03<unk>\x15\x00\x00", 11)).find("SentencePiece"),
            std::string::npos);
  EXPECT_NE(load(good + "YWI= 3\n").find("token id 3 is assigned twice"), std::string::npos);
}

TEST(Tokenizer, TokenizerJsonErrorsNameTheFile) {
  test::TempDir dir;
  const std::string path = dir.file("tokenizer.json");
  auto load = [&](const std::string& content) {
    test::write_file(path, content);
    return error_of([&] { data::load_hf_tokenizer(path); });
  };
  EXPECT_NE(load("{\"model\": {").find("tokenizer.json " + path + ": malformed JSON"),
            std::string::npos);
  EXPECT_NE(load(R"({"model": {"type": "Unigram", "vocab": []}})")
                .find("model.type is \"Unigram\"; titan supports byte-level \"BPE\""),
            std::string::npos);
  EXPECT_NE(load(R"({"model": {"type": "BPE", "vocab": {}, "merges": [], "byte_fallback": true}})")
                .find("byte_fallback"),
            std::string::npos);
  json j = hf_tokenizer_json(test_ranks(), false);
  j["model"]["merges"].push_back("zz qq");
  EXPECT_NE(load(j.dump()).find("uses a token missing from model.vocab"), std::string::npos);
  j = hf_tokenizer_json(test_ranks(), false);
  j["decoder"] = {{"type", "Metaspace"}};
  EXPECT_NE(load(j.dump()).find("the decoder is not ByteLevel"), std::string::npos);
  j = hf_tokenizer_json(test_ranks(), false);
  j["added_tokens"] = json::array();
  EXPECT_NE(load(j.dump()).find("no BOS/EOS token"), std::string::npos);
}

// torchtitan's own test tokenizer (tests/assets/tokenizer, v0.2.2): a raw-text vocabulary
// (2002 entries, most of them not ByteLevel text), no merges, and BOS/EOS named only in
// tokenizer_config.json. Hugging Face's library, which torchtitan wraps, produces one id per
// printable ASCII byte (their ByteLevel characters are themselves), drops the bytes whose
// ByteLevel character has no entry (whitespace, control and non-ASCII bytes), and adds BOS /
// EOS at the next free ids; `scripts/device_check.sh hftok` checks the same ids against the
// library itself.
TEST(Tokenizer, TorchtitansTestTokenizerGivesHuggingFacesIds) {
  const std::string dir = std::string(TITAN_SOURCE_DIR) + "/tests/data/torchtitan/v0.2.2/tokenizer";
  auto tok = data::load_hf_tokenizer(dir + "/tokenizer.json");
  EXPECT_EQ(tok->vocab_size(), 2004);
  EXPECT_EQ(tok->bos_id(), 2002);  // <|begin_of_text|>, added after the 2002 entries
  EXPECT_EQ(tok->eos_id(), 2003);
  EXPECT_EQ(tok->special_id("<|pad|>"), -1);  // in the vocab already (2001): not added again
  // No merges: "he" (id 257) and " the" (262) are never produced; spaces and the newline
  // are dropped.
  EXPECT_EQ(tok->encode("Hello, the world!\nA b"),
            (std::vector<int32_t>{72, 101, 108, 108, 111, 44, 116, 104, 101, 119, 111, 114, 108,
                                  100, 33, 65, 98}));
  EXPECT_EQ(tok->encode(" \t\r\n\xc3\xa9"), std::vector<int32_t>{});
  EXPECT_EQ(tok->encode("<|begin_of_text|>").size(), 17u);  // plain text, one id per byte
}

TEST(Tokenizer, BuildTokenizerPicksTheFileAsDocumented) {
  TestTokenizerFiles files;
  // Neither path: the byte tokenizer.
  EXPECT_EQ(data::build_tokenizer("", "")->vocab_size(), 258);
  // tokenizer_path wins over hf_assets_path.
  test::TempDir assets;
  std::filesystem::create_directories(assets.file("original"));
  std::filesystem::copy_file(files.model, assets.file("original/tokenizer.model"));
  EXPECT_NE(
      data::build_tokenizer(files.json_path, assets.path())->describe().find("tokenizer.json"),
      std::string::npos);
  // hf_assets_path: tokenizer.json, else tokenizer.model, else original/tokenizer.model.
  EXPECT_NE(data::build_tokenizer("", assets.path())->describe().find("original/tokenizer.model"),
            std::string::npos);
  std::filesystem::copy_file(files.model, assets.file("tokenizer.model"));
  EXPECT_NE(
      data::build_tokenizer("", assets.path())->describe().find(assets.file("tokenizer.model")),
      std::string::npos);
  std::filesystem::copy_file(files.json_path, assets.file("tokenizer.json"));
  EXPECT_NE(data::build_tokenizer("", assets.path())->describe().find("tokenizer.json"),
            std::string::npos);
  // A folder without a tokenizer falls back to bytes; missing paths are errors.
  test::TempDir empty;
  EXPECT_EQ(data::build_tokenizer("", empty.path())->vocab_size(), 258);
  EXPECT_NE(error_of([&] {
              data::build_tokenizer(empty.file("nope.model"), "");
            }).find("model.tokenizer_path: " + empty.file("nope.model") + " does not exist"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              data::build_tokenizer("", empty.file("nope"));
            }).find("model.hf_assets_path: folder " + empty.file("nope") + " does not exist"),
            std::string::npos);
}

TEST(Tokenizer, EncodingIsThreadSafe) {
  TestTokenizerFiles files;
  std::shared_ptr<const data::Tokenizer> tok = data::build_tokenizer(files.model, "");
  std::vector<std::vector<int32_t>> expected;
  for (int64_t i = 0; i < 200; ++i)
    expected.push_back(tok->encode(data::corpus_document("train", i)));
  std::vector<std::thread> threads;
  std::atomic<int> mismatches{0};
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int rep = 0; rep < 5; ++rep) {
        for (int64_t i = 0; i < 200; ++i) {
          if (tok->encode(data::corpus_document("train", i)) != expected[i]) ++mismatches;
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(mismatches.load(), 0);
}

TEST(BpeTrainer, IsDeterministicAndLearnsFrequentPairsFirst) {
  data::BpeTrainer a, b;
  for (int64_t i = 0; i < 500; ++i) {
    a.add_text(data::corpus_document("train", i));
    b.add_text(data::corpus_document("train", i));
  }
  const auto ra = a.train(400), rb = b.train(400);
  EXPECT_EQ(ra, rb);
  ASSERT_EQ(ra.size(), 400u);
  for (int i = 0; i < 256; ++i) EXPECT_EQ(ra[i], std::string(1, static_cast<char>(i)));
  std::set<std::string> unique(ra.begin(), ra.end());
  EXPECT_EQ(unique.size(), ra.size());
  // Every learned token is the concatenation of two earlier ones.
  for (size_t i = 256; i < ra.size(); ++i) {
    bool found = false;
    for (size_t k = 1; k < ra[i].size() && !found; ++k) {
      const auto l = std::find(ra.begin(), ra.begin() + i, ra[i].substr(0, k));
      const auto r = std::find(ra.begin(), ra.begin() + i, ra[i].substr(k));
      found = l != ra.begin() + i && r != ra.begin() + i;
    }
    EXPECT_TRUE(found) << ra[i];
  }
  // The corpus' most frequent piece pair comes first: " t" + "he" or similar short tokens.
  EXPECT_LE(ra[256].size(), 2u);
  EXPECT_THROW(a.train(100), titan::Error);
}
