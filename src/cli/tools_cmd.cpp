#include "cli/tools_cmd.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "comm/mesh.h"
#include "config/model_config.h"
#include "config/train_config.h"
#include "data/loader.h"
#include "io/checkpoint.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "train/plan.h"

namespace moetp::cli {

namespace fs = std::filesystem;

namespace {

uint64_t fnv1a(std::span<const std::byte> bytes) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (std::byte b : bytes) {
    h ^= static_cast<uint64_t>(b);
    h *= 0x100000001b3ull;
  }
  return h;
}

bool is_native(const std::string& dir) { return fs::exists(fs::path(dir) / "trainer_state.json"); }

}  // namespace

int run_inspect(const std::string& path) {
  // A single .safetensors file, or a checkpoint directory (single file or sharded with an index).
  std::optional<io::SafetensorsFile> single;
  std::optional<io::SafetensorsDir> dir;
  std::vector<std::string> names;
  if (fs::is_regular_file(path)) {
    single.emplace(io::SafetensorsFile::open(path));
    for (const io::TensorInfo& t : single->tensors()) names.push_back(t.name);
  } else {
    dir.emplace(io::SafetensorsDir::open(path));
    names = dir->names();
  }
  uint64_t total = 0;
  std::printf("%-64s %-5s %-22s %12s  %s\n", "tensor", "dtype", "shape", "bytes", "fnv1a64");
  for (const std::string& name : names) {
    const io::SafetensorsFile& f = single ? *single : dir->file_of(name);
    const io::TensorInfo& info = f.info(name);
    const auto raw = f.raw(name);
    total += raw.size();
    std::printf("%-64s %-5s %-22s %12zu  %016llx\n", name.c_str(), info.dtype.c_str(), shape_str(info.shape).c_str(),
                raw.size(), static_cast<unsigned long long>(fnv1a(raw)));
  }
  std::printf("%zu tensors, %llu bytes\n", names.size(), static_cast<unsigned long long>(total));
  return 0;
}

// Refuses weights with NaN or Inf (a diverged run's checkpoint), naming the first such tensor and
// element, unless `allow`. Every rank checks the parameters it holds; the error reaches all ranks.
void check_finite(const model::Qwen3MoeModel& model, bool allow, const std::string& dir, comm::Comm& world) {
  if (allow) return;
  std::string why;
  for (const model::Param& p : model.params()) {
    const Tensor v = p.value.contiguous();
    const float* x = v.data<float>();
    for (int64_t i = 0; i < v.numel(); ++i) {
      if (!std::isfinite(x[i])) {
        why = fmt::format("{}: parameter '{}' holds {} at element {} of this rank's {} (the checkpoint of a run that "
                          "diverged?); --allow-nonfinite to go on anyway",
                          dir, p.name, x[i], i, v.describe());
        break;
      }
    }
    if (!why.empty()) break;
  }
  world.raise_if_any(why, "non-finite weights");
}

int run_convert(const ConvertArgs& a, comm::Comm& world) {
  MOETP_CHECK((a.from == "hf" || a.from == "native") && (a.to == "hf" || a.to == "native"),
              "convert --from/--to take hf or native, got '{}' -> '{}'", a.from, a.to);
  const config::ModelConfig cfg = config::ModelConfig::load(a.input + "/config.json");
  comm::Mesh mesh(world, a.ep, a.etp);
  model::Qwen3MoeModel model(cfg, mesh, config::resolve_dispatcher(DispatcherKind::kAuto, a.ep, a.etp), 0);
  std::vector<Tensor> m, v;
  for (const model::Param& p : model.params()) {
    m.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
    v.push_back(Tensor::zeros(p.value.shape(), DType::kF32));
  }
  const std::vector<io::ExtraState> extras = {{model::kAdamWStatePrefixes[0], &m}, {model::kAdamWStatePrefixes[1], &v}};
  nlohmann::json state = {{"format", "moetp-native"}, {"version", 1}, {"step", 0}, {"seed", 1234}};
  if (a.from == "hf") {
    io::load_hf(model, a.input);
  } else {
    state = io::load_native(model, extras, a.input);
  }
  check_finite(model, a.allow_nonfinite, a.input, world);
  // The tokenizer and generation files travel with the weights.
  io::SaveOptions opts;
  opts.show_progress = world.rank() == 0;
  opts.files = io::hf_side_files(a.input);
  if (a.to == "hf") {
    opts.expert_layout = a.stacked ? io::HfExpertLayout::kStacked : io::HfExpertLayout::kPerExpert;
    opts.weights = a.dtype == "bf16" ? io::HfWeightDType::kBF16
                   : a.dtype == "f32" ? io::HfWeightDType::kF32
                                      : io::HfWeightDType::kAuto;
    io::save_hf(model, a.output, opts);
  } else {
    io::save_native(model, extras, state, a.output, opts);
  }
  return 0;
}

int run_eval(const EvalArgs& a, comm::Comm& world) {
  const config::ModelConfig cfg = config::ModelConfig::load(a.model_dir + "/config.json");
  const data::Batches batches(data::TokenFile::open(a.data), a.seq_len, a.num_sequences, 0);
  MOETP_CHECK(batches.file().vocab_size() <= static_cast<uint64_t>(cfg.vocab_size),
              "eval: token file '{}' has vocabulary size {} but the model {} has vocab_size {} (ids past the model's "
              "vocabulary; tokenized with another tokenizer?)",
              a.data, batches.file().vocab_size(), a.model_dir, cfg.vocab_size);
  comm::Mesh mesh(world, a.ep, a.etp);
  const DispatcherKind dispatcher = parse_option<DispatcherKind>(a.dispatcher, "moetp eval --dispatcher");
  model::Qwen3MoeModel model(cfg, mesh, config::resolve_dispatcher(dispatcher, a.ep, a.etp), 0);
  if (is_native(a.model_dir)) {
    io::load_native(model, {}, a.model_dir);
  } else {
    io::load_hf(model, a.model_dir);
  }
  check_finite(model, a.allow_nonfinite, a.model_dir, world);
  MOETP_CHECK(a.num_sequences % world.size() == 0, "eval: --num-sequences ({}) % world size ({}) != 0",
              a.num_sequences, world.size());
  const int64_t per_rank = a.num_sequences / world.size();
  std::vector<int64_t> ids;
  for (int64_t i = 0; i < per_rank; ++i) ids.push_back(world.rank() * per_rank + i);  // file order, not shuffled
  Tensor logits;
  const model::MicroStats st = model.forward(batches.tokens(ids), a.dump_logits.empty() ? nullptr : &logits);
  const double ce = world.all_reduce_scalar(st.ce_sum, comm::ReduceOp::kSum);
  const int64_t n = world.all_reduce_scalar(st.num_targets, comm::ReduceOp::kSum);
  if (!a.dump_logits.empty()) {
    const std::vector<int64_t> counts = world.all_gather_scalar(logits.rows());
    Tensor all = Tensor::empty({comm::sum_counts(counts), cfg.vocab_size}, DType::kF32);
    world.all_gather_v(logits, all, counts);
    if (world.rank() == 0) {
      io::write_safetensors(a.dump_logits, {{"logits", all.view({a.num_sequences, a.seq_len, cfg.vocab_size}), "F32"}});
    }
  }
  if (world.rank() == 0) {
    std::printf("eval %s on %s: %lld sequences x %lld tokens: loss %.6f aux_loss %.6f\n", a.model_dir.c_str(),
                a.data.c_str(), static_cast<long long>(a.num_sequences), static_cast<long long>(a.seq_len),
                ce / static_cast<double>(n), st.aux);
  }
  return 0;
}

int run_plan(const PlanArgs& a) {
  config::TrainConfig cfg;
  for (const std::string& f : a.config_files) config::apply_json_file(cfg, f);
  for (const std::string& o : a.overrides) config::apply_override(cfg, o);
  config::validate(cfg);
  const config::ModelConfig model_cfg = config::ModelConfig::load(cfg.model.config);
  const Device device = parse_option<DeviceChoice>(a.device, "--device") == DeviceChoice::kCpu ? Device::kCpu : Device::kCuda;
  const double imbalance = cfg.moe.plan_imbalance;
  const train::MemoryPlan plan = train::plan_memory(model_cfg, cfg, a.world, device, imbalance);
  std::printf("memory plan: %s, %d ranks (ep %d x etp %d), %lld tokens per rank and micro-batch, %.3f B parameters "
              "per rank, expert rows planned at %.2fx balanced, device %s\n",
              cfg.model.config.c_str(), a.world, cfg.parallel.ep, cfg.parallel.etp,
              static_cast<long long>(plan.tokens_per_rank), plan.parameters / 1e9, imbalance,
              device == Device::kCuda ? "cuda" : "cpu");
  const double allowance = device == Device::kCuda ? a.allowance_gb : 0.0;
  std::printf("%s", train::format_plan(plan, a.gpu_mem_gb, allowance).c_str());
  if (a.gpu_mem_gb > 0) {
    const double budget = (a.gpu_mem_gb - allowance) * 1024.0 * 1024.0 * 1024.0;
    std::printf("%s", train::format_advice(train::advise_fit(model_cfg, cfg, a.world, device, budget), cfg, allowance).c_str());
  }
  return 0;
}

}  // namespace moetp::cli
