// Byte-level BPE (GPT-2 / Llama 3 style): a regex pre-tokenizer splits text into pieces, and
// each piece's bytes are merged pairwise by priority. Loaded from tiktoken tokenizer.model
// files (Llama 3) or Hugging Face tokenizer.json files with a ByteLevel BPE model.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "titan/data/tokenizer.h"

namespace titan::data {

// Llama 3's (and cl100k's) pre-tokenizer regex.
inline constexpr std::string_view kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
// GPT-2's pre-tokenizer regex (HF ByteLevel pre-tokenizer with use_regex = true).
inline constexpr std::string_view kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// The 256 special-token names of Meta's Llama 3 tokenizer, in id order after the base ranks:
// <|begin_of_text|>, <|end_of_text|>, <|reserved_special_token_0..3|>, <|start_header_id|>,
// <|end_header_id|>, <|reserved_special_token_4|>, <|eot_id|>, then
// <|reserved_special_token_5..250|>.
std::vector<std::string> llama3_special_tokens();

// Everything a BpeTokenizer is built from; the loaders fill it from their file formats.
struct BpeSpec {
  struct Token {
    std::string bytes;  // raw bytes (not the ByteLevel-encoded form)
    int32_t id = 0;
  };
  struct Merge {
    int32_t left = 0, right = 0;  // ids of the two adjacent parts
    int32_t result = 0;           // id of their concatenation
    uint32_t priority = 0;        // lower merges first; ties go to the leftmost pair
  };
  std::vector<Token> tokens;  // mergeable tokens; every single byte one of them (but see below)
  // Empty and not `merges_listed`: tiktoken semantics, i.e. any two adjacent parts whose
  // concatenation is a token merge, with the token's id as priority. Otherwise exactly these
  // merges, none when empty (HF semantics).
  std::vector<Merge> merges;
  bool merges_listed = false;
  // HF without an unk_token: a byte with no single-byte token is dropped from the text (the
  // parts either side of it become adjacent). Otherwise every byte must have a token.
  bool drop_bytes_without_token = false;
  std::vector<Token> specials;  // never produced by encode(); decoded by name
  // A piece that is itself a token becomes that token without merging (tiktoken always;
  // HF when the model says ignore_merges).
  bool whole_piece_lookup = true;
  std::string pattern{kLlama3SplitPattern};  // pre-tokenizer regex (PCRE2 syntax)
  int32_t bos_id = -1;
  int32_t eos_id = -1;
  std::string description;
};

class BpeTokenizer : public Tokenizer {
 public:
  // Throws titan::Error when the spec is inconsistent (duplicate ids, a byte without a token,
  // a regex that does not compile, ...); `spec.description` names the source in messages.
  explicit BpeTokenizer(BpeSpec spec);
  ~BpeTokenizer() override;
  BpeTokenizer(const BpeTokenizer&) = delete;
  BpeTokenizer& operator=(const BpeTokenizer&) = delete;

  // Thread-safe. Any byte string is accepted: bytes that are not valid UTF-8 become pieces
  // of their own, so decode(encode(x)) == x for every x.
  std::vector<int32_t> encode(std::string_view text) const override;
  // Appends to `out` (the allocation-free form used by the data pipeline).
  void encode_into(std::string_view text, std::vector<int32_t>& out) const;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override;
  int32_t bos_id() const override;
  int32_t eos_id() const override;
  std::string describe() const override;

  // Id of the token or special token with exactly these bytes/this name; -1 if none.
  int32_t token_id(std::string_view bytes) const;
  int32_t special_id(std::string_view name) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// A tiktoken-style tokenizer from mergeable ranks (token bytes and rank = id), with Llama 3's
// 256 special tokens numbered from the last rank + 1 and the Llama 3 pre-tokenizer regex.
std::unique_ptr<BpeTokenizer> make_tiktoken_tokenizer(std::vector<BpeSpec::Token> ranks,
                                                      const std::string& description);

// A tiktoken BPE file (lines of "<base64 token> <rank>"), with Llama 3's 256 special tokens
// numbered from the last rank + 1; BOS = <|begin_of_text|>, EOS = <|end_of_text|>.
std::unique_ptr<BpeTokenizer> load_tiktoken_tokenizer(const std::string& path);

// A Hugging Face tokenizer.json with model.type "BPE" and ByteLevel pre-tokenizer/decoder.
// BOS/EOS: the added tokens <|begin_of_text|>/<|end_of_text|>, else bos_token/eos_token of a
// tokenizer_config.json in the same folder.
std::unique_ptr<BpeTokenizer> load_hf_tokenizer(const std::string& path);

// GPT-2's reversible byte <-> printable-character map used by ByteLevel tokenizer.json files:
// the UTF-8 text of byte b's character, and the inverse (false on characters outside it).
std::string byte_level_encode(std::string_view bytes);
bool byte_level_decode(std::string_view text, std::string& bytes);

}  // namespace titan::data
