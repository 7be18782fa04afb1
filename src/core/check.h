// Errors and checks. Library code throws moetp::Error ("file:line: message") and never exits;
// the CLI catches it, prints "[rank r] ..." and aborts the job so that no rank hangs on a peer.
// Messages quote the values involved: MOETP_CHECK(e % p == 0, "num_experts ({}) % ep ({}) != 0", e, p).
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moetp {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
[[noreturn]] void throw_error(const char* file, int line, const std::string& msg);
const char* basename_of(const char* path);
}  // namespace detail

}  // namespace moetp

// Throws moetp::Error with "file:line: <formatted message>" when cond is false.
#define MOETP_CHECK(cond, ...)                                                    \
  do {                                                                            \
    if (!(cond)) [[unlikely]] {                                                   \
      ::moetp::detail::throw_error(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__)); \
    }                                                                             \
  } while (0)

// Unconditional failure with a formatted message.
#define MOETP_FAIL(...) ::moetp::detail::throw_error(__FILE__, __LINE__, ::fmt::format(__VA_ARGS__))

// One generator for library status checks: MOETP_STATUS_CHECK(call, ok_value, to_string_fn).
#define MOETP_STATUS_CHECK(call, ok, describe)                                            \
  do {                                                                                    \
    auto moetp_status_ = (call);                                                          \
    if (moetp_status_ != (ok)) [[unlikely]] {                                             \
      ::moetp::detail::throw_error(__FILE__, __LINE__,                                    \
                                   ::fmt::format("{} failed: {}", #call, describe(moetp_status_))); \
    }                                                                                     \
  } while (0)
