// The error paths of titan: a user-facing exception and an internal (bug) one, thrown anywhere,
// caught in main.
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

// A broken invariant of titan itself: a bug, never the user's doing. main() prints it as an
// internal error (exit 3).
class InternalError : public std::logic_error {
 public:
  explicit InternalError(const std::string& message) : std::logic_error(message) {}
};

// Throws titan::Error with the streamed arguments as message.
template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(detail::concat(std::forward<Args>(args)...));
}

// Throws titan::InternalError with the streamed arguments as message.
template <typename... Args>
[[noreturn]] void internal_fail(Args&&... args) {
  throw InternalError(detail::concat(std::forward<Args>(args)...));
}

}  // namespace titan

// Checks a condition that depends on user input; throws titan::Error otherwise.
#define TITAN_CHECK(cond, ...)    \
  do {                            \
    if (!(cond)) {                \
      ::titan::fail(__VA_ARGS__); \
    }                             \
  } while (0)

namespace titan {
// Test-only fault injection: ends the process at once (as SIGKILL would, exit status 137) when
// TITAN_TEST_FAULT names this rank and point, e.g. "1:save" or "0:step3". Used by the
// reliability tests to kill a rank at a known moment.
void test_fault_point(int rank, const std::string& point);
}  // namespace titan

// Checks one of titan's own invariants; throws titan::InternalError otherwise.
#define TITAN_INTERNAL_CHECK(cond, ...)    \
  do {                                     \
    if (!(cond)) {                         \
      ::titan::internal_fail(__VA_ARGS__); \
    }                                      \
  } while (0)
