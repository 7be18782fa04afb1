#include "comm/agreement.h"

namespace moetp::comm::detail {

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<size_t>(len));
}

void agree(MPI_Comm comm, const std::string& group, const char* op, Agreement& a) {
  int size = 1;
  MOETP_MPI_CHECK(MPI_Comm_size(comm, &size));
  const size_t stride = a.num_words + 1;
  std::vector<int64_t> mine(stride, 0);
  mine[0] = a.local_error.empty() ? 1 : 0;
  for (size_t i = 0; i < a.num_words && i < a.words.size(); ++i) mine[i + 1] = a.words[i];
  std::vector<int64_t> table(stride * static_cast<size_t>(size));
  MOETP_MPI_CHECK(MPI_Allgather(mine.data(), static_cast<int>(stride), MPI_INT64_T, table.data(),
                                static_cast<int>(stride), MPI_INT64_T, comm));
  bool all_ok = true;
  for (int r = 0; r < size; ++r) all_ok = all_ok && table[r * stride] == 1;
  if (!all_ok) {
    // Share the failing ranks' messages so every rank throws the same, complete error.
    int len = static_cast<int>(a.local_error.size());
    std::vector<int> lens(size);
    MOETP_MPI_CHECK(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm));
    std::vector<int> displs(size, 0);
    for (int r = 1; r < size; ++r) displs[r] = displs[r - 1] + lens[r - 1];
    std::string all(static_cast<size_t>(displs.back() + lens.back()), '\0');
    MOETP_MPI_CHECK(MPI_Allgatherv(a.local_error.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(),
                                   MPI_CHAR, comm));
    std::string msg = fmt::format("{} on group '{}' (size {}): invalid arguments", op, group, size);
    for (int r = 0; r < size; ++r) {
      if (lens[r] > 0) msg += fmt::format("; rank {}: {}", r, all.substr(displs[r], lens[r]));
    }
    MOETP_FAIL("{}", msg);
  }
  std::vector<std::vector<int64_t>> words(size);
  for (int r = 0; r < size; ++r) words[r].assign(table.begin() + r * stride + 1, table.begin() + (r + 1) * stride);
  if (a.check) {
    const std::string err = a.check(words);
    MOETP_CHECK(err.empty(), "{} on group '{}' (size {}): {}", op, group, size, err);
  }
}

namespace {

std::string tensor_error(const BackendTraits& b, const Tensor& t, const char* name) {
  if (!t.defined()) return fmt::format("{} is undefined", name);
  if (t.device() != b.device) return fmt::format("{} is {}, but {}", name, t.describe(), b.takes);
  if (!t.is_contiguous()) return fmt::format("{} ({}) is not contiguous", name, t.describe());
  return "";
}

std::string same_kind_error(const Tensor& in, const Tensor& out) {
  if (in.dtype() != out.dtype()) {
    return fmt::format("input {} and output {} differ in dtype", in.describe(), out.describe());
  }
  if (in.row_numel() != out.row_numel()) {
    return fmt::format("input {} and output {} differ in row width ({} vs {} elements)", in.describe(),
                       out.describe(), in.row_numel(), out.row_numel());
  }
  return "";
}

std::string reducible_error(const BackendTraits& b, DType d, const char* op) {
  if (d == DType::kBF16 && !b.reduces_bf16) {
    return fmt::format("{} on bf16 is not supported by the {} backend (use f32)", op, b.backend);
  }
  return "";
}

std::string counts_error(std::span<const int64_t> counts, int size, const char* what) {
  if (static_cast<int>(counts.size()) != size) {
    return fmt::format("{} has {} entries for a group of {}", what, counts.size(), size);
  }
  for (size_t i = 0; i < counts.size(); ++i) {
    if (counts[i] < 0) return fmt::format("{}[{}] = {} is negative", what, i, counts[i]);
  }
  return "";
}

std::string first_of(std::initializer_list<std::string> errors) {
  for (const std::string& e : errors) {
    if (!e.empty()) return e;
  }
  return "";
}

// Checks that words[r][0..n) are equal on every rank; names the first disagreement.
std::string all_equal(const std::vector<std::vector<int64_t>>& words, size_t n,
                      const std::vector<std::string>& labels) {
  for (size_t r = 1; r < words.size(); ++r) {
    for (size_t i = 0; i < n; ++i) {
      if (words[r][i] != words[0][i]) {
        const std::string label = i < labels.size() ? labels[i] : fmt::format("count[{}]", i - labels.size());
        return fmt::format("ranks disagree on {}: rank 0 has {}, rank {} has {}", label, words[0][i], r,
                           words[r][i]);
      }
    }
  }
  return "";
}

const std::vector<std::string> kKindLabels = {"dtype", "row width"};

// The shared part of the v-collectives: tensors valid, same kind, counts valid.
std::string pair_error(const BackendTraits& b, const Tensor& in, const Tensor& out) {
  std::string e = first_of({tensor_error(b, in, "input"), tensor_error(b, out, "output")});
  return e.empty() ? same_kind_error(in, out) : e;
}

// dtype, row width and the counts must be equal on every rank.
Agreement kind_and_counts(const std::string& local_error, const Tensor& in, std::span<const int64_t> counts,
                          int size) {
  Agreement a;
  a.local_error = local_error;
  a.num_words = 2 + static_cast<size_t>(size);
  const size_t n = a.num_words;
  a.check = [n](const auto& w) { return all_equal(w, n, kKindLabels); };
  if (local_error.empty()) {
    a.words = {static_cast<int64_t>(in.dtype()), in.row_numel()};
    a.words.insert(a.words.end(), counts.begin(), counts.end());
  }
  return a;
}

}  // namespace

Agreement broadcast_args(const BackendTraits& b, int size, const Tensor& t, int root) {
  Agreement a;
  a.local_error = first_of({tensor_error(b, t, "tensor"),
                            (root < 0 || root >= size) ? fmt::format("root {} out of range", root) : ""});
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(t.dtype()), t.numel(), root};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "element count", "root"}); };
  return a;
}

Agreement all_reduce_args(const BackendTraits& b, const Tensor& t, ReduceOp op) {
  Agreement a;
  a.local_error = tensor_error(b, t, "tensor");
  if (a.local_error.empty()) a.local_error = reducible_error(b, t.dtype(), "all_reduce");
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(t.dtype()), t.numel(), static_cast<int64_t>(op)};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "element count", "reduce op"}); };
  return a;
}

Agreement all_gather_args(const BackendTraits& b, int size, const Tensor& in, const Tensor& out) {
  Agreement a;
  a.local_error = pair_error(b, in, out);
  if (a.local_error.empty() && out.rows() != in.rows() * size) {
    a.local_error = fmt::format("output has {} rows, expected {} ranks x {} input rows = {}", out.rows(), size,
                                in.rows(), in.rows() * size);
  }
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(in.dtype()), in.row_numel(), in.rows()};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "row width", "input rows"}); };
  return a;
}

Agreement all_gather_v_args(const BackendTraits& b, int rank, int size, const Tensor& in, const Tensor& out,
                            std::span<const int64_t> counts) {
  std::string err = first_of({pair_error(b, in, out), counts_error(counts, size, "counts")});
  if (err.empty() && counts[rank] != in.rows()) {
    err = fmt::format("counts[{}] = {} but the input has {} rows", rank, counts[rank], in.rows());
  }
  if (err.empty() && out.rows() != sum_counts(counts)) {
    err = fmt::format("output has {} rows, counts sum to {}", out.rows(), sum_counts(counts));
  }
  return kind_and_counts(err, in, counts, size);
}

Agreement reduce_scatter_args(const BackendTraits& b, int size, const Tensor& in, const Tensor& out) {
  Agreement a;
  a.local_error = pair_error(b, in, out);
  if (a.local_error.empty()) a.local_error = reducible_error(b, in.dtype(), "reduce_scatter");
  if (a.local_error.empty() && in.rows() != out.rows() * size) {
    a.local_error = fmt::format("input has {} rows, expected {} ranks x {} output rows = {}", in.rows(), size,
                                out.rows(), out.rows() * size);
  }
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(in.dtype()), in.row_numel(), out.rows()};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "row width", "output rows"}); };
  return a;
}

Agreement reduce_scatter_v_args(const BackendTraits& b, int rank, int size, const Tensor& in, const Tensor& out,
                                std::span<const int64_t> counts) {
  std::string err = first_of({pair_error(b, in, out), counts_error(counts, size, "counts")});
  if (err.empty()) err = reducible_error(b, in.dtype(), "reduce_scatter_v");
  if (err.empty() && in.rows() != sum_counts(counts)) {
    err = fmt::format("input has {} rows, counts sum to {}", in.rows(), sum_counts(counts));
  }
  if (err.empty() && out.rows() != counts[rank]) {
    err = fmt::format("output has {} rows but counts[{}] = {}", out.rows(), rank, counts[rank]);
  }
  return kind_and_counts(err, in, counts, size);
}

Agreement all_to_all_v_args(const BackendTraits& b, int size, const Tensor& in, std::span<const int64_t> send_counts,
                            const Tensor& out, std::span<const int64_t> recv_counts) {
  Agreement a;
  a.local_error = first_of({pair_error(b, in, out), counts_error(send_counts, size, "send_counts"),
                            counts_error(recv_counts, size, "recv_counts")});
  if (a.local_error.empty() && in.rows() != sum_counts(send_counts)) {
    a.local_error = fmt::format("input has {} rows, send_counts sum to {}", in.rows(), sum_counts(send_counts));
  }
  if (a.local_error.empty() && out.rows() != sum_counts(recv_counts)) {
    a.local_error = fmt::format("output has {} rows, recv_counts sum to {}", out.rows(), sum_counts(recv_counts));
  }
  const size_t w = static_cast<size_t>(size);
  a.num_words = 2 + 2 * w;
  if (a.local_error.empty()) {
    a.words = {static_cast<int64_t>(in.dtype()), in.row_numel()};
    a.words.insert(a.words.end(), send_counts.begin(), send_counts.end());
    a.words.insert(a.words.end(), recv_counts.begin(), recv_counts.end());
  }
  a.check = [w](const std::vector<std::vector<int64_t>>& words) {
    std::string e = all_equal(words, 2, kKindLabels);
    if (!e.empty()) return e;
    for (size_t src = 0; src < w; ++src) {
      for (size_t dst = 0; dst < w; ++dst) {
        const int64_t sent = words[src][2 + dst];
        const int64_t expected = words[dst][2 + w + src];
        if (sent != expected) {
          return fmt::format("rank {} sends {} rows to rank {}, which expects {} (send_counts[{}] vs recv_counts[{}])",
                             src, sent, dst, expected, dst, src);
        }
      }
    }
    return std::string();
  };
  return a;
}

Agreement split_args(int color) {
  Agreement a;
  if (color < 0) a.local_error = fmt::format("color {} is negative", color);
  return a;
}

}  // namespace moetp::comm::detail
