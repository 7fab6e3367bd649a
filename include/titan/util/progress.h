// Progress lines for long work outside training steps (checkpoint writes and loads, exports):
// "what: 12.3 / 22.9 GiB (54%), 10 s, eta 8 s", at most every few seconds, then a final line.
#pragma once

#include <chrono>
#include <string>

namespace titan::util {

class Progress {
 public:
  // `total` in `unit`s (e.g. bytes with unit "GiB" and scale 2^30).
  Progress(std::string what, double total, std::string unit, double scale, double interval_s = 5.0);
  void advance(double amount);
  void finish();

 private:
  void report(bool final);
  std::string what_, unit_;
  double total_, scale_, interval_s_, done_ = 0;
  std::chrono::steady_clock::time_point start_, last_;
  bool finished_ = false;
};

}  // namespace titan::util
