// The one error path of titan: a user-facing exception, thrown anywhere, caught in main.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace titan {

// An error whose message is fit for a user: it names the file/key/value and what was
// expected. main() prints it and exits non-zero.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream out;
  (out << ... << std::forward<Args>(args));
  return out.str();
}
}  // namespace detail

// Throws titan::Error with the streamed arguments as message.
template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

}  // namespace titan

// Checks a condition that depends on user input; throws titan::Error otherwise.
#define TITAN_CHECK(cond, ...)    \
  do {                            \
    if (!(cond)) {                \
      ::titan::fail(__VA_ARGS__); \
    }                             \
  } while (0)
