// Logging: spdlog behind a small facade so most files need not include spdlog itself.
#pragma once

#include <spdlog/spdlog.h>

#include <string>

namespace titan::log {

// Sets up the default logger: "[titan] [rank R] time level message"; `rank` < 0 omits it.
// Only ranks for which `enabled` is true print info-level lines; warnings and errors always.
// Whether log lines get colors: never when disabled by the config, or when stdout is not a
// terminal (files and pipes get plain text).
bool colors_wanted(bool disabled_by_config);

void init(int rank, bool enabled, bool color);

template <typename... Args>
void info(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  spdlog::info(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void warn(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  spdlog::warn(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void error(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  spdlog::error(fmt, std::forward<Args>(args)...);
}
template <typename... Args>
void debug(spdlog::format_string_t<Args...> fmt, Args&&... args) {
  spdlog::debug(fmt, std::forward<Args>(args)...);
}

}  // namespace titan::log
