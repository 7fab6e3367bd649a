// titan_bench_tokenizer: single-core encode throughput of the byte-level BPE tokenizer on
// generated text (a tokenizer trained here, or --tokenizer PATH), checked by a round trip.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "titan/data/bpe_trainer.h"
#include "titan/data/corpus.h"
#include "titan/data/tokenizer.h"
#include "titan/util/error.h"
#include "titan/util/strings.h"

namespace {

using namespace titan;
using Clock = std::chrono::steady_clock;

// The built-in corpus: short, repetitive English.
std::string corpus_text(size_t bytes) {
  std::string s;
  for (int64_t i = 0; s.size() < bytes; ++i) {
    s += data::corpus_document("train", i % data::corpus_documents("train"));
    s += "\n\n";
  }
  s.resize(bytes);
  return s;
}

// English-like prose: 40k pseudo-words drawn with Zipf frequencies (so, as in real text, a
// long tail of words is not a single token), capitals, punctuation, numbers, line breaks.
std::string english_like_text(size_t bytes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  const std::vector<std::string> onsets = {"",  "b",  "c",  "d",  "f",  "g",  "h",
                                           "l", "m",  "n",  "p",  "r",  "s",  "t",
                                           "w", "th", "st", "br", "ch", "pl", "sh"};
  const std::vector<std::string> vowels = {"a", "e", "i", "o", "u", "ea", "ou", "io", "ai"};
  const std::vector<std::string> codas = {"", "", "n", "r", "s", "t", "nd", "ng", "ll", "st", "ck"};
  std::vector<std::string> words;
  for (int i = 0; i < 40000; ++i) {
    std::string w;
    const int syllables = 1 + static_cast<int>(rng() % 3) + (rng() % 4 == 0);
    for (int k = 0; k < syllables; ++k) {
      w += onsets[rng() % onsets.size()] + vowels[rng() % vowels.size()] +
           codas[rng() % codas.size()];
    }
    words.push_back(w);
  }
  std::vector<double> weights(words.size());
  for (size_t i = 0; i < weights.size(); ++i) weights[i] = 1.0 / (static_cast<double>(i) + 2.7);
  std::discrete_distribution<size_t> pick(weights.begin(), weights.end());
  std::string s;
  bool sentence_start = true;
  while (s.size() < bytes) {
    std::string w = words[pick(rng)];
    if (sentence_start) w[0] = static_cast<char>(w[0] - 'a' + 'A');
    if (!sentence_start) s += ' ';
    sentence_start = false;
    const uint64_t r = rng() % 100;
    if (r < 3) {
      s += std::to_string(rng() % 2030);
      s += ' ';
    } else if (r < 5) {
      s += '"';
    }
    s += w;
    const uint64_t p = rng() % 100;
    if (p < 7) {
      s += ". ";
      sentence_start = true;
      if (rng() % 8 == 0) s += "\n\n";
    } else if (p < 12) {
      s += ',';
    } else if (p < 13) {
      s += "'s";
    }
  }
  s.resize(bytes);
  return s;
}

struct Result {
  double mb_per_s = 0;
  int64_t tokens = 0;
  bool round_trip = false;
};

Result measure(const data::Tokenizer& tok, const std::string& text) {
  Result r;
  const auto t0 = Clock::now();
  const auto ids = tok.encode(text);
  const double s = std::chrono::duration<double>(Clock::now() - t0).count();
  r.mb_per_s = text.size() / s / 1e6;
  r.tokens = static_cast<int64_t>(ids.size());
  r.round_trip = tok.decode(ids) == text;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    size_t mb = 32;
    int64_t ranks = 8192;
    std::string tokenizer_path;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      auto value = [&]() -> std::string {
        TITAN_CHECK(i + 1 < argc, a, " needs a value");
        return argv[++i];
      };
      int64_t v = 0;
      if (a == "--mb" && util::parse_int(value(), v) && v > 0) {
        mb = static_cast<size_t>(v);
      } else if (a == "--ranks" && util::parse_int(value(), v) && v >= 256) {
        ranks = v;
      } else if (a == "--tokenizer") {
        tokenizer_path = value();
      } else {
        std::cout << "usage: titan_bench_tokenizer [--mb N (32)] [--ranks N (8192)] "
                     "[--tokenizer tokenizer.json|tokenizer.model]\n";
        return a == "--help" ? 0 : 2;
      }
    }
    const size_t bytes = mb << 20;
    std::vector<std::pair<std::string, std::string>> texts = {
        {"english-like", english_like_text(bytes, 1)}, {"titan corpus", corpus_text(bytes)}};

    std::unique_ptr<data::Tokenizer> tok;
    if (!tokenizer_path.empty()) {
      tok = data::build_tokenizer(tokenizer_path, "");
    } else {
      // Train on other text than the measured one (another seed), as a real tokenizer is.
      const auto t0 = Clock::now();
      data::BpeTrainer trainer;
      trainer.add_text(english_like_text(4 << 20, 2));
      trainer.add_text(corpus_text(1 << 20));
      const auto r = trainer.train(ranks);
      tok = data::make_tiktoken_tokenizer(data::ranks_as_tokens(r), "bench BPE");
      std::printf("trained a %zu-rank BPE on 5 MB in %.1f s\n", r.size(),
                  std::chrono::duration<double>(Clock::now() - t0).count());
    }
    std::printf("tokenizer: %s\n", tok->describe().c_str());
    std::printf("%-14s %8s %12s %10s %12s %10s\n", "text", "MB", "tokens", "bytes/tok",
                "MB/s (cold)", "MB/s (warm)");
    bool ok = true;
    for (const auto& [name, text] : texts) {
      const Result cold = measure(*tok, text);
      const Result warm = measure(*tok, text);
      ok = ok && cold.round_trip && warm.round_trip;
      std::printf("%-14s %8.1f %12s %10.2f %12.1f %10.1f%s\n", name.c_str(), text.size() / 1e6,
                  util::with_commas(cold.tokens).c_str(),
                  static_cast<double>(text.size()) / cold.tokens, cold.mb_per_s, warm.mb_per_s,
                  cold.round_trip ? "" : "  ROUND TRIP FAILED");
    }
    return ok ? 0 : 1;
  } catch (const titan::Error& e) {
    std::cerr << "titan_bench_tokenizer: error: " << e.what() << std::endl;
    return 2;
  }
}
