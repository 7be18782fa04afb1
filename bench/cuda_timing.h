// How the GPU benchmarks time (bench/torch_timing.py does the same for the PyTorch baselines):
//   1. warm-up: `warmup` iterations, untimed, then a device synchronisation;
//   2. `iters` iterations back to back on one stream with no host synchronisation between them:
//      a CUDA event before the first and one after the last; ms = elapsed / iters (the mean). A
//      step may mark phase boundaries (forward | backward): each mark records one more event, and
//      the phase times are the means over the iterations of the time between consecutive marks;
//   3. inputs rotated: iteration i uses input set i % sets, sets = rotation_sets(bytes of one set)
//      = max(2, ceil(4 · L2 / bytes)), so that no iteration reads its inputs from a warm L2.
// What a step synchronises itself (a dispatcher copying its row counts to the host) stays in it:
// that is the algorithm being measured, not the timing.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "core/check.h"
#include "kernels/cuda/cuda_check.h"

namespace moetp::bench {

constexpr double kL2Factor = 4.0;
constexpr size_t kL2FallbackBytes = size_t{50} << 20;  // H100 / H200

// The current device's L2 cache size.
inline size_t l2_bytes() {
  int dev = 0, bytes = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrL2CacheSize, dev));
  return bytes > 0 ? static_cast<size_t>(bytes) : kL2FallbackBytes;
}

// Input sets to cycle through: enough that kL2Factor x the L2 is read between two reads of one set,
// and at least 2 (the same bytes are never read by two consecutive iterations).
inline int rotation_sets(size_t bytes_per_set) {
  const double n = std::ceil(kL2Factor * static_cast<double>(l2_bytes()) /
                             static_cast<double>(std::max<size_t>(1, bytes_per_set)));
  return std::max(2, static_cast<int>(n));
}

// The banner text of a table: how its numbers were taken.
inline std::string timing_method(int iters, int warmup) {
  return "mean of " + std::to_string(iters) + " back-to-back iterations between two CUDA events after " +
         std::to_string(warmup) + " warm-up; inputs rotated over max(2, ceil(4 x L2 / bytes per set)) sets";
}

// The banner text of a training-step table (steps reuse their tokens: train_step_cuda_bench.cpp says why).
inline std::string step_timing_method(int steps, int warmup) {
  return "mean of " + std::to_string(steps) + " back-to-back steps between two CUDA events after " +
         std::to_string(warmup) + " warm-up";
}

struct Timing {
  double ms = 0;              // mean per iteration
  std::vector<double> parts;  // mean ms of each phase (marks + 1 of them)
};

using Mark = std::function<void()>;
using Step = std::function<void(int iteration, const Mark& mark)>;

// Times step(i, mark) as the header says; step uses input set i % sets and calls mark() exactly
// `marks` times per iteration, at its phase boundaries. Events go to `stream`.
inline Timing time_loop(cudaStream_t stream, int iters, int warmup, int marks, const Step& step) {
  MOETP_CHECK(iters >= 1 && warmup >= 0 && marks >= 0, "time_loop: bad iters {} / warmup {} / marks {}", iters,
              warmup, marks);
  const Mark no_mark = [] {};
  for (int i = 0; i < warmup; ++i) step(i, no_mark);
  CUDA_CHECK(cudaDeviceSynchronize());
  const size_t per = static_cast<size_t>(marks) + 1;  // events per iteration: its start and its marks
  std::vector<cudaEvent_t> ev(static_cast<size_t>(iters) * per + 1);
  for (cudaEvent_t& e : ev) CUDA_CHECK(cudaEventCreate(&e));
  size_t k = 0;
  const Mark mark = [&] {
    MOETP_CHECK(k < ev.size(), "time_loop: step marked more than {} times", marks);
    CUDA_CHECK(cudaEventRecord(ev[k++], stream));
  };
  for (int i = 0; i < iters; ++i) {
    mark();  // start of iteration i = end of iteration i - 1
    step(warmup + i, mark);
    MOETP_CHECK(k == (static_cast<size_t>(i) + 1) * per, "time_loop: step marked {} times, expected {}",
                k - static_cast<size_t>(i) * per - 1, marks);
  }
  mark();
  CUDA_CHECK(cudaEventSynchronize(ev.back()));
  auto ms = [&](size_t a, size_t b) {
    float v = 0;
    CUDA_CHECK(cudaEventElapsedTime(&v, ev[a], ev[b]));
    return static_cast<double>(v);
  };
  Timing t;
  t.ms = ms(0, ev.size() - 1) / iters;
  t.parts.assign(per, 0.0);
  for (size_t i = 0; i < static_cast<size_t>(iters); ++i) {
    for (size_t p = 0; p < per; ++p) t.parts[p] += ms(i * per + p, i * per + p + 1) / iters;
  }
  for (cudaEvent_t& e : ev) CUDA_CHECK(cudaEventDestroy(e));
  return t;
}

}  // namespace moetp::bench
