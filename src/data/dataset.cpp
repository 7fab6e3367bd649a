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
  DataFiles files = list_data_files(o.path);
  TITAN_CHECK(files.shards.empty() || files.text.empty(), "dataset path ", o.path,
              " mixes pre-tokenized shards (.bin) and text files; use one kind per dataset");
  const bool folder = util::is_directory(util::path_str(o.path));
  if (!files.shards.empty()) {
    const std::string label =
        folder ? std::to_string(files.shards.size()) + " token shard(s) under " + o.path
               : "token shard " + o.path;
    return make_shard_source(std::move(files.shards), o, label);
  }
  const auto jsonl = std::count_if(files.text.begin(), files.text.end(),
                                   [](const TextFile& f) { return f.jsonl; });
  const auto text = static_cast<int64_t>(files.text.size()) - jsonl;
  const std::string label = folder ? std::to_string(files.text.size()) + " file(s) under " +
                                         o.path + " (" + std::to_string(jsonl) + " JSONL, " +
                                         std::to_string(text) + " text)"
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
    fail("training.dataset: \"", o.name,
         "\" is not built in and training.dataset_path is empty; built in: titan_corpus, "
         "titan_corpus_validation; anything else needs a local training.dataset_path");
  }
  return make_file_source(o, std::move(tokenizer));
}

}  // namespace titan::data
