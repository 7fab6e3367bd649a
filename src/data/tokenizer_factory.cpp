// Picks the tokenizer from model.tokenizer_path / model.hf_assets_path.
#include <filesystem>

#include "titan/data/bpe_tokenizer.h"
#include "titan/data/tokenizer.h"
#include "titan/util/error.h"
#include "titan/util/fs.h"
#include "titan/util/log.h"

namespace titan::data {
namespace {

namespace fs = std::filesystem;

std::unique_ptr<Tokenizer> load_file(const fs::path& file) {
  if (file.extension() == ".json") return load_hf_tokenizer(file.string());
  return load_tiktoken_tokenizer(file.string());
}

// tokenizer.json, tokenizer.model, original/tokenizer.model: the first that exists.
fs::path find_in_folder(const fs::path& folder) {
  for (const char* name : {"tokenizer.json", "tokenizer.model", "original/tokenizer.model"}) {
    const fs::path p = folder / name;
    if (fs::is_regular_file(p)) return p;
  }
  return {};
}

}  // namespace

std::string tokenizer_file(const std::string& tokenizer_path, const std::string& hf_assets_path) {
  if (!tokenizer_path.empty()) {
    if (util::is_directory(tokenizer_path)) return find_in_folder(tokenizer_path).string();
    return tokenizer_path;
  }
  if (!hf_assets_path.empty() && util::is_directory(hf_assets_path)) {
    return find_in_folder(hf_assets_path).string();
  }
  return "";
}

std::unique_ptr<Tokenizer> build_tokenizer(const std::string& tokenizer_path,
                                           const std::string& hf_assets_path) {
  if (!tokenizer_path.empty()) {
    const fs::path p(tokenizer_path);
    TITAN_CHECK(util::path_exists(util::path_str(p)), "model.tokenizer_path: ", tokenizer_path,
                " does not exist", util::relative_note(tokenizer_path),
                "; expected a tokenizer.json or a tiktoken tokenizer.model");
    if (util::is_directory(util::path_str(p))) {
      const fs::path found = find_in_folder(p);
      TITAN_CHECK(!found.empty(), "model.tokenizer_path: folder ", tokenizer_path,
                  " holds no tokenizer.json, tokenizer.model or original/tokenizer.model");
      return load_file(found);
    }
    return load_file(p);
  }
  if (!hf_assets_path.empty()) {
    TITAN_CHECK(util::is_directory(util::path_str(hf_assets_path)), "model.hf_assets_path: folder ",
                hf_assets_path, " does not exist", util::relative_note(hf_assets_path));
    const fs::path found = find_in_folder(hf_assets_path);
    if (!found.empty()) return load_file(found);
    log::warn(
        "model.hf_assets_path: {} holds no tokenizer.json, tokenizer.model or "
        "original/tokenizer.model; using the byte tokenizer",
        hf_assets_path);
  }
  return std::make_unique<ByteTokenizer>();
}

}  // namespace titan::data
