// Host side of the CUDA attention (see attention.h): argument checks that quote the shapes, output
// allocation, and the launches of attention.cu's kernels.
#include "kernels/cuda/attention.h"

#include <cmath>
#include <cstdint>
#include <limits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.h"

namespace moetp::cuda {

namespace {

struct Dims {
  int64_t B = 0, S = 0, Q = 0, G = 0, D = 0;
};

// Largest grid y/z dimension: Q (forward), G (backward) and B go there.
constexpr int64_t kMaxGridYZ = 65535;

void check_cuda_tensor(const Tensor& t, DType dtype, int64_t ndim, const char* name) {
  MOETP_CHECK(t.defined(), "{}: tensor is undefined", name);
  MOETP_CHECK(t.ndim() == ndim, "{}: expected {} dimensions, got {}", name, ndim, t.describe());
  check_dtype(t, dtype, name);
  check_device(t, Device::kCuda, name);
  check_contiguous(t, name);
  // The kernels move 16 bytes at a time.
  MOETP_CHECK(reinterpret_cast<uintptr_t>(t.raw_data()) % 16 == 0, "{}: data of {} is not 16-byte aligned", name,
              t.describe());
}

// Same rules and wording as cpu::check_attention_shapes, plus the CUDA kernel's limits on D and sizes.
Dims check_inputs(const char* op, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD) {
  check_cuda_tensor(q_BSQD, DType::kBF16, 4, "attention q_BSQD");
  check_cuda_tensor(k_BSGD, DType::kBF16, 4, "attention k_BSGD");
  check_cuda_tensor(v_BSGD, DType::kBF16, 4, "attention v_BSGD");
  Dims d;
  d.B = q_BSQD.size(0);
  d.S = q_BSQD.size(1);
  d.Q = q_BSQD.size(2);
  d.D = q_BSQD.size(3);
  MOETP_CHECK(k_BSGD.size(0) == d.B && k_BSGD.size(1) == d.S && k_BSGD.size(3) == d.D,
              "{}: k_BSGD must be (B, S, G, D) = ({}, {}, G, {}) (from q_BSQD {}), got {}", op, d.B, d.S, d.D,
              q_BSQD.describe(), k_BSGD.describe());
  d.G = k_BSGD.size(2);
  MOETP_CHECK(v_BSGD.shape() == k_BSGD.shape(), "{}: v_BSGD {} must match k_BSGD {}", op, v_BSGD.describe(),
              k_BSGD.describe());
  MOETP_CHECK(d.G >= 1 && d.Q % d.G == 0,
              "{}: num_q_heads Q ({}) must be a multiple of num_kv_heads G ({}) (q_BSQD {}, k_BSGD {})", op, d.Q, d.G,
              q_BSQD.describe(), k_BSGD.describe());
  MOETP_CHECK(d.D >= 8 && d.D <= 128 && d.D % 8 == 0,
              "{}: head_dim D = {} is not supported by the CUDA kernel (needs a multiple of 8 in [8, 128]; q_BSQD {})",
              op, d.D, q_BSQD.describe());
  MOETP_CHECK(d.S <= std::numeric_limits<int32_t>::max() / 2, "{}: sequence length S = {} is too long (q_BSQD {})",
              op, d.S, q_BSQD.describe());
  MOETP_CHECK(d.B <= kMaxGridYZ && d.Q <= kMaxGridYZ,
              "{}: B ({}) and Q ({}) must be at most {} (grid limits; q_BSQD {})", op, d.B, d.Q, kMaxGridYZ,
              q_BSQD.describe());
  return d;
}

float softmax_scale(int64_t D) { return static_cast<float>(1.0 / std::sqrt(static_cast<double>(D))); }

const uint16_t* bits(const Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data<bf16>()); }
uint16_t* bits(Tensor& t) { return reinterpret_cast<uint16_t*>(t.data<bf16>()); }

// A bf16 gradient: allocated when undefined, else checked.
void prepare_grad(Tensor& t, const Shape& shape, const char* name) {
  if (!t.defined()) t = Tensor::empty(shape, DType::kBF16, Device::kCuda);
  check_cuda_tensor(t, DType::kBF16, 4, name);
  check_shape(t, shape, name);
}

// Packed documents (device i64 offsets) as the kernels take them; undefined: one per row.
launch::AttentionDocs kernel_docs(const char* op, const Tensor& docs, const Dims& d) {
  if (!docs.defined()) return {};
  check_dtype(docs, DType::kI64, "attention docs");
  check_device(docs, Device::kCuda, "attention docs");
  check_contiguous(docs, "attention docs");
  MOETP_CHECK(docs.ndim() == 1 && docs.size(0) >= 2 && docs.size(0) - 1 <= d.B * d.S,
              "{}: docs must be (documents + 1) offsets with 1 <= documents <= B·S = {}, got {}", op, d.B * d.S,
              docs.describe());
  MOETP_CHECK(launch::attention_uses_tensor_cores(d.D),
              "{}: packed documents need the tensor-core kernels (head_dim 64 or 128), head_dim is {}", op, d.D);
  MOETP_CHECK(d.B * d.S <= std::numeric_limits<int32_t>::max() / 2,
              "{}: {} tokens in one packed micro-batch is too many (B {} x S {})", op, d.B * d.S, d.B, d.S);
  return {docs.data<int64_t>(), docs.size(0) - 1};
}

}  // namespace

Tensor attention_forward(const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD, Tensor* lse_BQS,
                         cudaStream_t stream, const Tensor& docs) {
  const Dims d = check_inputs("cuda::attention_forward", q_BSQD, k_BSGD, v_BSGD);
  const launch::AttentionDocs kd = kernel_docs("cuda::attention_forward", docs, d);
  Tensor out_BSQD = Tensor::empty(q_BSQD.shape(), DType::kBF16, Device::kCuda);
  Tensor lse = Tensor::empty({d.B, d.Q, d.S}, DType::kF32, Device::kCuda);
  CUDA_CHECK(launch::attention_forward(bits(q_BSQD), bits(k_BSGD), bits(v_BSGD), bits(out_BSQD), lse.data<float>(),
                                       d.B, d.S, d.Q, d.G, d.D, softmax_scale(d.D), stream,
                                       launch::AttentionKernel::kAuto, kd));
  if (lse_BQS != nullptr) *lse_BQS = std::move(lse);
  return out_BSQD;
}

void attention_backward(const Tensor& dout_BSQD, const Tensor& q_BSQD, const Tensor& k_BSGD, const Tensor& v_BSGD,
                        const Tensor& out_BSQD, const Tensor& lse_BQS, Tensor& dq_BSQD, Tensor& dk_BSGD,
                        Tensor& dv_BSGD, cudaStream_t stream, bool deterministic, const Tensor& docs) {
  const char* op = "cuda::attention_backward";
  const Dims d = check_inputs(op, q_BSQD, k_BSGD, v_BSGD);
  const launch::AttentionDocs kd = kernel_docs(op, docs, d);
  check_cuda_tensor(dout_BSQD, DType::kBF16, 4, "attention dout_BSQD");
  check_shape(dout_BSQD, q_BSQD.shape(), "attention dout_BSQD");
  check_cuda_tensor(out_BSQD, DType::kBF16, 4, "attention out_BSQD (from attention_forward)");
  check_shape(out_BSQD, q_BSQD.shape(), "attention out_BSQD");
  check_cuda_tensor(lse_BQS, DType::kF32, 3, "attention lse_BQS (from attention_forward)");
  check_shape(lse_BQS, {d.B, d.Q, d.S}, "attention lse_BQS");
  MOETP_CHECK(d.G <= kMaxGridYZ, "{}: G ({}) must be at most {} (grid limit)", op, d.G, kMaxGridYZ);
  prepare_grad(dq_BSQD, q_BSQD.shape(), "attention dq_BSQD");
  prepare_grad(dk_BSGD, k_BSGD.shape(), "attention dk_BSGD");
  prepare_grad(dv_BSGD, v_BSGD.shape(), "attention dv_BSGD");
  if (q_BSQD.numel() == 0) {
    if (dk_BSGD.numel() > 0) {  // Q == 0: no query reads any key
      CUDA_CHECK(cudaMemsetAsync(dk_BSGD.raw_data(), 0, dk_BSGD.num_bytes(), stream));
      CUDA_CHECK(cudaMemsetAsync(dv_BSGD.raw_data(), 0, dv_BSGD.num_bytes(), stream));
    }
    return;
  }

  Tensor delta_BQS = Tensor::empty({d.B, d.Q, d.S}, DType::kF32, Device::kCuda);
  Tensor dq_accum_BSQD = Tensor::empty(q_BSQD.shape(), DType::kF32, Device::kCuda);
  CUDA_CHECK(cudaMemsetAsync(dq_accum_BSQD.raw_data(), 0, dq_accum_BSQD.num_bytes(), stream));
  CUDA_CHECK(launch::attention_backward_delta(bits(dout_BSQD), bits(out_BSQD), delta_BQS.data<float>(), d.B, d.S,
                                              d.Q, d.D, stream));
  Tensor turns;
  if (deterministic) {
    turns = Tensor::empty({launch::attention_dq_turns(d.B, d.S, d.Q)}, DType::kI32, Device::kCuda);
    CUDA_CHECK(cudaMemsetAsync(turns.raw_data(), 0, turns.num_bytes(), stream));
  }
  CUDA_CHECK(launch::attention_backward(bits(dout_BSQD), bits(q_BSQD), bits(k_BSGD), bits(v_BSGD),
                                        lse_BQS.data<float>(), delta_BQS.data<float>(), dq_accum_BSQD.data<float>(),
                                        bits(dk_BSGD), bits(dv_BSGD), d.B, d.S, d.Q, d.G, d.D, softmax_scale(d.D),
                                        stream, launch::AttentionKernel::kAuto,
                                        deterministic ? turns.data<int32_t>() : nullptr, kd));
  CUDA_CHECK(launch::cast_f32_to_bf16(dq_accum_BSQD.data<float>(), bits(dq_BSQD), dq_accum_BSQD.numel(), stream));
}

}  // namespace moetp::cuda
