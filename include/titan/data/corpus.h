// titan_corpus: the project's own training text, generated deterministically (no download):
// short stories, arithmetic, counting, calendars and simple facts built from word lists,
// with enough structure that a small model's loss falls quickly and keeps falling.
#pragma once

#include <cstdint>
#include <string>

namespace titan::data {

// Document `index` of the named split ("train" or "validation"); the two never overlap.
// The same (split, index) always gives the same text.
std::string corpus_document(const std::string& split, int64_t index);

// Documents per epoch of each split (a finite epoch, so re-looping can be observed).
int64_t corpus_documents(const std::string& split);

}  // namespace titan::data
