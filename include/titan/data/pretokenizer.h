// The regex pre-tokenizer of byte-level BPE: splits text into the pieces that BPE merges
// inside, with PCRE2 (UTF + Unicode properties, JIT-compiled where available).
#pragma once

#include <memory>
#include <string_view>
#include <type_traits>
#include <vector>

namespace titan::data {

class Pretokenizer {
 public:
  // Throws titan::Error naming `what` when the pattern does not compile. `\s` and `\S` are
  // matched as the Unicode White_Space property (as tiktoken's and HF's Rust regex engines
  // do; PCRE2's own \s differs on a few characters such as U+180E).
  Pretokenizer(std::string_view pattern, std::string_view what);
  ~Pretokenizer();
  Pretokenizer(const Pretokenizer&) = delete;
  Pretokenizer& operator=(const Pretokenizer&) = delete;

  // Appends the pieces of `text` to `pieces` (views into `text`; together they are exactly
  // `text`). Each run of valid UTF-8 is split by the regex (text between matches becomes a
  // piece too); each byte that is not part of valid UTF-8 is a piece of its own. Thread-safe.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;
  // The same pieces, passed one by one to fn(std::string_view) without building a list.
  template <typename Fn>
  void for_each_piece(std::string_view text, Fn&& fn) const {
    using F = std::remove_reference_t<Fn>;
    split_each(
        text, [](void* f, std::string_view piece) { (*static_cast<F*>(f))(piece); }, &fn);
  }

  bool jit() const;

 private:
  void split_each(std::string_view text, void (*emit)(void*, std::string_view), void* ctx) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Number of leading bytes of `text` that form complete, valid UTF-8 (RFC 3629: no overlong
// forms, no surrogates, nothing above U+10FFFF).
size_t valid_utf8_prefix(std::string_view text);

}  // namespace titan::data
