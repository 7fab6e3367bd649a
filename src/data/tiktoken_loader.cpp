// Loads tiktoken BPE files ("<base64 token> <rank>" lines), the format of Llama 3's
// tokenizer.model, and adds Llama 3's special tokens after the last rank.
#include <algorithm>
#include <array>

#include "io.h"
#include "titan/data/bpe_tokenizer.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace titan::data {
namespace {

// Strict standard base64 (with '=' padding); false on anything else.
bool base64_decode(std::string_view in, std::string& out) {
  static const std::array<int8_t, 256> table = [] {
    std::array<int8_t, 256> t{};
    t.fill(-1);
    const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    for (int i = 0; i < 64; ++i)
      t[static_cast<unsigned char>(alphabet[i])] = static_cast<int8_t>(i);
    return t;
  }();
  out.clear();
  if (in.empty() || in.size() % 4 != 0) return false;
  for (size_t i = 0; i < in.size(); i += 4) {
    const bool last = i + 4 == in.size();
    int v[4];
    int pad = 0;
    for (int k = 0; k < 4; ++k) {
      const char c = in[i + k];
      if (c == '=' && last && k >= 2) {
        v[k] = 0;
        ++pad;
        continue;
      }
      if (pad > 0) return false;  // data after padding
      v[k] = table[static_cast<unsigned char>(c)];
      if (v[k] < 0) return false;
    }
    const uint32_t bits = (v[0] << 18) | (v[1] << 12) | (v[2] << 6) | v[3];
    out.push_back(static_cast<char>((bits >> 16) & 0xFF));
    if (pad < 2) out.push_back(static_cast<char>((bits >> 8) & 0xFF));
    if (pad < 1) out.push_back(static_cast<char>(bits & 0xFF));
  }
  return true;
}

bool looks_binary(std::string_view text) {
  const std::string_view head = text.substr(0, 4096);
  return std::any_of(head.begin(), head.end(), [](char c) {
    const auto u = static_cast<unsigned char>(c);
    return u < 0x09 || (u > 0x0D && u < 0x20);
  });
}

}  // namespace

std::unique_ptr<BpeTokenizer> load_tiktoken_tokenizer(const std::string& path) {
  const std::string text = io::read_file(path, "tokenizer");
  const std::string where = "tiktoken file " + path;
  TITAN_CHECK(!looks_binary(text), where,
              ": not a tiktoken BPE file (binary content; a SentencePiece tokenizer.model such "
              "as Llama 2's is not supported, Llama 3's tiktoken file is)");
  BpeSpec spec;
  int64_t line_no = 0;
  size_t pos = 0;
  std::string bytes;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (line.empty()) continue;
    const size_t space = line.find(' ');
    const std::string_view token = space == std::string_view::npos ? line : line.substr(0, space);
    const std::string rank_text =
        space == std::string_view::npos ? "" : util::trim(std::string(line.substr(space + 1)));
    if (space == std::string_view::npos || rank_text.empty() ||
        rank_text.find(' ') != std::string::npos) {
      fail(where, " line ", line_no, ": expected \"<base64 token> <rank>\", found \"",
           std::string(line.substr(0, 80)), "\"");
    }
    if (!base64_decode(token, bytes)) {
      fail(where, " line ", line_no, ": token \"", std::string(token.substr(0, 80)),
           "\" is not valid base64");
    }
    int64_t rank = -1;
    if (!util::parse_int(rank_text, rank) || rank < 0 || rank >= (int64_t{1} << 30)) {
      fail(where, " line ", line_no, ": rank \"", rank_text,
           "\" is not a non-negative integer below 2^30");
    }
    spec.tokens.push_back(BpeSpec::Token{bytes, static_cast<int32_t>(rank)});
  }
  TITAN_CHECK(!spec.tokens.empty(), where, ": no ranks (the file is empty)");
  return make_tiktoken_tokenizer(std::move(spec.tokens), where);
}

std::unique_ptr<BpeTokenizer> make_tiktoken_tokenizer(std::vector<BpeSpec::Token> ranks,
                                                      const std::string& description) {
  BpeSpec spec;
  int64_t max_rank = -1;
  for (const auto& t : ranks) max_rank = std::max<int64_t>(max_rank, t.id);
  spec.tokens = std::move(ranks);
  const auto names = llama3_special_tokens();
  for (size_t i = 0; i < names.size(); ++i) {
    spec.specials.push_back(BpeSpec::Token{names[i], static_cast<int32_t>(max_rank + 1 + i)});
  }
  spec.bos_id = static_cast<int32_t>(max_rank + 1);
  spec.eos_id = static_cast<int32_t>(max_rank + 2);
  spec.whole_piece_lookup = true;
  spec.pattern = std::string(kLlama3SplitPattern);
  spec.description = description + " (" + std::to_string(spec.tokens.size()) + " ranks + " +
                     std::to_string(names.size()) + " special tokens, vocab " +
                     std::to_string(max_rank + 1 + static_cast<int64_t>(names.size())) + ")";
  return std::make_unique<BpeTokenizer>(std::move(spec));
}

}  // namespace titan::data
