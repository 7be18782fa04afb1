// Helpers the GPU benchmarks share (timing: cuda_timing.h): non-zero random bf16 data, PxT layout lists, and a
// main() wrapper for programs that run under mpirun (one rank per GPU).
#pragma once

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "comm/mpi_comm.h"
#include "core/bf16.h"
#include "core/check.h"
#include "core/tensor.h"

namespace moetp::bench {

// Uniform bf16 values in [-a, a) from a counter hash (splitmix64): fast enough for hundreds of
// millions of expert-weight values, and never all zeros (zeros can run faster than real data).
inline Tensor random_bf16(Shape shape, uint64_t seed, float a) {
  Tensor t = Tensor::empty(std::move(shape), DType::kBF16);
  bf16* p = t.data<bf16>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    uint64_t z = seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(i) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = f32_to_bf16((2.0f * u - 1.0f) * a);
  }
  return t;
}

// The value of option argv[i] (advancing i past it); an error names the option when none follows.
inline std::string option_value(int argc, char** argv, int& i) {
  MOETP_CHECK(i + 1 < argc, "{} needs a value", argv[i]);
  ++i;
  return argv[i];
}

// Expert-parallel layout P x T.
struct Layout {
  int P = 1, T = 1;
};

// "a,b,,c" -> {"a", "b", "", "c"}: the items of a comma-separated option value.
inline std::vector<std::string> split_commas(const std::string& list) {
  std::vector<std::string> out;
  for (size_t pos = 0; pos <= list.size();) {
    const size_t comma = std::min(list.find(',', pos), list.size());
    out.push_back(list.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

// "4x1,2x2,1x4" -> layouts; errors name the bad item.
inline std::vector<Layout> parse_layouts(const std::string& v) {
  std::vector<Layout> out;
  for (const std::string& item : split_commas(v)) {
    const size_t x = item.find('x');
    MOETP_CHECK(x != std::string::npos && x > 0 && x + 1 < item.size(), "--layouts: '{}' is not PxT (e.g. 2x2)", item);
    out.push_back({std::stoi(item.substr(0, x)), std::stoi(item.substr(x + 1))});
  }
  return out;
}

// main() of a benchmark that may run under mpirun: MPI up, run(argc, argv), and on an error a line
// "[rank r] name: message" and, with several ranks, MPI_Abort (a rank that went on would wait in a
// collective for the failed one). Standard output is line-buffered, so that a run cut short by a
// time limit still shows every row it finished.
template <typename Run>
int mpi_main(const char* name, int argc, char** argv, Run run) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  comm::MpiRuntime mpi(&argc, &argv);
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    std::fprintf(stderr, "[rank %d] %s: %s\n", rank, name, e.what());
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}

// main() of a one-process benchmark: run(argc, argv), an error as one line "name: message";
// standard output line-buffered as in mpi_main.
template <typename Run>
int plain_main(const char* name, int argc, char** argv, Run run) {
  std::setvbuf(stdout, nullptr, _IOLBF, 0);
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", name, e.what());
    return 1;
  }
}

}  // namespace moetp::bench
