#include "model/batch.h"

#include "kernels/cpu/attention.h"

namespace moetp::model {

bool Batch::one_document_per_row() const { return cpu::documents_are_rows(doc_offsets, rows, seq_len); }

void Batch::validate() const {
  const int64_t N = num_tokens();
  MOETP_CHECK(rows >= 0 && seq_len >= 1, "batch: {} rows of {} tokens", rows, seq_len);
  for (const auto& [t, name] : {std::pair<const Tensor*, const char*>{&inputs, "inputs"},
                                {&targets, "targets"},
                                {&positions, "positions"}}) {
    MOETP_CHECK(t->defined(), "batch: {} is missing", name);
    check_dtype(*t, DType::kI32, name);
    check_device(*t, Device::kCpu, name);
    check_contiguous(*t, name);
    check_shape(*t, {N}, name);
  }
  cpu::check_document_offsets(doc_offsets, N, "batch");
}

Batch Batch::from_rows(const Tensor& tokens_BS1, const Tensor& loss_mask_BS) {
  check_dtype(tokens_BS1, DType::kI32, "tokens");
  check_device(tokens_BS1, Device::kCpu, "tokens");
  MOETP_CHECK(tokens_BS1.ndim() == 2 && tokens_BS1.size(1) >= 2, "tokens must be (B, S + 1) with S >= 1, got {}",
              tokens_BS1.describe());
  Batch b;
  b.rows = tokens_BS1.size(0);
  b.seq_len = tokens_BS1.size(1) - 1;
  const int64_t B = b.rows, S = b.seq_len, N = B * S;
  b.inputs = tokens_BS1.slice(1, 0, S).contiguous().view({N});
  b.targets = tokens_BS1.slice(1, 1, S + 1).contiguous().view({N});
  if (loss_mask_BS.defined()) {
    check_dtype(loss_mask_BS, DType::kI32, "loss mask");
    check_device(loss_mask_BS, Device::kCpu, "loss mask");
    check_shape(loss_mask_BS, {B, S}, "loss mask");
    const Tensor mask = loss_mask_BS.contiguous();
    b.targets = b.targets.clone();
    int32_t* t = b.targets.data<int32_t>();
    const int32_t* m = mask.data<int32_t>();
    for (int64_t i = 0; i < N; ++i) {
      if (m[i] == 0) t[i] = kIgnoreIndex;
    }
  }
  b.positions = Tensor::empty({N}, DType::kI32);
  int32_t* pos = b.positions.data<int32_t>();
  for (int64_t i = 0; i < N; ++i) pos[i] = static_cast<int32_t>(i % S);
  b.doc_offsets.resize(static_cast<size_t>(B + 1));
  for (int64_t d = 0; d <= B; ++d) b.doc_offsets[static_cast<size_t>(d)] = d * S;
  return b;
}

}  // namespace moetp::model
