// Constructors of the file-backed document sources, private to the data module (dataset.cpp
// lists the files and picks one).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "titan/data/dataset.h"
#include "titan/data/text_reader.h"

namespace titan::data {

// Text and JSONL files, documents dealt round-robin over ranks.
std::unique_ptr<DocumentSource> make_text_source(std::vector<TextFile> files,
                                                 const DatasetOptions& options,
                                                 std::shared_ptr<const Tokenizer> tokenizer,
                                                 std::string label);

// Pre-tokenized shards, each file's token range split into contiguous parts over ranks.
std::unique_ptr<DocumentSource> make_shard_source(std::vector<std::string> files,
                                                  const DatasetOptions& options, std::string label);

}  // namespace titan::data
