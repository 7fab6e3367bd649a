// Choosing a document source from the job's dataset options.
#include "titan/data/dataset.h"
#include "titan/util/fs.h"

#include <algorithm>
#include <filesystem>

#include "sources.h"
#include "titan/util/error.h"

namespace titan::data {

std::unique_ptr<DocumentSource> make_file_source(const DatasetOptions& o,
                                                 std::shared_ptr<const Tokenizer> tokenizer) {
  TITAN_INTERNAL_CHECK(o.dp_size >= 1 && o.dp_rank >= 0 && o.dp_rank < o.dp_size,
                       "data-parallel rank ", o.dp_rank, " of ", o.dp_size);
  DataFiles files = list_data_files(o.path, o.name_prefix);
  TITAN_CHECK(files.shards.empty() || files.text.empty(), "dataset path ", o.path,
              " mixes pre-tokenized shards (.bin) and text files; use one kind per dataset");
  const bool folder = util::is_directory(util::path_str(o.path));
  if (!files.shards.empty()) {
    const std::string label =
        folder ? std::to_string(files.shards.size()) + " token shard(s) under " + o.path
               : "token shard " + o.path;
    DatasetOptions with_tokenizer = o;
    with_tokenizer.tokenizer_vocab_size = tokenizer->vocab_size();
    return make_shard_source(std::move(files.shards), with_tokenizer, label);
  }
  const auto jsonl = std::count_if(files.text.begin(), files.text.end(),
                                   [](const TextFile& f) { return f.jsonl; });
  const auto text = static_cast<int64_t>(files.text.size()) - jsonl;
  const std::string label = folder ? std::to_string(files.text.size()) + " file(s) " +
                                         (o.name_prefix.empty() ? "" : o.name_prefix + "* ") +
                                         "under " + o.path + " (" + std::to_string(jsonl) +
                                         " JSONL, " + std::to_string(text) + " text)"
                                   : (jsonl > 0 ? "JSONL file " : "text file ") + o.path;
  return make_text_source(std::move(files.text), o, std::move(tokenizer), label);
}

std::unique_ptr<DocumentSource> make_source(const DatasetOptions& o,
                                            std::shared_ptr<const Tokenizer> tokenizer) {
  TITAN_CHECK(tokenizer->vocab_size() <= o.vocab_size, "tokenizer ", tokenizer->describe(), " has ",
              tokenizer->vocab_size(), " ids but the model's vocabulary holds ", o.vocab_size,
              "; pick a model flavor with a larger vocab_size or another tokenizer");
  if (o.path.empty()) {
    if (o.name == "titan_corpus" || o.name == "titan_corpus_train") {
      return make_corpus_source("train", tokenizer, o.dp_rank, o.dp_size);
    }
    if (o.name == "titan_corpus_validation") {
      return make_corpus_source("validation", tokenizer, o.dp_rank, o.dp_size);
    }
    const std::string key = o.section + ".dataset";
    if (o.name == "c4_test") {
      // torchtitan's test dataset: a folder of its checkout, read relative to the working
      // directory as torchtitan reads it.
      const std::string folder = "tests/assets/c4_test";
      TITAN_CHECK(util::is_directory(folder), key,
                  ": \"c4_test\" is torchtitan's test dataset, read from ", folder,
                  " under the working directory (a torchtitan checkout), which has no such "
                  "folder; run from there, set ",
                  key, "_path, or use titan_corpus");
      DatasetOptions local = o;
      local.path = folder;
      return make_file_source(local, std::move(tokenizer));
    }
    if (o.name == "c4" || o.name == "c4_validation") {
      fail(key, ": \"", o.name,
           "\" is allenai/c4 on the Hugging Face Hub, which titan does not download; download "
           "it (its en/ files suffice, read compressed) and set ",
           key, "_path to the folder, or use titan_corpus");
    }
    fail(key, ": \"", o.name, "\" is not built in and ", key,
         "_path is empty; built in: titan_corpus, titan_corpus_validation (and torchtitan's "
         "c4_test under the working directory); anything else needs a local ",
         key, "_path");
  }
  TITAN_CHECK(util::path_exists(util::path_str(o.path)), o.section, ".dataset_path: ", o.path,
              " does not exist", util::relative_note(o.path));
  // A copy of the allenai/c4 repository (or its en/ folder): torchtitan reads
  // load_dataset(path, name="en", split=...), i.e. en/c4-train.* or en/c4-validation.* (not
  // en.noblocklist/, realnewslike/, ...).
  std::filesystem::path given = std::filesystem::path(o.path).lexically_normal();
  if (given.filename().empty()) given = given.parent_path();
  std::string c4_en;
  if (util::is_directory((given / "en").string())) {
    c4_en = (given / "en").string();
  } else if (given.filename() == "en" && util::is_directory(given.string())) {
    c4_en = given.string();
  }
  if ((o.name == "c4" || o.name == "c4_validation") && !c4_en.empty()) {
    DatasetOptions en = o;
    en.path = c4_en;
    en.name_prefix = o.name == "c4" ? "c4-train." : "c4-validation.";
    return make_file_source(en, std::move(tokenizer));
  }
  return make_file_source(o, std::move(tokenizer));
}

}  // namespace titan::data
