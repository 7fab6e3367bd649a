// The BPE trainer: pair counts with a lazily updated max-heap and an index from pairs to the
// words containing them, so each merge touches only the words it changes.
#include "titan/data/bpe_trainer.h"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <queue>

#include "titan/util/error.h"

namespace titan::data {
namespace {

uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

std::string base64_encode(std::string_view in) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((in.size() + 2) / 3 * 4);
  size_t i = 0;
  for (; i + 3 <= in.size(); i += 3) {
    const uint32_t v = (static_cast<unsigned char>(in[i]) << 16) |
                       (static_cast<unsigned char>(in[i + 1]) << 8) |
                       static_cast<unsigned char>(in[i + 2]);
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += alphabet[(v >> 6) & 63];
    out += alphabet[v & 63];
  }
  const size_t rest = in.size() - i;
  if (rest > 0) {
    uint32_t v = static_cast<unsigned char>(in[i]) << 16;
    if (rest == 2) v |= static_cast<unsigned char>(in[i + 1]) << 8;
    out += alphabet[(v >> 18) & 63];
    out += alphabet[(v >> 12) & 63];
    out += rest == 2 ? alphabet[(v >> 6) & 63] : '=';
    out += '=';
  }
  return out;
}

}  // namespace

BpeTrainer::BpeTrainer(std::string_view pattern) : pre_(pattern, "BPE trainer") {}

void BpeTrainer::add_text(std::string_view text) {
  pre_.for_each_piece(text, [&](std::string_view piece) {
    piece_.assign(piece);
    auto it = counts_.find(piece_);
    if (it == counts_.end()) {
      counts_.emplace(piece_, 1);
    } else {
      ++it->second;
    }
  });
}

std::vector<std::string> BpeTrainer::train(int64_t num_ranks) const {
  TITAN_CHECK(num_ranks >= 256, "BPE training needs at least 256 ranks (one per byte), got ",
              num_ranks);
  std::vector<std::string> tokens;
  std::unordered_map<std::string, int32_t> token_ids;
  for (int b = 0; b < 256; ++b) {
    tokens.emplace_back(1, static_cast<char>(b));
    token_ids[tokens.back()] = b;
  }

  // Words in a fixed order (sorted bytes), so training does not depend on hash order.
  std::vector<const std::pair<const std::string, int64_t>*> sorted;
  sorted.reserve(counts_.size());
  for (const auto& e : counts_) sorted.push_back(&e);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->first < b->first; });
  std::vector<std::vector<int32_t>> words;
  std::vector<int64_t> freq;
  for (const auto* e : sorted) {
    if (e->first.size() < 2) continue;
    std::vector<int32_t> w;
    for (unsigned char c : e->first) w.push_back(c);
    words.push_back(std::move(w));
    freq.push_back(e->second);
  }

  std::unordered_map<uint64_t, int64_t> pair_count;
  std::unordered_map<uint64_t, std::vector<int32_t>> pair_words;
  for (size_t wi = 0; wi < words.size(); ++wi) {
    const auto& w = words[wi];
    for (size_t i = 0; i + 1 < w.size(); ++i) {
      const uint64_t k = pair_key(w[i], w[i + 1]);
      pair_count[k] += freq[wi];
      pair_words[k].push_back(static_cast<int32_t>(wi));
    }
  }
  struct Entry {
    int64_t count;
    uint64_t key;
    bool operator<(const Entry& o) const {  // max-heap: higher count, then lower pair key
      return count != o.count ? count < o.count : key > o.key;
    }
  };
  std::priority_queue<Entry> heap;
  for (const auto& [k, c] : pair_count) heap.push(Entry{c, k});

  std::vector<int64_t> stamp(words.size(), -1);
  std::vector<uint64_t> changed;
  int64_t iteration = 0;
  while (static_cast<int64_t>(tokens.size()) < num_ranks && !heap.empty()) {
    const Entry top = heap.top();
    heap.pop();
    auto pc = pair_count.find(top.key);
    if (pc == pair_count.end() || pc->second != top.count) continue;  // stale
    if (top.count < 2) break;
    const auto a = static_cast<int32_t>(top.key >> 32);
    const auto b = static_cast<int32_t>(top.key & 0xFFFFFFFFu);
    const std::string merged = tokens[a] + tokens[b];
    int32_t id;
    if (auto it = token_ids.find(merged); it != token_ids.end()) {
      id = it->second;  // reachable by another split already: no new rank
    } else {
      id = static_cast<int32_t>(tokens.size());
      tokens.push_back(merged);
      token_ids[merged] = id;
    }
    ++iteration;
    changed.clear();
    const std::vector<int32_t> where = std::move(pair_words[top.key]);
    pair_words.erase(top.key);
    for (int32_t wi : where) {
      if (stamp[wi] == iteration) continue;
      stamp[wi] = iteration;
      auto& w = words[wi];
      std::vector<int32_t> merged_word;
      merged_word.reserve(w.size());
      bool any = false;
      for (size_t i = 0; i < w.size(); ++i) {
        if (i + 1 < w.size() && w[i] == a && w[i + 1] == b) {
          merged_word.push_back(id);
          ++i;
          any = true;
        } else {
          merged_word.push_back(w[i]);
        }
      }
      if (!any) continue;
      for (size_t i = 0; i + 1 < w.size(); ++i) {
        const uint64_t k = pair_key(w[i], w[i + 1]);
        pair_count[k] -= freq[wi];
        changed.push_back(k);
      }
      for (size_t i = 0; i + 1 < merged_word.size(); ++i) {
        const uint64_t k = pair_key(merged_word[i], merged_word[i + 1]);
        pair_count[k] += freq[wi];
        pair_words[k].push_back(wi);
        changed.push_back(k);
      }
      w = std::move(merged_word);
    }
    std::sort(changed.begin(), changed.end());
    changed.erase(std::unique(changed.begin(), changed.end()), changed.end());
    for (uint64_t k : changed) {
      auto it = pair_count.find(k);
      if (it->second > 0) {
        heap.push(Entry{it->second, k});
      } else {
        pair_count.erase(it);
      }
    }
  }
  return tokens;
}

void write_tiktoken_file(const std::string& path, const std::vector<std::string>& ranks) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("cannot write ", path, " (", std::strerror(errno), ")");
  for (size_t i = 0; i < ranks.size(); ++i) out << base64_encode(ranks[i]) << ' ' << i << '\n';
  out.flush();
  if (!out) fail("error writing ", path);
}

std::vector<BpeSpec::Token> ranks_as_tokens(const std::vector<std::string>& ranks) {
  std::vector<BpeSpec::Token> tokens;
  tokens.reserve(ranks.size());
  for (size_t i = 0; i < ranks.size(); ++i) {
    tokens.push_back(BpeSpec::Token{ranks[i], static_cast<int32_t>(i)});
  }
  return tokens;
}

}  // namespace titan::data
