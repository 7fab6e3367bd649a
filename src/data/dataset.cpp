// Choosing a document source from the job's dataset options.
#include "titan/data/dataset.h"

#include "titan/util/error.h"

namespace titan::data {

std::unique_ptr<DocumentSource> make_source(const DatasetOptions& o,
                                            std::shared_ptr<const Tokenizer> tokenizer) {
  TITAN_CHECK(tokenizer->vocab_size() <= o.vocab_size,
              "tokenizer ", tokenizer->describe(), " has ", tokenizer->vocab_size(),
              " ids but the model's vocabulary holds ", o.vocab_size,
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
  fail("training.dataset_path: reading local files is not available yet (", o.path, ")");
}

}  // namespace titan::data
