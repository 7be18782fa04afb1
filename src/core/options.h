// The typed options of a run: every choice a user makes by name (dispatcher, device, expert GEMM,
// allocator, optimizer state dtype, recomputation) is one of these enums. Text becomes an enum in one place, `parse_option`, when a
// config or a command line is read; everything downstream switches on the enum. Each enum's names
// are its `kOptionNames` table, which drives parsing, error messages, --help and printing.
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "core/check.h"

namespace moetp {

// moe.dispatcher: how routed tokens reach the ranks that hold their experts (docs/moe.md).
// kAuto resolves to kLocal on one expert rank, else kAll2all (config::resolved_dispatcher).
enum class DispatcherKind { kAuto, kLocal, kAllgather, kAll2all, kVexpert };
// train.device: where the model runs. kAuto picks cuda when every rank has a GPU.
enum class DeviceChoice { kAuto, kCpu, kCuda };
// moe.expert_gemm (CUDA device): one Hopper grouped GEMM over the local experts, or one cuBLAS
// GEMM per expert. kAuto takes the grouped GEMM where its strides allow.
enum class ExpertGemmChoice { kAuto, kGrouped, kCublas };
// train.cuda_allocator (CUDA device): block cache (kAuto = kCaching) or cudaMalloc/cudaFree per tensor.
enum class AllocatorChoice { kAuto, kCaching, kDirect };
// optim.state_dtype: storage of the AdamW moments (master weights stay f32).
enum class StateDType { kF32, kBF16 };
// train.recompute: which activations of a decoder layer the backward recomputes from the layer's
// input instead of keeping them from the forward: none; attn (the attention block); moe (a MoE
// block's dispatched rows and expert activations, with the routing of the forward); layer (the
// whole layer, attention and MLP or MoE).
enum class RecomputeMode { kNone, kAttn, kMoe, kLayer };
// data.overlong: what packing does with a document longer than seq_len positions (data/packing.h):
// truncate it, split it into pieces, or drop it. kAuto: split for datasets without loss masks
// (pre-training text), truncate for masked ones (chat).
enum class OverlongChoice { kAuto, kTruncate, kSplit, kDrop };

template <typename E>
struct OptionNames;  // specialised below: `static constexpr std::array names` in enum order

template <>
struct OptionNames<DispatcherKind> {
  static constexpr std::array<std::string_view, 5> names = {"auto", "local", "allgather", "all2all", "vexpert"};
};
template <>
struct OptionNames<DeviceChoice> {
  static constexpr std::array<std::string_view, 3> names = {"auto", "cpu", "cuda"};
};
template <>
struct OptionNames<ExpertGemmChoice> {
  static constexpr std::array<std::string_view, 3> names = {"auto", "grouped", "cublas"};
};
template <>
struct OptionNames<AllocatorChoice> {
  static constexpr std::array<std::string_view, 3> names = {"auto", "caching", "direct"};
};

template <>
struct OptionNames<StateDType> {
  static constexpr std::array<std::string_view, 2> names = {"f32", "bf16"};
};

template <>
struct OptionNames<RecomputeMode> {
  static constexpr std::array<std::string_view, 4> names = {"none", "attn", "moe", "layer"};
};

template <>
struct OptionNames<OverlongChoice> {
  static constexpr std::array<std::string_view, 4> names = {"auto", "truncate", "split", "drop"};
};

template <typename E>
concept NamedOption = requires { OptionNames<E>::names; };

template <NamedOption E>
constexpr std::string_view option_name(E value) {
  return OptionNames<E>::names[static_cast<size_t>(value)];
}

// "a | b | c": the accepted names, for help texts and errors.
template <NamedOption E>
std::string option_choices() {
  std::string out;
  for (std::string_view n : OptionNames<E>::names) {
    if (!out.empty()) out += " | ";
    out += n;
  }
  return out;
}

// The enum named `text`; throws naming `what` (e.g. "moe.dispatcher"), the text and the choices.
template <NamedOption E>
E parse_option(std::string_view text, std::string_view what) {
  const auto& names = OptionNames<E>::names;
  for (size_t i = 0; i < names.size(); ++i) {
    if (names[i] == text) return static_cast<E>(i);
  }
  MOETP_FAIL("{}: '{}' is not one of {}", what, text, option_choices<E>());
}

}  // namespace moetp
