#include "train/plan.h"

#include <algorithm>
#include <functional>

#include "core/check.h"
#include "backend/backend.h"
#include "model/param_table.h"

namespace moetp::train {

namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

}  // namespace

MemoryPlan plan_memory(const config::ModelConfig& m, const config::TrainConfig& cfg, int world, Device device,
                       double imbalance) {
  const int P = cfg.parallel.ep, T = cfg.parallel.etp;
  MOETP_CHECK(P >= 1 && T >= 1 && world >= 1 && world % (P * T) == 0,
              "plan: world {} is not a multiple of ep {} x etp {}", world, P, T);
  const int64_t micro = cfg.train.micro_batches, global = cfg.train.global_batch_size, S = cfg.train.seq_len;
  MOETP_CHECK(micro >= 1 && global % (static_cast<int64_t>(world) * micro) == 0,
              "plan: train.global_batch_size {} does not split into {} ranks x {} micro-batches", global, world, micro);
  MOETP_CHECK(imbalance >= 1.0, "plan: the routing imbalance ({}) must be >= 1 (1 = balanced)", imbalance);
  const int64_t rows = global / world / micro, N = rows * S;
  const bool cuda = device == Device::kCuda;
  const double cb = cuda ? 2.0 : 4.0;  // bytes of the compute dtype

  MemoryPlan plan;
  plan.tokens_per_rank = N;
  // Parameters as the model's flat buffers hold them.
  const model::ParamTable table = model::qwen3_moe_params(m, model::ExpertLayout{P, 0, T, 0});
  std::vector<int64_t> offsets;
  const int64_t elems = model::flat_layout(table, offsets);
  int64_t params = 0;
  for (const model::ParamDesc& p : table.params) params += shape_numel(shard::local_shape(p.spec));
  plan.parameters = static_cast<double>(params);
  const double e = static_cast<double>(elems);
  auto add = [&](std::string what, double bytes) { plan.items.push_back({std::move(what), bytes}); };
  // optim.zero = 1: each rank keeps the masters and moments of its slices: replicated parameters
  // over world, expert shards over expert_dp (model/model.h replica_slices).
  const bool zero = cfg.optim.zero == 1 && world > 1;
  double replicated = 0, expert = 0;
  for (const model::ParamDesc& p : table.params) {
    (p.kind == model::ParamKind::kExpert ? expert : replicated) += static_cast<double>(shape_numel(shard::local_shape(p.spec)));
  }
  const int expert_dp = world / (P * T);
  const double sliced = replicated / world + expert / expert_dp;
  const std::string share = fmt::format("optim.zero 1: 1/{} of replicated, 1/{} of expert", world, expert_dp);
  if (cuda || zero) {
    add(cuda ? "weights (bf16 working copies)" : "weights (f32 working copies)", e * cb);
    add(zero ? fmt::format("master weights (f32, {})", share) : "master weights (f32)", zero ? sliced * 4 : e * 4);
  } else {
    add("weights (f32, the masters)", e * cb);
  }
  add("gradients (f32)", e * 4);
  const double moment_bytes = cfg.optim.state_dtype == StateDType::kBF16 ? 4 : 8;
  if (zero) {
    add(fmt::format("AdamW moments ({}, {})", option_name(cfg.optim.state_dtype), share), moment_bytes * sliced);
  } else {
    add(fmt::format("AdamW moments ({})", option_name(cfg.optim.state_dtype)), e * moment_bytes);
  }

  // Activations per layer (model/model.cpp LayerSaved; moe/cuda_moe.h buffers).
  const double H = static_cast<double>(m.hidden_size), D = static_cast<double>(m.head_dim);
  const double heads = static_cast<double>(m.num_attention_heads), kv = static_cast<double>(m.num_key_value_heads);
  const double Hq = heads * D, Hkv = kv * D, E = static_cast<double>(m.num_experts),
               K = static_cast<double>(m.num_experts_per_tok);
  const double i = static_cast<double>(m.moe_intermediate_size) / T, F = static_cast<double>(m.intermediate_size);
  const double n = static_cast<double>(N), M = n * K;
  const bool mesh = world > 1;
  const DispatcherKind disp = config::resolved_dispatcher(cfg);
  const bool vexpert = mesh && disp == DispatcherKind::kVexpert;
  const double R = mesh ? imbalance * n * K * T : M;  // expert-side rows (one GPU: the slot rows)
  const double x_in = cb * n * H;
  const double attn = x_in + cb * (2 * n * H + 3 * n * Hq + 3 * n * Hkv) + 4 * (n + n * heads + n * kv + rows * heads * S);
  const double mlp_in = cb * n * H + 4 * n;  // the MLP block's normed input and its rstd
  const double dense = mlp_in + cb * n * 3 * F;
  const double router = 4 * n * E * 2 + n * K * 12 + M * 12;
  double moe_rows = (vexpert ? 0 : 2 * M * H * cb) + R * 3 * i * cb;
  if (mesh) moe_rows += 2 * R * H * cb + (vexpert ? 0 : R * H * cb + 16 * R);
  const double moe = mlp_in + router + moe_rows;
  const double moe_bwd = 4 * n * K + (mesh || vexpert ? 0 : M * H * cb) + n * E * (4 + cb) + 4 * n * H + R * 3 * i * cb +
                         (vexpert ? R * H * cb : 0) + 3 * n * H * cb;

  const int64_t L = m.num_hidden_layers;
  const RecomputeMode mode = cfg.train.recompute;
  const int64_t recomputed = mode == RecomputeMode::kNone ? 0
                             : cfg.train.recompute_layers < 0 ? L
                                                              : std::min<int64_t>(L, cfg.train.recompute_layers);
  double saved = 0;
  double top_recompute = 0;  // what the top layer's backward allocates again
  bool top_moe = false;
  for (int64_t l = 0; l < L; ++l) {
    const bool is_moe = m.is_moe_layer(l);
    const double mlp = is_moe ? moe : dense;
    double keep = attn + mlp, again = 0;
    if (l < recomputed && mode == RecomputeMode::kAttn) {
      keep = x_in + mlp;
      again = attn - x_in;
    } else if (l < recomputed && mode == RecomputeMode::kMoe) {
      if (is_moe) {  // the MoE rows; the routing stays (moe::MoeLayer::recompute)
        keep = attn + mlp_in + router;
        again = moe_rows;
      }
    } else if (l < recomputed && mode == RecomputeMode::kLayer) {
      keep = x_in + (is_moe ? router : 0);
      again = attn - x_in + mlp - (is_moe ? router : 0);
    }
    saved += keep;
    if (l == L - 1) {
      top_recompute = again;
      top_moe = is_moe;
    }
  }
  add(fmt::format("saved activations ({} layers, {} tokens, recompute {})", L, N, option_name(mode)), saved);
  const int64_t vocab = m.vocab_size;
  const int64_t chunk = cfg.train.logit_chunk_rows > 0 ? cfg.train.logit_chunk_rows
                                                       : backend::default_logit_chunk_rows(device, vocab);
  const double chunk_rows = std::min<double>(n, static_cast<double>(chunk));
  const double head = chunk_rows * static_cast<double>(vocab) * cb + 2 * cb * n * H;
  const double bwd = top_recompute + (top_moe ? moe_bwd : cb * n * 3 * F + 3 * n * H * cb);
  if (bwd >= head) {
    add("top layer's backward (buffers, recomputed activations)", bwd);
  } else {
    add("LM head chunk of logits", head);
  }
  for (const PlanItem& it : plan.items) plan.peak_bytes += it.bytes;
  return plan;
}

FitAdvice advise_fit(const config::ModelConfig& m, const config::TrainConfig& cfg, int world, Device device,
                     double budget_bytes) {
  const double imbalance = cfg.moe.plan_imbalance;
  auto peak = [&](const config::TrainConfig& c) { return plan_memory(m, c, world, device, imbalance).peak_bytes; };
  FitAdvice advice;
  advice.fits = peak(cfg) <= budget_bytes;
  // Micro-batches grow until the first that does not fit (the peak grows with the rows).
  const int64_t per_micro = static_cast<int64_t>(world) * cfg.train.micro_batches;
  for (int64_t rows = 1; rows <= 1024; ++rows) {
    config::TrainConfig c = cfg;
    c.train.global_batch_size = static_cast<int>(rows * per_micro);
    const double p = peak(c);
    if (p > budget_bytes) break;
    advice.largest_rows = rows;
    advice.largest_rows_bytes = p;
  }
  // Candidate changes, each a function of the config (empty when it does not apply).
  using Change = std::pair<std::string, std::function<bool(config::TrainConfig&)>>;
  std::vector<Change> changes;
  if (device == Device::kCuda && cfg.optim.state_dtype == StateDType::kF32) {
    changes.push_back({"optim.state_dtype=bf16", [](config::TrainConfig& c) {
                         c.optim.state_dtype = StateDType::kBF16;
                         return true;
                       }});
  }
  if (cfg.optim.zero == 0 && world > 1) {
    changes.push_back({"optim.zero=1", [](config::TrainConfig& c) {
                         c.optim.zero = 1;
                         return true;
                       }});
  }
  for (const RecomputeMode mode : {RecomputeMode::kMoe, RecomputeMode::kLayer}) {
    if (cfg.train.recompute == mode && cfg.train.recompute_layers < 0) continue;
    if (cfg.train.recompute == RecomputeMode::kLayer && cfg.train.recompute_layers < 0) continue;
    changes.push_back({fmt::format("train.recompute={}", option_name(mode)), [mode](config::TrainConfig& c) {
                         c.train.recompute = mode;
                         c.train.recompute_layers = -1;
                         return true;
                       }});
  }
  const int64_t rows = cfg.train.global_batch_size / world / cfg.train.micro_batches;
  for (int64_t split = 2; split <= rows; split *= 2) {
    if (rows % split != 0) break;
    const int micro = cfg.train.micro_batches * static_cast<int>(split);
    changes.push_back({fmt::format("train.micro_batches={}", micro), [micro](config::TrainConfig& c) {
                         c.train.micro_batches = micro;
                         return true;
                       }});
  }
  const int T = cfg.parallel.etp;
  for (int P = cfg.parallel.ep * 2; P * T <= world; P *= 2) {
    if (world % (P * T) != 0 || m.num_experts % P != 0) break;
    changes.push_back({fmt::format("parallel.ep={}", P), [P](config::TrainConfig& c) {
                         c.parallel.ep = P;
                         return true;
                       }});
  }
  if (advice.fits) return advice;
  for (const auto& [what, apply] : changes) {
    config::TrainConfig c = cfg;
    apply(c);
    const double p = peak(c);
    if (p <= budget_bytes) advice.settings.push_back({{what}, p});
  }
  if (advice.settings.empty()) {
    // Cumulative, in the order above; micro-batch splits and ep replace their earlier values.
    config::TrainConfig c = cfg;
    std::vector<std::string> taken;
    for (const auto& [what, apply] : changes) {
      apply(c);
      const std::string key = what.substr(0, what.find('='));
      std::erase_if(taken, [&](const std::string& t) { return t.rfind(key + "=", 0) == 0; });
      taken.push_back(what);
      const double p = peak(c);
      if (p <= budget_bytes) {
        advice.settings.push_back({taken, p});
        break;
      }
    }
  }
  return advice;
}

std::string format_advice(const FitAdvice& advice, const config::TrainConfig& cfg, double allowance_gib) {
  std::string out;
  if (advice.largest_rows > 0) {
    out += fmt::format("largest micro-batch that fits: {} sequence(s) of {} tokens per rank ({:.2f} GiB)\n",
                       advice.largest_rows, cfg.train.seq_len, advice.largest_rows_bytes / kGiB + allowance_gib);
  } else {
    out += fmt::format("not even one sequence of {} tokens per rank fits with these settings\n", cfg.train.seq_len);
  }
  if (!advice.fits && advice.settings.empty()) {
    out += "no combination of optim.state_dtype, optim.zero, train.recompute, train.micro_batches and parallel.ep fits at this "
           "world size: more GPUs, a shorter train.seq_len or a smaller model\n";
  }
  for (const FitAdvice::Setting& s : advice.settings) {
    std::string sets;
    for (const std::string& o : s.overrides) sets += " --set " + o;
    out += fmt::format("fits with:{} ({:.2f} GiB)\n", sets, s.peak_bytes / kGiB + allowance_gib);
  }
  return out;
}

std::string format_plan(const MemoryPlan& plan, double gpu_mem_gib, double allowance_gib) {
  std::string out;
  size_t width = 0;
  for (const PlanItem& it : plan.items) width = std::max(width, it.what.size());
  for (const PlanItem& it : plan.items) out += fmt::format("{:<{}}  {:>9.2f} GiB\n", it.what, width, it.bytes / kGiB);
  if (allowance_gib > 0) out += fmt::format("{:<{}}  {:>9.2f} GiB\n", "CUDA context and allocator slack (allowance)", width, allowance_gib);
  const double peak = plan.peak_bytes / kGiB + allowance_gib;
  out += fmt::format("per-rank peak: {:.2f} GiB", peak);
  if (gpu_mem_gib > 0) {
    out += peak <= gpu_mem_gib ? fmt::format(" (fits in {:g} GiB)", gpu_mem_gib)
                               : fmt::format(" (does not fit in {:g} GiB)", gpu_mem_gib);
  }
  return out + "\n";
}

}  // namespace moetp::train
