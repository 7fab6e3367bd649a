// Rate-limited progress lines with an ETA.
#include "titan/util/progress.h"

#include "titan/util/error.h"
#include "titan/util/log.h"

namespace titan::util {

Progress::Progress(std::string what, double total, std::string unit, double scale,
                   double interval_s)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      scale_(scale),
      interval_s_(interval_s),
      start_(std::chrono::steady_clock::now()),
      last_(start_) {}

void Progress::advance(double amount) {
  done_ += amount;
  // A total that undercounts the work would print nonsense ("15.3 / 0.0 GiB (100%)").
  TITAN_INTERNAL_CHECK(done_ <= total_ * (1 + 1e-12), what_, ": ", done_, " done of a total of ",
                       total_);
  const auto now = std::chrono::steady_clock::now();
  if (std::chrono::duration<double>(now - last_).count() >= interval_s_) {
    last_ = now;
    report(false);
  }
}

void Progress::finish() {
  if (finished_) return;
  finished_ = true;
  // Only work that took long enough to have reported along the way gets a final line.
  if (last_ != start_) report(true);
}

void Progress::report(bool final) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = total_ > 0 ? done_ / total_ : 1.0;
  const double eta = frac > 0 ? elapsed * (1 - frac) / frac : 0;
  log::info("{}: {:.1f} / {:.1f} {} ({:.0f}%), {:.0f} s{}", what_, done_ / scale_, total_ / scale_,
            unit_, 100 * frac, elapsed,
            final ? std::string(", done") : fmt::format(", eta {:.0f} s", eta));
}

}  // namespace titan::util
