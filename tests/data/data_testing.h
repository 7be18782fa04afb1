// Helpers shared by the data tests: a per-test scratch directory and error-message checks.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <string>

#include "core/check.h"
#include "testing_files.h"

namespace moetp::data::testing {

// The shared file helpers (tests/testing_files.h), under this namespace's names.
class ScratchDir : public ::moetp::testing::ScratchDir {
 public:
  ScratchDir() : ::moetp::testing::ScratchDir("moetp_data") {}
};
using ::moetp::testing::contains_all;
using ::moetp::testing::error_of;
using ::moetp::testing::read_bytes;
using ::moetp::testing::write_bytes;

}  // namespace moetp::data::testing
