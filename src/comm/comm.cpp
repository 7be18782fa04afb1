#include "comm/comm.h"

#include <unistd.h>

#include <algorithm>
#include <bit>

namespace moetp::comm {

int64_t sum_counts(std::span<const int64_t> counts) {
  int64_t s = 0;
  for (int64_t c : counts) s += c;
  return s;
}

void Comm::set_compute_stream(CUstream_st* stream) {
  MOETP_CHECK(stream == nullptr, "group '{}' ({} backend) runs its collectives on the host: it has no compute stream",
              name(), device_name(device()));
}

NodeLocal node_local(Comm& group) {
  // Host names travel as fixed-width rows of i32 (one character each), compared whole.
  constexpr int64_t kWidth = 256;
  char name[kWidth] = {};
  Comm& host = group.host();
  // Agreed first, so a rank whose gethostname fails stops every rank instead of leaving them in
  // the all-gather below.
  host.raise_if_any(gethostname(name, kWidth - 1) == 0 ? "" : "gethostname failed", "node_local");
  std::vector<int32_t> mine(kWidth);
  for (int64_t i = 0; i < kWidth; ++i) mine[static_cast<size_t>(i)] = static_cast<unsigned char>(name[i]);
  Tensor out = Tensor::empty({host.size(), kWidth}, DType::kI32);
  host.all_gather(Tensor::from_vector<int32_t>(mine, {1, kWidth}), out);
  const std::vector<int32_t> all = out.to_vector<int32_t>();
  NodeLocal r{0, 0};
  for (int q = 0; q < host.size(); ++q) {
    if (!std::equal(mine.begin(), mine.end(), all.begin() + q * kWidth)) continue;
    if (q < host.rank()) ++r.rank;
    ++r.size;
  }
  return r;
}

int64_t Comm::all_reduce_scalar(int64_t v, ReduceOp op) {
  Tensor t = Tensor::from_vector<int64_t>({v}, {1}).to(device());
  all_reduce(t, op);
  return t.to_vector<int64_t>()[0];
}

double Comm::all_reduce_scalar(double v, ReduceOp op) {
  // Gather every rank's value and reduce in rank order: exact in double and identical on all ranks,
  // whatever reduction tree the backend would use.
  const std::vector<int64_t> bits = all_gather_scalar(std::bit_cast<int64_t>(v));
  double acc = std::bit_cast<double>(bits[0]);
  for (size_t r = 1; r < bits.size(); ++r) {
    const double x = std::bit_cast<double>(bits[r]);
    acc = op == ReduceOp::kSum ? acc + x : std::max(acc, x);
  }
  return acc;
}

std::vector<int64_t> Comm::all_gather_scalar(int64_t v) {
  Tensor in = Tensor::from_vector<int64_t>({v}, {1}).to(device());
  Tensor out = Tensor::empty({size()}, DType::kI64, device());
  all_gather(in, out);
  return out.to_vector<int64_t>();
}

std::vector<int64_t> Comm::exchange_counts(std::span<const int64_t> send_counts) {
  MOETP_CHECK(static_cast<int>(send_counts.size()) == size(),
              "exchange_counts on {}: {} counts for a group of {}", name(), send_counts.size(), size());
  Tensor in = Tensor::from_vector<int64_t>(std::vector<int64_t>(send_counts.begin(), send_counts.end()),
                                           {size()}).to(device());
  Tensor out = Tensor::empty({size()}, DType::kI64, device());
  const std::vector<int64_t> ones(size(), 1);
  all_to_all_v(in, ones, out, ones);
  return out.to_vector<int64_t>();
}

void Comm::raise_if_any(const std::string& local_error, const char* what) {
  const std::vector<int64_t> lens = all_gather_scalar(static_cast<int64_t>(local_error.size()));
  if (sum_counts(lens) == 0) return;
  std::vector<int32_t> chars(local_error.begin(), local_error.end());
  Tensor in = Tensor::from_vector<int32_t>(chars, {static_cast<int64_t>(chars.size())}).to(device());
  Tensor out = Tensor::empty({sum_counts(lens)}, DType::kI32, device());
  all_gather_v(in, out, lens);
  const std::vector<int32_t> all = out.to_vector<int32_t>();
  std::string msg = fmt::format("{} failed on group '{}'", what, name());
  int64_t off = 0;
  for (size_t r = 0; r < lens.size(); ++r) {
    if (lens[r] > 0) {
      std::string m(all.begin() + off, all.begin() + off + lens[r]);
      msg += fmt::format("; rank {}: {}", r, m);
    }
    off += lens[r];
  }
  MOETP_FAIL("{}", msg);
}

}  // namespace moetp::comm
