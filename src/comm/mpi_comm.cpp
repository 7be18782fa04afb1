#include "comm/mpi_comm.h"

#include <climits>
#include <functional>

namespace moetp::comm {

namespace {

std::string mpi_error_string(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(code, buf, &len);
  return std::string(buf, static_cast<size_t>(len));
}

#define MPI_CHECK(call) MOETP_STATUS_CHECK(call, MPI_SUCCESS, mpi_error_string)

MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kBF16: return MPI_UINT16_T;
  }
  return MPI_DATATYPE_NULL;
}

int to_int(int64_t v, const char* what) {
  MOETP_CHECK(v >= 0 && v <= INT_MAX, "{} = {} does not fit MPI's int counts", what, v);
  return static_cast<int>(v);
}

// A contiguous MPI datatype for one row of `row_bytes` bytes; freed on scope exit.
class RowType {
 public:
  explicit RowType(int64_t row_bytes) {
    MPI_CHECK(MPI_Type_contiguous(to_int(row_bytes, "row bytes"), MPI_BYTE, &type_));
    MPI_CHECK(MPI_Type_commit(&type_));
  }
  ~RowType() { MPI_Type_free(&type_); }
  RowType(const RowType&) = delete;
  RowType& operator=(const RowType&) = delete;
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

std::vector<int> displacements(const std::vector<int>& counts) {
  std::vector<int> d(counts.size(), 0);
  int64_t acc = 0;
  for (size_t i = 0; i < counts.size(); ++i) {
    d[i] = to_int(acc, "displacement");
    acc += counts[i];
  }
  return d;
}

std::vector<int> int_counts(std::span<const int64_t> counts) {
  std::vector<int> c(counts.size());
  for (size_t i = 0; i < counts.size(); ++i) c[i] = to_int(counts[i], "count");
  return c;
}

// Local checks shared by every data-carrying call; returns "" when fine.
std::string local_tensor_error(const Tensor& t, const char* name) {
  if (!t.defined()) return fmt::format("{} is undefined", name);
  if (t.device() != Device::kCpu) {
    return fmt::format("{} is {}, but the MPI backend takes host (cpu) tensors", name, t.describe());
  }
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

std::string reducible_error(DType d, const char* op) {
  if (d == DType::kBF16) return fmt::format("{} on bf16 is not supported by the MPI backend (use f32)", op);
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

}  // namespace

// ---- runtime ----

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  owns_ = true;
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

// ---- communicator ----

MpiComm::MpiComm(MPI_Comm comm, std::string name) : name_(std::move(name)) {
  MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiComm> MpiComm::world() { return std::make_unique<MpiComm>(MPI_COMM_WORLD, "world"); }

struct MpiComm::Agreement {
  std::string local_error;     // non-empty when this rank's own arguments are invalid
  std::vector<int64_t> words;  // padded/truncated to num_words; same layout on every rank
  size_t num_words = 0;
  // Given words[r] of every rank r, returns "" when consistent or a message naming the values.
  std::function<std::string(const std::vector<std::vector<int64_t>>&)> check;
};

void MpiComm::agree(const char* op, Agreement& a) {
  const size_t stride = a.num_words + 1;
  std::vector<int64_t> mine(stride, 0);
  mine[0] = a.local_error.empty() ? 1 : 0;
  for (size_t i = 0; i < a.num_words && i < a.words.size(); ++i) mine[i + 1] = a.words[i];
  std::vector<int64_t> table(stride * static_cast<size_t>(size_));
  MPI_CHECK(MPI_Allgather(mine.data(), to_int(static_cast<int64_t>(stride), "agreement words"), MPI_INT64_T,
                          table.data(), static_cast<int>(stride), MPI_INT64_T, comm_));

  bool all_ok = true;
  for (int r = 0; r < size_; ++r) all_ok = all_ok && table[r * stride] == 1;
  if (!all_ok) {
    // Share the failing ranks' messages so every rank throws the same, complete error.
    int len = static_cast<int>(a.local_error.size());
    std::vector<int> lens(size_);
    MPI_CHECK(MPI_Allgather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, comm_));
    std::vector<int> displs = displacements(lens);
    std::string all(static_cast<size_t>(displs.back() + lens.back()), '\0');
    MPI_CHECK(MPI_Allgatherv(a.local_error.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(),
                             MPI_CHAR, comm_));
    std::string msg = fmt::format("{} on group '{}' (size {}): invalid arguments", op, name_, size_);
    for (int r = 0; r < size_; ++r) {
      if (lens[r] > 0) msg += fmt::format("; rank {}: {}", r, all.substr(displs[r], lens[r]));
    }
    MOETP_FAIL("{}", msg);
  }
  std::vector<std::vector<int64_t>> words(size_);
  for (int r = 0; r < size_; ++r) {
    words[r].assign(table.begin() + r * stride + 1, table.begin() + (r + 1) * stride);
  }
  if (a.check) {
    const std::string err = a.check(words);
    MOETP_CHECK(err.empty(), "{} on group '{}' (size {}): {}", op, name_, size_, err);
  }
}

namespace {
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
}  // namespace

void MpiComm::barrier() { MPI_CHECK(MPI_Barrier(comm_)); }

void MpiComm::broadcast(Tensor& t, int root) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(t, "tensor"),
                            (root < 0 || root >= size_) ? fmt::format("root {} out of range", root) : ""});
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(t.dtype()), t.numel(), root};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "element count", "root"}); };
  agree("broadcast", a);
  if (t.num_bytes() == 0) return;
  MPI_CHECK(MPI_Bcast(t.raw_data(), to_int(static_cast<int64_t>(t.num_bytes()), "bytes"), MPI_BYTE, root, comm_));
}

void MpiComm::all_reduce(Tensor& t, ReduceOp op) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(t, "tensor"), t.defined() ? reducible_error(t.dtype(), "all_reduce") : ""});
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(t.dtype()), t.numel(), static_cast<int64_t>(op)};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "element count", "reduce op"}); };
  agree("all_reduce", a);
  if (t.numel() == 0) return;
  MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.raw_data(), to_int(t.numel(), "elements"), mpi_type(t.dtype()),
                          op == ReduceOp::kSum ? MPI_SUM : MPI_MAX, comm_));
}

void MpiComm::all_gather(const Tensor& in, Tensor& out) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(in, "input"), local_tensor_error(out, "output")});
  if (a.local_error.empty()) a.local_error = same_kind_error(in, out);
  if (a.local_error.empty() && out.rows() != in.rows() * size_) {
    a.local_error = fmt::format("output has {} rows, expected {} ranks x {} input rows = {}", out.rows(), size_,
                                in.rows(), in.rows() * size_);
  }
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(in.dtype()), in.row_numel(), in.rows()};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "row width", "input rows"}); };
  agree("all_gather", a);
  if (in.num_bytes() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const int n = to_int(in.rows(), "rows");
  MPI_CHECK(MPI_Allgather(in.raw_data(), n, row.get(), out.raw_data(), n, row.get(), comm_));
}

void MpiComm::all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(in, "input"), local_tensor_error(out, "output"),
                            counts_error(counts, size_, "counts")});
  if (a.local_error.empty()) a.local_error = same_kind_error(in, out);
  if (a.local_error.empty() && counts[rank_] != in.rows()) {
    a.local_error = fmt::format("counts[{}] = {} but the input has {} rows", rank_, counts[rank_], in.rows());
  }
  if (a.local_error.empty() && out.rows() != sum_counts(counts)) {
    a.local_error = fmt::format("output has {} rows, counts sum to {}", out.rows(), sum_counts(counts));
  }
  a.num_words = 2 + static_cast<size_t>(size_);
  if (a.local_error.empty()) {
    a.words = {static_cast<int64_t>(in.dtype()), in.row_numel()};
    a.words.insert(a.words.end(), counts.begin(), counts.end());
  }
  const size_t n = a.num_words;
  a.check = [n](const auto& w) { return all_equal(w, n, kKindLabels); };
  agree("all_gather_v", a);
  if (in.row_numel() == 0 || out.rows() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const std::vector<int> c = int_counts(counts);
  const std::vector<int> d = displacements(c);
  MPI_CHECK(MPI_Allgatherv(in.raw_data(), c[rank_], row.get(), out.raw_data(), c.data(), d.data(), row.get(),
                           comm_));
}

void MpiComm::reduce_scatter(const Tensor& in, Tensor& out) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(in, "input"), local_tensor_error(out, "output")});
  if (a.local_error.empty()) a.local_error = first_of({same_kind_error(in, out), reducible_error(in.dtype(), "reduce_scatter")});
  if (a.local_error.empty() && in.rows() != out.rows() * size_) {
    a.local_error = fmt::format("input has {} rows, expected {} ranks x {} output rows = {}", in.rows(), size_,
                                out.rows(), out.rows() * size_);
  }
  a.num_words = 3;
  if (a.local_error.empty()) a.words = {static_cast<int64_t>(in.dtype()), in.row_numel(), out.rows()};
  a.check = [](const auto& w) { return all_equal(w, 3, {"dtype", "row width", "output rows"}); };
  agree("reduce_scatter", a);
  if (out.numel() == 0) return;
  MPI_CHECK(MPI_Reduce_scatter_block(in.raw_data(), out.raw_data(), to_int(out.numel(), "elements"),
                                     mpi_type(in.dtype()), MPI_SUM, comm_));
}

void MpiComm::reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(in, "input"), local_tensor_error(out, "output"),
                            counts_error(counts, size_, "counts")});
  if (a.local_error.empty()) a.local_error = first_of({same_kind_error(in, out), reducible_error(in.dtype(), "reduce_scatter_v")});
  if (a.local_error.empty() && in.rows() != sum_counts(counts)) {
    a.local_error = fmt::format("input has {} rows, counts sum to {}", in.rows(), sum_counts(counts));
  }
  if (a.local_error.empty() && out.rows() != counts[rank_]) {
    a.local_error = fmt::format("output has {} rows but counts[{}] = {}", out.rows(), rank_, counts[rank_]);
  }
  a.num_words = 2 + static_cast<size_t>(size_);
  if (a.local_error.empty()) {
    a.words = {static_cast<int64_t>(in.dtype()), in.row_numel()};
    a.words.insert(a.words.end(), counts.begin(), counts.end());
  }
  const size_t n = a.num_words;
  a.check = [n](const auto& w) { return all_equal(w, n, kKindLabels); };
  agree("reduce_scatter_v", a);
  if (in.row_numel() == 0 || in.rows() == 0) return;
  std::vector<int> elems(size_);
  for (int r = 0; r < size_; ++r) elems[r] = to_int(counts[r] * in.row_numel(), "elements");
  MPI_CHECK(MPI_Reduce_scatter(in.raw_data(), out.raw_data(), elems.data(), mpi_type(in.dtype()), MPI_SUM, comm_));
}

void MpiComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                           std::span<const int64_t> recv_counts) {
  Agreement a;
  a.local_error = first_of({local_tensor_error(in, "input"), local_tensor_error(out, "output"),
                            counts_error(send_counts, size_, "send_counts"),
                            counts_error(recv_counts, size_, "recv_counts")});
  if (a.local_error.empty()) a.local_error = same_kind_error(in, out);
  if (a.local_error.empty() && in.rows() != sum_counts(send_counts)) {
    a.local_error = fmt::format("input has {} rows, send_counts sum to {}", in.rows(), sum_counts(send_counts));
  }
  if (a.local_error.empty() && out.rows() != sum_counts(recv_counts)) {
    a.local_error = fmt::format("output has {} rows, recv_counts sum to {}", out.rows(), sum_counts(recv_counts));
  }
  const size_t w = static_cast<size_t>(size_);
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
  agree("all_to_all_v", a);
  if (in.row_numel() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const std::vector<int> sc = int_counts(send_counts);
  const std::vector<int> rc = int_counts(recv_counts);
  const std::vector<int> sd = displacements(sc);
  const std::vector<int> rd = displacements(rc);
  MPI_CHECK(MPI_Alltoallv(in.raw_data(), sc.data(), sd.data(), row.get(), out.raw_data(), rc.data(), rd.data(),
                          row.get(), comm_));
}

std::unique_ptr<Comm> MpiComm::split(int color, int key, std::string name) {
  Agreement a;
  if (color < 0) a.local_error = fmt::format("color {} is negative", color);
  a.num_words = 0;
  agree("split", a);
  MPI_Comm sub = MPI_COMM_NULL;
  MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  auto result = std::make_unique<MpiComm>(sub, std::move(name));
  MPI_Comm_free(&sub);
  return result;
}

}  // namespace moetp::comm
