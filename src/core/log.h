// Logging through spdlog. Every line carries the rank once the process knows it; by default only
// rank 0 logs at info level so multi-rank output stays readable (warnings and errors from all ranks).
#pragma once

#include <spdlog/spdlog.h>

namespace moetp::log {

// Call once after MPI is up. `all_ranks` lets every rank log info lines.
void init(int rank, int world_size, bool all_ranks = false);
int rank();

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

}  // namespace moetp::log
