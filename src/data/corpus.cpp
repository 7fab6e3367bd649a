// The generated corpus: templates over word lists driven by a seeded splitmix64 stream.
#include "titan/data/corpus.h"

#include <array>
#include <vector>

#include "titan/util/error.h"

namespace titan::data {
namespace {

class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next() {
    uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  template <typename T, size_t N>
  const T& pick(const std::array<T, N>& items) {
    return items[static_cast<size_t>(below(static_cast<int64_t>(N)))];
  }

 private:
  uint64_t state_;
};

const std::array<const char*, 24> kNames = {
    "Ada",  "Ben",  "Cleo", "Dara", "Eli",   "Fay",  "Gus",  "Hana", "Ivo", "Juno", "Kai",  "Lena",
    "Milo", "Nina", "Otto", "Pia",  "Quinn", "Rosa", "Sami", "Tom",  "Uma", "Vera", "Wren", "Zoe"};
const std::array<const char*, 20> kAnimals = {
    "cat",  "dog",   "fox",    "owl",  "bear", "mouse", "horse",  "rabbit", "duck", "goat",
    "frog", "otter", "badger", "crow", "deer", "wolf",  "turtle", "lamb",   "hen",  "seal"};
const std::array<const char*, 16> kAdjectives = {
    "small", "big",   "quiet", "brave", "clever",  "sleepy", "happy", "old",
    "young", "tired", "kind",  "shy",   "curious", "gentle", "busy",  "proud"};
const std::array<const char*, 16> kColors = {
    "red",    "blue",   "green", "yellow", "white",  "black", "brown", "grey",
    "orange", "purple", "pink",  "golden", "silver", "dark",  "pale",  "bright"};
const std::array<const char*, 14> kPlaces = {"forest", "river",  "village", "garden", "hill",
                                             "lake",   "meadow", "barn",    "market", "bridge",
                                             "castle", "harbor", "valley",  "library"};
const std::array<const char*, 14> kThings = {"apples",  "books",   "stones",  "coins",  "shells",
                                             "pencils", "cups",    "hats",    "keys",   "boxes",
                                             "candles", "flowers", "ribbons", "marbles"};
const std::array<const char*, 12> kVerbsPast = {"found",   "saw",     "followed", "helped",
                                                "called",  "visited", "met",      "watched",
                                                "greeted", "chased",  "carried",  "painted"};
const std::array<const char*, 8> kFeelings = {"glad",   "surprised", "calm",  "excited",
                                              "hungry", "worried",   "proud", "sleepy"};
const std::array<const char*, 7> kDays = {"Monday", "Tuesday",  "Wednesday", "Thursday",
                                          "Friday", "Saturday", "Sunday"};
const std::array<const char*, 12> kMonths = {"January",   "February", "March",    "April",
                                             "May",       "June",     "July",     "August",
                                             "September", "October",  "November", "December"};
const std::array<const char*, 21> kNumberWords = {
    "zero",     "one",     "two",     "three",     "four",     "five",     "six",
    "seven",    "eight",   "nine",    "ten",       "eleven",   "twelve",   "thirteen",
    "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty"};

std::string cap(std::string s) {
  if (!s.empty() && s[0] >= 'a' && s[0] <= 'z') s[0] = static_cast<char>(s[0] - 'a' + 'A');
  return s;
}

std::string story(Rng& r) {
  std::string name = r.pick(kNames);
  std::string animal = r.pick(kAnimals);
  std::string adj = r.pick(kAdjectives);
  std::string place = r.pick(kPlaces);
  std::string out = "Once upon a time, there was a " + adj + " " + animal + " named " + name +
                    ". " + name + " lived near the " + place + ".";
  const int64_t n = 2 + r.below(5);
  for (int64_t i = 0; i < n; ++i) {
    switch (r.below(5)) {
      case 0:
        out += std::string(" One day, ") + name + " " + r.pick(kVerbsPast) + " a " +
               r.pick(kColors) + " " + r.pick(kAnimals) + " by the " + r.pick(kPlaces) + ".";
        break;
      case 1: out += std::string(" The ") + animal + " felt " + r.pick(kFeelings) + "."; break;
      case 2: {
        const int64_t k = 2 + r.below(9);
        out += " " + name + " had " + kNumberWords[static_cast<size_t>(k)] + " " + r.pick(kThings) +
               ".";
        break;
      }
      case 3:
        out += std::string(" \"Hello,\" said ") + name + ". \"I am a " + adj + " " + animal + ".\"";
        break;
      default: out += std::string(" In the evening, ") + name + " went back to the " + place + ".";
    }
  }
  out += " The end.";
  return out;
}

std::string arithmetic(Rng& r) {
  std::string out;
  const int64_t n = 3 + r.below(6);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t a = r.below(50), b = r.below(50);
    switch (r.below(3)) {
      case 0:
        out += std::to_string(a) + " + " + std::to_string(b) + " = " + std::to_string(a + b) + ". ";
        break;
      case 1: {
        const int64_t hi = std::max(a, b), lo = std::min(a, b);
        out += std::to_string(hi) + " - " + std::to_string(lo) + " = " + std::to_string(hi - lo) +
               ". ";
        break;
      }
      default: {
        const int64_t x = r.below(13), y = r.below(13);
        out += std::to_string(x) + " times " + std::to_string(y) + " is " + std::to_string(x * y) +
               ". ";
      }
    }
  }
  out.pop_back();
  return out;
}

std::string word_problem(Rng& r) {
  std::string name = r.pick(kNames);
  std::string things = r.pick(kThings);
  const int64_t a = 1 + r.below(20), b = 1 + r.below(20);
  return name + " has " + std::to_string(a) + " " + things + ". " + cap(r.pick(kNames)) +
         " gives " + name + " " + std::to_string(b) + " more " + things + ". Now " + name +
         " has " + std::to_string(a + b) + " " + things + ".";
}

std::string counting(Rng& r) {
  const int64_t start = r.below(10), len = 5 + r.below(10);
  std::string out = "Let us count: ";
  for (int64_t i = 0; i < len; ++i) {
    const int64_t v = start + i;
    out += (v <= 20 ? std::string(kNumberWords[static_cast<size_t>(v)]) : std::to_string(v));
    out += i + 1 < len ? ", " : ".";
  }
  return out;
}

std::string calendar(Rng& r) {
  const size_t d = static_cast<size_t>(r.below(7));
  const size_t m = static_cast<size_t>(r.below(12));
  return std::string("After ") + kDays[d] + " comes " + kDays[(d + 1) % 7] + ", and after " +
         kDays[(d + 1) % 7] + " comes " + kDays[(d + 2) % 7] + ". The month after " + kMonths[m] +
         " is " + kMonths[(m + 1) % 12] + ".";
}

std::string facts(Rng& r) {
  std::string animal = r.pick(kAnimals);
  std::string color = r.pick(kColors);
  std::string name = r.pick(kNames);
  return std::string("The ") + color + " " + animal + " is in the " + r.pick(kPlaces) + ". " +
         name + " likes the " + color + " " + animal + ". Where is the " + animal + "? The " +
         animal + " is in the " + r.pick(kPlaces) + ".";
}

}  // namespace

int64_t corpus_documents(const std::string& split) {
  if (split == "train") return 200000;
  if (split == "validation") return 2000;
  internal_fail("unknown corpus split ", split);
}

std::string corpus_document(const std::string& split, int64_t index) {
  const uint64_t base = split == "train" ? 0x7469746E00000000ULL : 0x76616C6900000000ULL;
  Rng r(base ^ static_cast<uint64_t>(index) * 0xD1B54A32D192ED03ULL);
  switch (r.below(6)) {
    case 0: return story(r);
    case 1: return arithmetic(r);
    case 2: return word_problem(r);
    case 3: return counting(r);
    case 4: return calendar(r);
    default: return facts(r);
  }
}

}  // namespace titan::data
