// The PCRE2-backed pre-tokenizer: UTF-8 validation, the \s rewrite, and the split loop.
#include "titan/data/pretokenizer.h"

#include <pcre2.h>

#include <cstring>
#include <string>

#include "titan/util/error.h"

namespace titan::data {
namespace {

// The Unicode White_Space property as class items (what Rust's regex, used by tiktoken and
// HF tokenizers, means by \s).
constexpr const char* kWhiteSpaceItems =
    R"(\x{09}-\x{0D}\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})";

// Replaces \s (and \S outside classes) by explicit White_Space classes.
std::string rewrite_whitespace(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 256);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\' && i + 1 < pattern.size()) {
      const char e = pattern[i + 1];
      if (e == 's') {
        out += in_class ? std::string(kWhiteSpaceItems) : "[" + std::string(kWhiteSpaceItems) + "]";
      } else if (e == 'S' && !in_class) {
        out += "[^" + std::string(kWhiteSpaceItems) + "]";
      } else {
        out += c;
        out += e;
      }
      ++i;
      continue;
    }
    if (!in_class && c == '[') {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (in_class && c == ']') in_class = false;
    out += c;
  }
  return out;
}

size_t utf8_char_length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c < 0xE0) return 2;
  if (c < 0xF0) return 3;
  return 4;
}

// Per-thread match state: PCRE2 match data, a match context and a JIT stack large enough for
// long whitespace runs.
struct MatchScratch {
  pcre2_match_data* data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  MatchScratch() {
    data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(32 * 1024, 8 * 1024 * 1024, nullptr);
    if (context && jit_stack) pcre2_jit_stack_assign(context, nullptr, jit_stack);
    if (!data || !context) fail("out of memory creating PCRE2 match data");
  }
  ~MatchScratch() {
    if (jit_stack) pcre2_jit_stack_free(jit_stack);
    if (context) pcre2_match_context_free(context);
    if (data) pcre2_match_data_free(data);
  }
};

MatchScratch& scratch() {
  thread_local MatchScratch s;
  return s;
}

}  // namespace

size_t valid_utf8_prefix(std::string_view text) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  const size_t n = text.size();
  size_t i = 0;
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    if (i + 8 <= n) {
      uint64_t v;
      std::memcpy(&v, p + i, 8);
      if ((v & 0x8080808080808080ULL) == 0) {
        i += 8;
        continue;
      }
    }
    const unsigned char c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;  // bounds of the second byte
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    } else {
      return i;
    }
    if (i + len > n) return i;
    if (p[i + 1] < lo || p[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
    }
    i += len;
  }
  return n;
}

struct Pretokenizer::Impl {
  pcre2_code* code = nullptr;
  bool jit = false;
  ~Impl() {
    if (code) pcre2_code_free(code);
  }

  template <typename Emit>
  void split_valid(std::string_view run, Emit&& emit) const {
    MatchScratch& s = scratch();
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(run.data());
    size_t pos = 0;
    while (pos < run.size()) {
      const int rc =
          jit ? pcre2_jit_match(code, subject, run.size(), pos, PCRE2_NO_UTF_CHECK, s.data,
                                s.context)
              : pcre2_match(code, subject, run.size(), pos, PCRE2_NO_UTF_CHECK, s.data, s.context);
      if (rc == PCRE2_ERROR_NOMATCH) {
        emit(run.substr(pos));
        return;
      }
      if (rc < 0) {
        // Resource limits (e.g. a pathological run): fall back to one character.
        const size_t len = utf8_char_length(static_cast<unsigned char>(run[pos]));
        emit(run.substr(pos, len));
        pos += len;
        continue;
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(s.data);
      const size_t start = ov[0], end = ov[1];
      if (start > pos) emit(run.substr(pos, start - pos));
      if (end <= start) {  // an empty match: take one character so the loop advances
        const size_t len = utf8_char_length(static_cast<unsigned char>(run[start]));
        emit(run.substr(start, len));
        pos = start + len;
        continue;
      }
      emit(run.substr(start, end - start));
      pos = end;
    }
  }
};

Pretokenizer::Pretokenizer(std::string_view pattern, std::string_view what)
    : impl_(std::make_unique<Impl>()) {
  const std::string rewritten = rewrite_whitespace(pattern);
  int error = 0;
  PCRE2_SIZE offset = 0;
  impl_->code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(rewritten.data()), rewritten.size(),
                              PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
  if (!impl_->code) {
    PCRE2_UCHAR message[256];
    pcre2_get_error_message(error, message, sizeof(message));
    fail(what, ": pre-tokenizer regex does not compile (", reinterpret_cast<char*>(message),
         "): ", pattern);
  }
  impl_->jit = pcre2_jit_compile(impl_->code, PCRE2_JIT_COMPLETE) == 0;
}

Pretokenizer::~Pretokenizer() = default;

bool Pretokenizer::jit() const {
  return impl_->jit;
}

void Pretokenizer::split_each(std::string_view text, void (*emit)(void*, std::string_view),
                              void* ctx) const {
  auto out = [&](std::string_view piece) { emit(ctx, piece); };
  size_t i = 0;
  while (i < text.size()) {
    const size_t run = valid_utf8_prefix(text.substr(i));
    if (run > 0) {
      impl_->split_valid(text.substr(i, run), out);
      i += run;
    }
    if (i < text.size()) {  // a byte that is not valid UTF-8 here
      out(text.substr(i, 1));
      ++i;
    }
  }
}

void Pretokenizer::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  for_each_piece(text, [&](std::string_view piece) { pieces.push_back(piece); });
}

}  // namespace titan::data
