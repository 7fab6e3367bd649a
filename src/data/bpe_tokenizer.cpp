// Byte-level BPE: flat hash tables for token bytes and merge pairs, a per-piece cache, and
// the merge loop (linear scan for short pieces, a heap for long ones).
#include "titan/data/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <iterator>
#include <limits>
#include <mutex>
#include <queue>
#include <unordered_map>

#include "titan/data/pretokenizer.h"
#include "titan/util/error.h"

namespace titan::data {
namespace {

constexpr uint32_t kNoMerge = std::numeric_limits<uint32_t>::max();

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDULL;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ULL;
  x ^= x >> 33;
  return x;
}

inline uint64_t hash_bytes(std::string_view s) {
  const char* p = s.data();
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (static_cast<uint64_t>(n) * 0xFF51AFD7ED558CCDULL);
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    h = (h ^ v) * 0x9E3779B97F4A7C15ULL;
    h ^= h >> 29;
    p += 8;
    n -= 8;
  }
  if (n > 0) {
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    h = (h ^ v) * 0x9E3779B97F4A7C15ULL;
  }
  return mix64(h);
}

size_t table_capacity(size_t entries) {
  size_t cap = 16;
  while (cap < entries * 2) cap <<= 1;
  return cap;
}

// Token bytes -> id, open addressing over one byte arena; lookups take a string_view.
class BytesTable {
 public:
  void build(const std::vector<std::pair<std::string_view, int32_t>>& entries) {
    arena_.clear();
    size_t total = 0;
    for (const auto& e : entries) total += e.first.size();
    arena_.reserve(total);
    slots_.assign(table_capacity(entries.size()), Slot{});
    mask_ = slots_.size() - 1;
    for (const auto& [bytes, id] : entries) {
      const uint64_t h = hash_bytes(bytes);
      size_t i = h & mask_;
      while (slots_[i].id >= 0) i = (i + 1) & mask_;
      slots_[i] =
          Slot{h, static_cast<uint32_t>(arena_.size()), static_cast<uint32_t>(bytes.size()), id};
      arena_.append(bytes);
    }
  }
  int32_t find(std::string_view bytes) const { return find(bytes, hash_bytes(bytes)); }
  // With the hash_bytes() of `bytes` computed by the caller.
  int32_t find(std::string_view bytes, uint64_t h) const {
    if (slots_.empty()) return -1;
    for (size_t i = h & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.id < 0) return -1;
      if (s.hash == h && s.len == bytes.size() &&
          std::memcmp(arena_.data() + s.offset, bytes.data(), bytes.size()) == 0) {
        return s.id;
      }
    }
  }

 private:
  struct Slot {
    uint64_t hash = 0;
    uint32_t offset = 0;
    uint32_t len = 0;
    int32_t id = -1;
  };
  std::string arena_;
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// (left id, right id) -> (priority, result id), open addressing.
class PairTable {
 public:
  struct Value {
    uint32_t priority = kNoMerge;
    int32_t result = -1;
  };
  void reserve(size_t entries) {
    slots_.assign(table_capacity(entries), Slot{});
    mask_ = slots_.size() - 1;
  }
  // Keeps the first value inserted for a key.
  void insert(int32_t left, int32_t right, Value v) {
    const uint64_t k = key(left, right);
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      if (slots_[i].key == kEmpty) {
        slots_[i] = Slot{k, v};
        return;
      }
      if (slots_[i].key == k) return;
    }
  }
  Value find(int32_t left, int32_t right) const {
    const uint64_t k = key(left, right);
    for (size_t i = mix64(k) & mask_;; i = (i + 1) & mask_) {
      const Slot& s = slots_[i];
      if (s.key == k) return s.value;
      if (s.key == kEmpty) return Value{};
    }
  }

 private:
  static constexpr uint64_t kEmpty = ~0ULL;
  static uint64_t key(int32_t l, int32_t r) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(l)) << 32) | static_cast<uint32_t>(r);
  }
  struct Slot {
    uint64_t key = kEmpty;
    Value value;
  };
  std::vector<Slot> slots_;
  size_t mask_ = 0;
};

// The keys of PieceCache are already hashes.
struct IdentityHash {
  size_t operator()(uint64_t h) const { return static_cast<size_t>(h); }
};

// Encoded pieces, sharded by hash so threads rarely contend; a shard that grows past its
// budget is cleared (simple, and the hot pieces come back at once).
class PieceCache {
 public:
  static constexpr size_t kMaxPieceBytes = 256;
  // `h` is hash_bytes(piece); entries are keyed by it and check the piece itself, so a hash
  // collision only costs a miss.
  bool find(std::string_view piece, uint64_t h, std::vector<int32_t>& out) {
    Shard& s = shards_[(h >> 56) % kShards];
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.map.find(h);
    if (it == s.map.end() || it->second.piece != piece) return false;
    out.insert(out.end(), it->second.ids.begin(), it->second.ids.end());
    return true;
  }
  void insert(std::string_view piece, uint64_t h, const int32_t* ids, size_t n) {
    Shard& s = shards_[(h >> 56) % kShards];
    std::lock_guard<std::mutex> lock(s.mu);
    if (s.map.size() >= kEntriesPerShard) s.map.clear();
    s.map.insert_or_assign(h, Entry{std::string(piece), std::vector<int32_t>(ids, ids + n)});
  }

 private:
  static constexpr size_t kShards = 16;
  static constexpr size_t kEntriesPerShard = 1 << 16;
  struct Entry {
    std::string piece;
    std::vector<int32_t> ids;
  };
  struct Shard {
    std::mutex mu;
    std::unordered_map<uint64_t, Entry, IdentityHash> map;
  };
  std::array<Shard, kShards> shards_;
};

}  // namespace

std::vector<std::string> llama3_special_tokens() {
  std::vector<std::string> names = {"<|begin_of_text|>",
                                    "<|end_of_text|>",
                                    "<|reserved_special_token_0|>",
                                    "<|reserved_special_token_1|>",
                                    "<|reserved_special_token_2|>",
                                    "<|reserved_special_token_3|>",
                                    "<|start_header_id|>",
                                    "<|end_header_id|>",
                                    "<|reserved_special_token_4|>",
                                    "<|eot_id|>"};
  for (int i = 5; i < 256 - 5; ++i) {
    names.push_back("<|reserved_special_token_" + std::to_string(i) + "|>");
  }
  return names;
}

struct BpeTokenizer::Impl {
  std::string description;
  std::unique_ptr<Pretokenizer> pre;
  std::array<int32_t, 256> byte_ids{};
  std::vector<std::string> id_text;  // token bytes or special name, by id
  std::vector<uint8_t> id_kind;      // 0: unused id, 1: token, 2: special
  BytesTable tokens;
  BytesTable specials;
  PairTable pairs;
  bool whole_piece_lookup = true;
  bool bytes_without_token = false;  // some byte_ids are -1: drop those bytes first
  int32_t bos = -1, eos = -1;
  mutable PieceCache cache;

  uint32_t priority(int32_t l, int32_t r, int32_t& result) const {
    const PairTable::Value v = pairs.find(l, r);
    result = v.result;
    return v.priority;
  }

  // BPE of one piece of `n` <= kScanMax bytes: repeatedly merge the lowest-priority adjacent
  // pair (leftmost on ties) by scanning.
  static constexpr size_t kScanMax = 128;
  size_t merge_scan(std::string_view piece, int32_t* ids) const {
    size_t m = piece.size();
    std::array<uint32_t, kScanMax> pr;
    std::array<int32_t, kScanMax> res;
    for (size_t i = 0; i < m; ++i) ids[i] = byte_ids[static_cast<unsigned char>(piece[i])];
    for (size_t i = 0; i + 1 < m; ++i) pr[i] = priority(ids[i], ids[i + 1], res[i]);
    while (m > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < m; ++i) {
        if (pr[i] < pr[best]) best = i;
      }
      if (pr[best] == kNoMerge) break;
      ids[best] = res[best];
      const size_t tail = m - best - 2;  // parts after the removed one
      std::memmove(ids + best + 1, ids + best + 2, tail * sizeof(int32_t));
      std::memmove(pr.data() + best + 1, pr.data() + best + 2, tail * sizeof(uint32_t));
      std::memmove(res.data() + best + 1, res.data() + best + 2, tail * sizeof(int32_t));
      --m;
      if (best > 0) pr[best - 1] = priority(ids[best - 1], ids[best], res[best - 1]);
      if (best + 1 < m) pr[best] = priority(ids[best], ids[best + 1], res[best]);
    }
    return m;
  }

  // The same merge order for long pieces, with a heap of candidate pairs (stale ones are
  // recognised by the ids at their positions having changed: parts only ever grow).
  void merge_heap(std::string_view piece, std::vector<int32_t>& out) const {
    const int32_t n = static_cast<int32_t>(piece.size());
    std::vector<int32_t> ids(n), next(n), prev(n);
    for (int32_t i = 0; i < n; ++i) {
      ids[i] = byte_ids[static_cast<unsigned char>(piece[i])];
      next[i] = i + 1;
      prev[i] = i - 1;
    }
    struct Cand {
      uint32_t priority;
      int32_t pos, right, left_id, right_id, result;
      bool operator>(const Cand& o) const {
        return priority != o.priority ? priority > o.priority : pos > o.pos;
      }
    };
    std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
    auto push = [&](int32_t pos) {
      if (pos < 0) return;
      const int32_t r = next[pos];
      if (r >= n) return;
      int32_t result;
      const uint32_t p = priority(ids[pos], ids[r], result);
      if (p != kNoMerge) heap.push(Cand{p, pos, r, ids[pos], ids[r], result});
    };
    for (int32_t i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      if (ids[c.pos] != c.left_id || next[c.pos] != c.right || ids[c.right] != c.right_id) {
        continue;
      }
      ids[c.pos] = c.result;
      ids[c.right] = -1;
      next[c.pos] = next[c.right];
      if (next[c.pos] < n) prev[next[c.pos]] = c.pos;
      if (prev[c.pos] >= 0) push(prev[c.pos]);
      push(c.pos);
    }
    for (int32_t i = 0; i < n; i = next[i]) out.push_back(ids[i]);
  }

  void encode_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (bytes_without_token) {
      auto known = [&](char c) { return byte_ids[static_cast<unsigned char>(c)] >= 0; };
      if (!std::all_of(piece.begin(), piece.end(), known)) {
        std::string kept;
        std::copy_if(piece.begin(), piece.end(), std::back_inserter(kept), known);
        if (!kept.empty()) encode_known_piece(kept, out);
        return;
      }
    }
    encode_known_piece(piece, out);
  }

  // A piece whose every byte has a token.
  void encode_known_piece(std::string_view piece, std::vector<int32_t>& out) const {
    if (piece.size() == 1) {
      out.push_back(byte_ids[static_cast<unsigned char>(piece[0])]);
      return;
    }
    const uint64_t h = hash_bytes(piece);
    if (whole_piece_lookup) {
      const int32_t id = tokens.find(piece, h);
      if (id >= 0) {
        out.push_back(id);
        return;
      }
    }
    if (piece.size() > PieceCache::kMaxPieceBytes) {
      merge_heap(piece, out);
      return;
    }
    if (cache.find(piece, h, out)) return;
    const size_t before = out.size();
    if (piece.size() <= kScanMax) {
      std::array<int32_t, kScanMax> ids;
      const size_t m = merge_scan(piece, ids.data());
      out.insert(out.end(), ids.begin(), ids.begin() + static_cast<long>(m));
    } else {
      merge_heap(piece, out);
    }
    cache.insert(piece, h, out.data() + before, out.size() - before);
  }
};

BpeTokenizer::BpeTokenizer(BpeSpec spec) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.description = spec.description;
  const std::string& what = spec.description;
  m.whole_piece_lookup = spec.whole_piece_lookup;
  m.pre = std::make_unique<Pretokenizer>(spec.pattern, what);

  int64_t max_id = -1;
  for (const auto& t : spec.tokens) max_id = std::max<int64_t>(max_id, t.id);
  for (const auto& t : spec.specials) max_id = std::max<int64_t>(max_id, t.id);
  TITAN_CHECK(max_id >= 0, what, ": the tokenizer has no tokens");
  TITAN_CHECK(max_id < std::numeric_limits<int32_t>::max(), what, ": token id ", max_id,
              " is too large");
  m.id_text.resize(static_cast<size_t>(max_id + 1));
  m.id_kind.assign(static_cast<size_t>(max_id + 1), 0);
  auto claim = [&](const BpeSpec::Token& t, uint8_t kind) {
    TITAN_CHECK(t.id >= 0, what, ": negative token id ", t.id);
    TITAN_CHECK(m.id_kind[t.id] == 0, what, ": token id ", t.id, " is assigned twice");
    m.id_kind[t.id] = kind;
    m.id_text[t.id] = t.bytes;
  };
  std::vector<std::pair<std::string_view, int32_t>> entries;
  entries.reserve(spec.tokens.size());
  for (const auto& t : spec.tokens) {
    TITAN_CHECK(!t.bytes.empty(), what, ": token id ", t.id, " is empty");
    claim(t, 1);
    entries.emplace_back(m.id_text[t.id], t.id);
  }
  m.tokens.build(entries);
  for (const auto& [bytes, id] : entries) {
    TITAN_CHECK(m.tokens.find(bytes) == id, what, ": token ids ", m.tokens.find(bytes), " and ", id,
                " have the same bytes");
  }
  entries.clear();
  for (const auto& t : spec.specials) {
    claim(t, 2);
    entries.emplace_back(m.id_text[t.id], t.id);
  }
  m.specials.build(entries);

  for (int b = 0; b < 256; ++b) {
    const char c = static_cast<char>(b);
    m.byte_ids[b] = m.tokens.find(std::string_view(&c, 1));
    if (m.byte_ids[b] < 0 && spec.drop_bytes_without_token) {
      m.bytes_without_token = true;
    } else if (m.byte_ids[b] < 0) {
      fail(what, ": no token for the single byte 0x", "0123456789abcdef"[b >> 4],
           "0123456789abcdef"[b & 15], "; byte-level BPE needs a token for each of the 256 bytes");
    }
  }

  if (spec.merges.empty() && !spec.merges_listed) {
    // tiktoken: every split of a token into two tokens merges into it, at the token's rank.
    size_t splits = 0;
    for (const auto& t : spec.tokens) splits += t.bytes.size() - 1;
    m.pairs.reserve(splits);
    for (const auto& t : spec.tokens) {
      const std::string_view bytes = m.id_text[t.id];
      for (size_t k = 1; k < bytes.size(); ++k) {
        const int32_t l = m.tokens.find(bytes.substr(0, k));
        if (l < 0) continue;
        const int32_t r = m.tokens.find(bytes.substr(k));
        if (r < 0) continue;
        m.pairs.insert(l, r, PairTable::Value{static_cast<uint32_t>(t.id), t.id});
      }
    }
  } else {
    m.pairs.reserve(spec.merges.size());
    for (const auto& mg : spec.merges) {
      auto is_token = [&](int32_t id) { return id >= 0 && id <= max_id && m.id_kind[id] == 1; };
      TITAN_CHECK(is_token(mg.left) && is_token(mg.right) && is_token(mg.result), what, ": merge (",
                  mg.left, ", ", mg.right, ") -> ", mg.result,
                  " refers to an id that is not a token");
      TITAN_CHECK(m.id_text[mg.result] == m.id_text[mg.left] + m.id_text[mg.right], what,
                  ": merge (", mg.left, ", ", mg.right, ") -> ", mg.result,
                  ": the result is not the concatenation of the two parts");
      m.pairs.insert(mg.left, mg.right, PairTable::Value{mg.priority, mg.result});
    }
  }

  auto valid_id = [&](int32_t id) { return id >= 0 && id <= max_id && m.id_kind[id] != 0; };
  TITAN_CHECK(valid_id(spec.bos_id), what, ": no BOS token");
  TITAN_CHECK(valid_id(spec.eos_id), what, ": no EOS token");
  m.bos = spec.bos_id;
  m.eos = spec.eos_id;
}

BpeTokenizer::~BpeTokenizer() = default;

void BpeTokenizer::encode_into(std::string_view text, std::vector<int32_t>& out) const {
  impl_->pre->for_each_piece(text,
                             [&](std::string_view piece) { impl_->encode_piece(piece, out); });
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 8);
  encode_into(text, out);
  return out;
}

std::string BpeTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  out.reserve(ids.size() * 4);
  for (int32_t id : ids) {
    if (id >= 0 && static_cast<size_t>(id) < impl_->id_kind.size() && impl_->id_kind[id] != 0) {
      out += impl_->id_text[id];
    } else {
      out += "<|unknown:" + std::to_string(id) + "|>";
    }
  }
  return out;
}

int64_t BpeTokenizer::vocab_size() const {
  return static_cast<int64_t>(impl_->id_kind.size());
}
int32_t BpeTokenizer::bos_id() const {
  return impl_->bos;
}
int32_t BpeTokenizer::eos_id() const {
  return impl_->eos;
}
std::string BpeTokenizer::describe() const {
  return impl_->description;
}
int32_t BpeTokenizer::token_id(std::string_view bytes) const {
  return impl_->tokens.find(bytes);
}
int32_t BpeTokenizer::special_id(std::string_view name) const {
  return impl_->specials.find(name);
}

}  // namespace titan::data
