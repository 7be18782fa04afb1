#include "comm/mpi_comm.h"

#include "comm/agreement.h"

#include <algorithm>
#include <climits>
#include <functional>
#include <vector>

namespace moetp::comm {

namespace {

using detail::Agreement;

const detail::BackendTraits kMpi{Device::kCpu, "the MPI backend takes host (cpu) tensors", false, "MPI"};

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
    MOETP_MPI_CHECK(MPI_Type_contiguous(to_int(row_bytes, "row bytes"), MPI_BYTE, &type_));
    MOETP_MPI_CHECK(MPI_Type_commit(&type_));
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

// Deterministic f32 sums. MPI_Allreduce / MPI_Reduce_scatter with MPI_SUM pick their algorithm
// (and so the order of the additions) by message size and group size, so the same sum could round
// differently as an all-reduce, a reduce-scatter, or split into buckets. Every f32 sum of this
// backend is instead, element by element, ((x_0 + x_1) + x_2) + ... + x_{P-1} over the ranks'
// inputs in rank order: rank r receives every rank's copy of block r (MPI_Alltoallv) and adds them
// up itself. The bits of an element's sum then depend only on the P inputs of that element.
//
// Memory: the exchange runs in rounds of at most kReduceChunkElems / P elements per block, so the
// receive buffer holds at most kReduceChunkElems floats (8 MiB) whatever the message size.
constexpr int64_t kReduceChunkElems = int64_t{1} << 21;

// Block q of the result spans in[off_q, off_q + lens[q]) (off_q = lens[0] + ... + lens[q-1]); this
// rank writes its block rank's rank-order sum to out (lens[rank] floats). out may be this rank's
// block of `in` itself: a round's MPI_Alltoallv has sent its elements before their sums are
// written, and later rounds send only later elements.
// Collective; lens identical on every rank.
void ordered_sum_scatter(MPI_Comm comm, int rank, int size, const float* in, std::span<const int64_t> lens,
                         float* out) {
  const int64_t chunk = std::max<int64_t>(1, kReduceChunkElems / size);
  std::vector<int64_t> off(static_cast<size_t>(size), 0);
  for (int q = 1; q < size; ++q) off[q] = off[q - 1] + lens[q - 1];
  const int64_t longest = *std::max_element(lens.begin(), lens.end());
  const int64_t mine = lens[rank];
  std::vector<float> recv(static_cast<size_t>(std::min(mine, chunk) * size));
  std::vector<int> sc(size), sd(size), rc(size), rd(size);
  for (int64_t start = 0; start < longest; start += chunk) {
    for (int q = 0; q < size; ++q) {
      sc[q] = static_cast<int>(std::clamp<int64_t>(lens[q] - start, 0, chunk));
      sd[q] = to_int(off[q] + std::min(start, lens[q]), "reduce displacement");
    }
    const int n = static_cast<int>(std::clamp<int64_t>(mine - start, 0, chunk));
    for (int q = 0; q < size; ++q) {
      rc[q] = n;
      rd[q] = q * n;
    }
    MOETP_MPI_CHECK(MPI_Alltoallv(in, sc.data(), sd.data(), MPI_FLOAT, recv.data(), rc.data(), rd.data(), MPI_FLOAT,
                                  comm));
    if (n == 0) continue;
    float* o = out + start;
    std::copy(recv.data(), recv.data() + n, o);
    for (int q = 1; q < size; ++q) {
      const float* x = recv.data() + static_cast<int64_t>(q) * n;
      for (int i = 0; i < n; ++i) o[i] += x[i];
    }
  }
}

// lens of `n` elements split into `size` blocks as evenly as possible (the first n % size one longer).
std::vector<int64_t> even_blocks(int64_t n, int size) {
  std::vector<int64_t> lens(static_cast<size_t>(size), n / size);
  for (int64_t q = 0; q < n % size; ++q) ++lens[q];
  return lens;
}

}  // namespace

// ---- runtime ----

MpiRuntime::MpiRuntime(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  MOETP_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided));
  owns_ = true;
}

MpiRuntime::~MpiRuntime() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (owns_ && !finalized) MPI_Finalize();
}

// ---- communicator ----

MpiComm::MpiComm(MPI_Comm comm, std::string name) : name_(std::move(name)) {
  MOETP_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  MOETP_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MOETP_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOETP_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiComm::~MpiComm() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (comm_ != MPI_COMM_NULL && !finalized) MPI_Comm_free(&comm_);
}

std::unique_ptr<MpiComm> MpiComm::world() { return std::make_unique<MpiComm>(MPI_COMM_WORLD, "world"); }

void MpiComm::agree(const char* op, Agreement& a) { detail::agree(comm_, name_, op, a); }

void MpiComm::barrier() { MOETP_MPI_CHECK(MPI_Barrier(comm_)); }

void MpiComm::broadcast(Tensor& t, int root) {
  Agreement a = detail::broadcast_args(kMpi, size_, t, root);
  agree("broadcast", a);
  if (t.num_bytes() == 0) return;
  MOETP_MPI_CHECK(MPI_Bcast(t.raw_data(), to_int(static_cast<int64_t>(t.num_bytes()), "bytes"), MPI_BYTE, root, comm_));
}

void MpiComm::all_reduce(Tensor& t, ReduceOp op) {
  Agreement a = detail::all_reduce_args(kMpi, t, op);
  agree("all_reduce", a);
  if (t.numel() == 0) return;
  if (t.dtype() == DType::kF32 && op == ReduceOp::kSum) {
    if (size_ == 1) return;
    // Segments of at most kReduceChunkElems, a multiple of the group size (so each block fits one
    // exchange round): each a rank-order reduce-scatter in place, then an all-gather.
    float* data = t.data<float>();
    const int64_t segment = std::max<int64_t>(size_, kReduceChunkElems / size_ * size_);
    for (int64_t seg = 0; seg < t.numel(); seg += segment) {
      const int64_t n = std::min(segment, t.numel() - seg);
      const std::vector<int64_t> lens = even_blocks(n, size_);
      const std::vector<int> c = int_counts(lens);
      const std::vector<int> d = displacements(c);
      ordered_sum_scatter(comm_, rank_, size_, data + seg, lens, data + seg + d[rank_]);
      MOETP_MPI_CHECK(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data + seg, c.data(), d.data(), MPI_FLOAT,
                                     comm_));
    }
    return;
  }
  // Integer sums and maxima are exact in any order: MPI's own algorithm.
  MOETP_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, t.raw_data(), to_int(t.numel(), "elements"), mpi_type(t.dtype()),
                          op == ReduceOp::kSum ? MPI_SUM : MPI_MAX, comm_));
}

void MpiComm::all_gather(const Tensor& in, Tensor& out) {
  Agreement a = detail::all_gather_args(kMpi, size_, in, out);
  agree("all_gather", a);
  if (in.num_bytes() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const int n = to_int(in.rows(), "rows");
  MOETP_MPI_CHECK(MPI_Allgather(in.raw_data(), n, row.get(), out.raw_data(), n, row.get(), comm_));
}

void MpiComm::all_gather_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a = detail::all_gather_v_args(kMpi, rank_, size_, in, out, counts);
  agree("all_gather_v", a);
  if (in.row_numel() == 0 || out.rows() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const std::vector<int> c = int_counts(counts);
  const std::vector<int> d = displacements(c);
  MOETP_MPI_CHECK(MPI_Allgatherv(in.raw_data(), c[rank_], row.get(), out.raw_data(), c.data(), d.data(), row.get(),
                           comm_));
}

void MpiComm::reduce_scatter(const Tensor& in, Tensor& out) {
  Agreement a = detail::reduce_scatter_args(kMpi, size_, in, out);
  agree("reduce_scatter", a);
  if (out.numel() == 0) return;
  if (in.dtype() == DType::kF32) {
    const std::vector<int64_t> lens(static_cast<size_t>(size_), out.numel());
    ordered_sum_scatter(comm_, rank_, size_, in.data<float>(), lens, out.data<float>());
    return;
  }
  MOETP_MPI_CHECK(MPI_Reduce_scatter_block(in.raw_data(), out.raw_data(), to_int(out.numel(), "elements"),
                                     mpi_type(in.dtype()), MPI_SUM, comm_));
}

void MpiComm::reduce_scatter_v(const Tensor& in, Tensor& out, std::span<const int64_t> counts) {
  Agreement a = detail::reduce_scatter_v_args(kMpi, rank_, size_, in, out, counts);
  agree("reduce_scatter_v", a);
  if (in.row_numel() == 0 || in.rows() == 0) return;
  if (in.dtype() == DType::kF32) {
    std::vector<int64_t> lens(static_cast<size_t>(size_));
    for (int r = 0; r < size_; ++r) lens[r] = counts[r] * in.row_numel();
    ordered_sum_scatter(comm_, rank_, size_, in.data<float>(), lens, out.data<float>());
    return;
  }
  std::vector<int> elems(size_);
  for (int r = 0; r < size_; ++r) elems[r] = to_int(counts[r] * in.row_numel(), "elements");
  MOETP_MPI_CHECK(MPI_Reduce_scatter(in.raw_data(), out.raw_data(), elems.data(), mpi_type(in.dtype()), MPI_SUM, comm_));
}

void MpiComm::all_to_all_v(const Tensor& in, std::span<const int64_t> send_counts, Tensor& out,
                           std::span<const int64_t> recv_counts) {
  Agreement a = detail::all_to_all_v_args(kMpi, size_, in, send_counts, out, recv_counts);
  agree("all_to_all_v", a);
  if (in.row_numel() == 0) return;
  RowType row(in.row_numel() * static_cast<int64_t>(in.element_size()));
  const std::vector<int> sc = int_counts(send_counts);
  const std::vector<int> rc = int_counts(recv_counts);
  const std::vector<int> sd = displacements(sc);
  const std::vector<int> rd = displacements(rc);
  MOETP_MPI_CHECK(MPI_Alltoallv(in.raw_data(), sc.data(), sd.data(), row.get(), out.raw_data(), rc.data(), rd.data(),
                          row.get(), comm_));
}

std::unique_ptr<Comm> MpiComm::split(int color, int key, std::string name) {
  Agreement a = detail::split_args(color);
  agree("split", a);
  MPI_Comm sub = MPI_COMM_NULL;
  MOETP_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  auto result = std::make_unique<MpiComm>(sub, std::move(name));
  MPI_Comm_free(&sub);
  return result;
}

}  // namespace moetp::comm
