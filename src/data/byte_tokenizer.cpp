// The byte-level tokenizer.
#include "titan/data/tokenizer.h"

namespace titan::data {

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids;
  ids.reserve(text.size());
  for (unsigned char c : text) ids.push_back(static_cast<int32_t>(c));
  return ids;
}

std::string ByteTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size());
  for (int32_t id : ids) {
    if (id >= 0 && id < 256) {
      out.push_back(static_cast<char>(id));
    } else if (id == kBos) {
      out += "<|begin_of_text|>";
    } else if (id == kEos) {
      out += "<|end_of_text|>";
    } else {
      out += "<|unknown:" + std::to_string(id) + "|>";
    }
  }
  return out;
}

}  // namespace titan::data
