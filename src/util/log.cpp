// Logger set-up for titan_train and tests.
#include "titan/util/log.h"

#include <unistd.h>

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/sinks/stdout_sinks.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>

namespace titan::log {

bool colors_wanted(bool disabled_by_config) {
  return !disabled_by_config && ::isatty(STDOUT_FILENO) == 1;
}

void init(int rank, bool enabled, bool color) {
  spdlog::sink_ptr sink;
  if (color) {
    sink = std::make_shared<spdlog::sinks::stdout_color_sink_mt>();
  } else {
    sink = std::make_shared<spdlog::sinks::stdout_sink_mt>();
  }
  auto logger = std::make_shared<spdlog::logger>("titan", sink);
  std::string pattern = "[titan] %Y-%m-%d %H:%M:%S %^%l%$ ";
  if (rank >= 0) {
    pattern = "[titan] [rank " + std::to_string(rank) + "] %Y-%m-%d %H:%M:%S %^%l%$ ";
  }
  logger->set_pattern(pattern + "%v");
  logger->set_level(enabled ? spdlog::level::info : spdlog::level::warn);
  if (const char* level = std::getenv("TITAN_LOG_LEVEL")) {
    // spdlog reads an unknown name as "off", which would hide the errors too.
    std::string name(level);
    std::transform(name.begin(), name.end(), name.begin(),
                   [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
    const auto parsed = spdlog::level::from_str(name);
    if (parsed != spdlog::level::off || name == "off") {
      // A rank LOG_RANK leaves out still prints no more than its warnings and errors.
      logger->set_level(enabled ? parsed : std::max(parsed, spdlog::level::warn));
    } else {
      std::fprintf(stderr,
                   "titan: TITAN_LOG_LEVEL=%s is not a level (trace, debug, info, warn, error, "
                   "critical, off); ignored\n",
                   level);
    }
  }
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
}

}  // namespace titan::log
