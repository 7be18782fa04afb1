#include "core/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>

#include <cstdlib>
#include <string>

namespace moetp::log {

namespace {
int g_rank = 0;
}

void init(int rank, int world_size, bool all_ranks) {
  g_rank = rank;
  auto logger = spdlog::stderr_color_mt("moetp-" + std::to_string(rank));
  logger->set_pattern(world_size > 1 ? fmt::format("[%H:%M:%S] [rank {}] [%^%l%$] %v", rank)
                                     : std::string("[%H:%M:%S] [%^%l%$] %v"));
  spdlog::level::level_enum level = (rank == 0 || all_ranks) ? spdlog::level::info : spdlog::level::warn;
  if (const char* env = std::getenv("MOETP_LOG_LEVEL")) level = spdlog::level::from_str(env);
  logger->set_level(level);
  spdlog::set_default_logger(logger);
}

int rank() { return g_rank; }

}  // namespace moetp::log
