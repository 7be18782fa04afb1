// Pieces shared by the dispatcher implementations (internal to src/moe).
#pragma once

#include <string>
#include <vector>

#include "moe/dispatcher.h"

namespace moetp::moe::detail {

// "" when x/idx/w are consistent: x (N, H) f32, idx (N, K) i32 in [0, E), w (N, K) f32.
std::string routing_error(const Tensor& x_NH, const Tensor& topk_idx_NK, const Tensor& topk_weight_NK,
                          const DispatcherConfig& cfg);
// Validates locally, then agrees across `group` so that every member throws the same error.
void validate_routing(comm::Comm& group, const Tensor& x_NH, const Tensor& topk_idx_NK,
                      const Tensor& topk_weight_NK, const DispatcherConfig& cfg);

// (N, K) routing table on the host.
struct HostRouting {
  int64_t num_tokens = 0;
  int64_t top_k = 0;
  std::vector<int32_t> idx;  // N·K
  int32_t at(int64_t n, int64_t k) const { return idx[n * top_k + k]; }
};
HostRouting host_routing(const Tensor& topk_idx_NK);

std::vector<int64_t> exclusive_prefix(const std::vector<int64_t>& counts);

template <typename S>
S& state_as(DispatchState& s, const char* dispatcher) {
  auto* p = dynamic_cast<S*>(&s);
  MOETP_CHECK(p != nullptr, "{}: state belongs to another dispatcher", dispatcher);
  return *p;
}

std::unique_ptr<Dispatcher> make_local(const comm::Mesh& mesh, const DispatcherConfig& cfg);
std::unique_ptr<Dispatcher> make_allgather(const comm::Mesh& mesh, const DispatcherConfig& cfg);
std::unique_ptr<Dispatcher> make_all2all(const comm::Mesh& mesh, const DispatcherConfig& cfg);
std::unique_ptr<Dispatcher> make_vexpert(const comm::Mesh& mesh, const DispatcherConfig& cfg);

}  // namespace moetp::moe::detail
