// Picks the tokenizer from model.tokenizer_path / model.hf_assets_path.
#include "titan/data/tokenizer.h"
#include "titan/util/error.h"

namespace titan::data {

std::unique_ptr<Tokenizer> build_tokenizer(const std::string& tokenizer_path,
                                           const std::string& hf_assets_path) {
  if (tokenizer_path.empty() && hf_assets_path.empty()) return std::make_unique<ByteTokenizer>();
  fail("model.tokenizer_path / model.hf_assets_path: BPE tokenizers are not available yet");
}

}  // namespace titan::data
