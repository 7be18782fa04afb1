#include "core/check.h"

#include <cstring>

namespace moetp::detail {

const char* basename_of(const char* path) {
  const char* src = std::strstr(path, "/src/");
  if (src != nullptr) return src + 5;
  const char* slash = std::strrchr(path, '/');
  return slash != nullptr ? slash + 1 : path;
}

void throw_error(const char* file, int line, const std::string& msg) {
  throw Error(fmt::format("{}:{}: {}", basename_of(file), line, msg));
}

}  // namespace moetp::detail
