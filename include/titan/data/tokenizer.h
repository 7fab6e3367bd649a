// Tokenizers: the interface the data pipeline uses, and the byte-level tokenizer that serves
// the built-in corpus and tests (ids 0-255 are bytes; then BOS and EOS).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace titan::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Token ids of `text` without special tokens.
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Text of `ids`; special tokens are rendered by name, bytes that are not valid UTF-8 pass
  // through unchanged.
  virtual std::string decode(const std::vector<int32_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int32_t bos_id() const = 0;
  virtual int32_t eos_id() const = 0;
  virtual std::string describe() const = 0;
};

class ByteTokenizer : public Tokenizer {
 public:
  static constexpr int32_t kBos = 256;
  static constexpr int32_t kEos = 257;
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  int64_t vocab_size() const override { return 258; }
  int32_t bos_id() const override { return kBos; }
  int32_t eos_id() const override { return kEos; }
  std::string describe() const override { return "byte tokenizer (258 ids)"; }
};

// The tokenizer a job asks for: model.tokenizer_path (a tokenizer.json, else read as a tiktoken
// tokenizer.model), else the first of tokenizer.json, tokenizer.model and
// original/tokenizer.model in model.hf_assets_path, else the byte tokenizer (also, with a
// warning, when that folder holds none). Throws titan::Error for missing paths and malformed
// or unsupported files. Byte-level BPE: titan/data/bpe_tokenizer.h.
// The file build_tokenizer reads for these keys ("" for the byte tokenizer).
std::string tokenizer_file(const std::string& tokenizer_path, const std::string& hf_assets_path);
std::unique_ptr<Tokenizer> build_tokenizer(const std::string& tokenizer_path,
                                           const std::string& hf_assets_path);

}  // namespace titan::data
