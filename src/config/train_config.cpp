// The field table of TrainConfig and everything it drives: defaults, JSON and --set parsing,
// --help, the start-up table and the saved JSON. To add an option: add a member to TrainConfig
// and one line to fields() below; nothing else.
#include "config/train_config.h"

#include <fmt/ranges.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <type_traits>
#include <variant>

#include "config/model_config.h"
#include "core/check.h"

namespace moetp::config {
namespace {

using nlohmann::json;
// A field's value, whatever member type holds it (int and int64_t members both travel as int64_t).
using Value = std::variant<int64_t, double, bool, std::string>;

struct Field {
  std::string name;  // dotted: "train.steps"
  std::string type;  // "int" | "double" | "bool" | "string" | "choice" (an enum of core/options.h)
  Value default_value;
  std::string help;
  std::function<Value(const TrainConfig&)> get;
  std::function<void(TrainConfig&, const Value&)> set;  // range-checks int members
};

template <typename T>
constexpr const char* type_name() {
  if constexpr (std::is_enum_v<T>) return "choice";
  else if constexpr (std::is_same_v<T, bool>) return "bool";
  else if constexpr (std::is_integral_v<T>) return "int";
  else if constexpr (std::is_floating_point_v<T>) return "double";
  else return "string";
}

template <typename T>
Value to_value(const T& v) {
  if constexpr (std::is_enum_v<T>) return std::string(option_name(v));
  else if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, double> || std::is_same_v<T, std::string>) return v;
  else return static_cast<int64_t>(v);
}

// One table row: `section` and `member` locate the value (cfg.*section.*member).
template <typename S, typename T>
Field field(std::string name, S TrainConfig::*section, T S::*member, std::type_identity_t<T> default_value,
            std::string help) {
  Field f{std::move(name), type_name<T>(), to_value(default_value), std::move(help), nullptr, nullptr};
  f.get = [section, member](const TrainConfig& c) { return to_value(c.*section.*member); };
  f.set = [section, member, key = f.name](TrainConfig& c, const Value& v) {
    if constexpr (std::is_enum_v<T>) {
      c.*section.*member = parse_option<T>(std::get<std::string>(v), "config key '" + key + "'");
    } else if constexpr (std::is_same_v<T, bool> || std::is_same_v<T, double> || std::is_same_v<T, std::string>) {
      c.*section.*member = std::get<T>(v);
    } else {
      const int64_t i = std::get<int64_t>(v);
      MOETP_CHECK(i >= std::numeric_limits<T>::min() && i <= std::numeric_limits<T>::max(),
                  "config key '{}': {} is out of range [{}, {}]", key, i, std::numeric_limits<T>::min(),
                  std::numeric_limits<T>::max());
      c.*section.*member = static_cast<T>(i);
    }
  };
  return f;
}

using C = TrainConfig;

const std::vector<Field>& fields() {
  static const std::vector<Field> kFields = {
      field("model.config", &C::model, &C::Model::config, "configs/tiny-moe.json",
            "path to a Hugging Face config.json (Qwen3-MoE)"),
      field("parallel.ep", &C::parallel, &C::Parallel::ep, 1, "expert-parallel degree P (experts split over P ranks)"),
      field("parallel.etp", &C::parallel, &C::Parallel::etp, 1,
            "expert tensor-parallel degree T (each expert's FFN split over T ranks)"),
      field("moe.dispatcher", &C::moe, &C::Moe::dispatcher, DispatcherKind::kAuto,
            "auto (local when ep = etp = 1, else all2all) | local | allgather | all2all | vexpert"),
      field("moe.force_balance", &C::moe, &C::Moe::force_balance, false,
            "round-robin expert assignment instead of the router's (debug/benchmark only)"),
      field("moe.expert_gemm", &C::moe, &C::Moe::expert_gemm, ExpertGemmChoice::kAuto,
            "CUDA device: auto (= grouped) | grouped (Hopper grouped GEMM, one launch over the local experts) | "
            "cublas (one cuBLAS GEMM per expert)"),
      field("moe.plan_imbalance", &C::moe, &C::Moe::plan_imbalance, 1.5,
            "routing imbalance the memory plan assumes: the most expert-side rows a rank receives, as a multiple "
            "of the balanced count (moetp plan and the trainer's memory check; 1 = perfectly balanced)"),
      field("train.steps", &C::train, &C::Train::steps, 200, "optimizer steps"),
      field("train.global_batch_size", &C::train, &C::Train::global_batch_size, 16,
            "sequences per step over all ranks"),
      field("train.seq_len", &C::train, &C::Train::seq_len, 128, "tokens per sequence"),
      field("train.micro_batches", &C::train, &C::Train::micro_batches, 1, "gradient accumulation steps per step"),
      field("train.seed", &C::train, &C::Train::seed, int64_t{1234}, "seed of initialisation and data order"),
      field("train.log_every", &C::train, &C::Train::log_every, 1, "log metrics every N steps"),
      field("train.device", &C::train, &C::Train::device, DeviceChoice::kAuto,
            "auto (cuda when this build has CUDA and a GPU is visible, else cpu) | cpu | cuda (one GPU per rank)"),
      field("train.cuda_allocator", &C::train, &C::Train::cuda_allocator, AllocatorChoice::kAuto,
            "CUDA device: auto (= caching) | caching (freed blocks reused without cudaFree, which synchronises "
            "the device) | direct (cudaMalloc/cudaFree per tensor)"),
      field("train.recompute", &C::train, &C::Train::recompute, RecomputeMode::kNone,
            "activation recomputation: none | attn (the backward re-runs each layer's attention block from the "
            "layer input) | moe (each MoE block's dispatched rows and expert activations, re-run with the routing "
            "of the forward) | layer (the whole layer); the same results, less activation memory"),
      field("train.recompute_layers", &C::train, &C::Train::recompute_layers, -1,
            "recompute only the first k decoder layers (-1: all)"),
      field("train.logit_chunk_rows", &C::train, &C::Train::logit_chunk_rows, 0,
            "rows of LM-head logits materialised at once (0: the backend's default: 2^26 logits on the CPU, 2^29 on "
            "CUDA, in multiples of 128 rows); more rows "
            "cost memory (rows x vocab x 2 bytes on CUDA) and rewrite the f32 LM-head gradient fewer times"),
      field("train.deterministic", &C::train, &C::Train::deterministic, false,
            "CUDA device: run every kernel whose result could depend on scheduling (the attention backward's dq "
            "accumulation) in a fixed order, so two runs of one configuration give the same losses and weights bit "
            "for bit; costs time in the attention backward. The CPU device is always deterministic"),
      field("train.eval_every", &C::train, &C::Train::eval_every, 0,
            "validation loss (data.valid) every N steps and after the last step; 0 = off"),
      field("train.eval_batches", &C::train, &C::Train::eval_batches, 0,
            "global batches of validation rows per evaluation, from the first (0 = all of the split)"),
      field("train.memory_check", &C::train, &C::Train::memory_check, true,
            "CUDA device: before allocating, check the memory plan (moetp plan) against each GPU's free memory "
            "and stop with the plan and the settings that would fit when it does not"),
      field("optim.lr", &C::optim, &C::Optim::lr, 3e-3, "peak learning rate (after warmup)"),
      field("optim.min_lr", &C::optim, &C::Optim::min_lr, 3e-4, "learning rate at the end of the cosine decay"),
      field("optim.warmup_steps", &C::optim, &C::Optim::warmup_steps, 20, "linear warmup steps"),
      field("optim.weight_decay", &C::optim, &C::Optim::weight_decay, 0.1, "AdamW decoupled weight decay"),
      field("optim.beta1", &C::optim, &C::Optim::beta1, 0.9, "AdamW beta1"),
      field("optim.beta2", &C::optim, &C::Optim::beta2, 0.95, "AdamW beta2"),
      field("optim.eps", &C::optim, &C::Optim::eps, 1e-8, "AdamW epsilon"),
      field("optim.grad_clip", &C::optim, &C::Optim::grad_clip, 1.0, "clip the global gradient norm to this (0 = off)"),
      field("optim.state_dtype", &C::optim, &C::Optim::state_dtype, StateDType::kF32,
            "AdamW moments: f32 | bf16 (rounded to nearest even; 4 bytes less per parameter, f32 master weights "
            "kept; checkpoints hold f32 moments either way)"),
      field("optim.zero", &C::optim, &C::Optim::zero, 0,
            "sharded optimizer: 0 (every rank keeps the f32 master weights and AdamW moments of every parameter it "
            "holds) | 1 (each parameter's gradient is reduce-scattered over the ranks that hold a replica of it, "
            "each of them keeps and updates the masters and moments of its slice only, and the updated working "
            "weights are all-gathered; the same bits as 0)"),
      field("data.path", &C::data, &C::Data::path, "data/kjv.tokens",
            "training data: a token file, or a dataset folder written by `moetp tokenize` (its train split, "
            "documents packed into rows; docs/data.md)"),
      field("data.valid", &C::data, &C::Data::valid, "",
            "dataset folder for the validation loss (its valid split, else its train split; may be data.path); "
            "\"\" = none"),
      field("data.overlong", &C::data, &C::Data::overlong, OverlongChoice::kAuto,
            "dataset documents longer than train.seq_len: auto (split for text, truncate for chat) | truncate | "
            "split (pieces of seq_len) | drop; counts are printed at start-up"),
      field("run.dir", &C::run, &C::Run::dir, "", "run directory for logs and config.json (\"\" = runs/<timestamp>)"),
      field("checkpoint.dir", &C::checkpoint, &C::Checkpoint::dir, "",
            "checkpoint directory (\"\" = <run.dir>/checkpoints)"),
      field("checkpoint.every", &C::checkpoint, &C::Checkpoint::every, 0, "save every N steps (0 = off)"),
      field("checkpoint.keep", &C::checkpoint, &C::Checkpoint::keep, 3, "number of most recent checkpoints kept"),
  };
  return kFields;
}

const Field* find_field(const std::string& name) {
  for (const Field& f : fields()) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

std::string section_of(const std::string& name) { return name.substr(0, name.find('.')); }
std::string leaf_of(const std::string& name) {
  const size_t dot = name.find('.');
  return dot == std::string::npos ? name : name.substr(dot + 1);
}

std::vector<std::string> section_names() {
  std::vector<std::string> sections;
  for (const Field& f : fields()) {
    const std::string s = section_of(f.name);
    if (std::find(sections.begin(), sections.end(), s) == sections.end()) sections.push_back(s);
  }
  return sections;
}

bool is_section(const std::string& name) {
  const auto sections = section_names();
  return std::find(sections.begin(), sections.end(), name) != sections.end();
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
      diagonal = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, substitute});
    }
  }
  return row[b.size()];
}

// "unknown config key 'train.stepz' (did you mean 'train.steps'?); valid keys in section 'train':
// steps, ..." The suggestion also matches a bare leaf ("stepz" -> "train.steps") and a prefix.
std::string unknown_key_message(const std::string& key) {
  std::string message = fmt::format("unknown config key '{}'", key);
  const Field* best = nullptr;
  size_t best_distance = std::numeric_limits<size_t>::max();
  for (const Field& f : fields()) {
    size_t d = std::min(edit_distance(key, f.name), edit_distance(key, leaf_of(f.name)));
    // A truncated name ("optim.warmup" for "optim.warmup_steps") is as good as one typo.
    if (key.size() >= 3 && (f.name.starts_with(key) || leaf_of(f.name).starts_with(key))) d = std::min<size_t>(d, 1);
    if (d < best_distance) best = &f, best_distance = d;
  }
  std::string suggestion = best != nullptr ? best->name : "";
  for (const std::string& section : section_names()) {  // a misspelt section: "trian" -> "train"
    const size_t d = edit_distance(key, section);
    if (d < best_distance) suggestion = section, best_distance = d;
  }
  if (!suggestion.empty() && (best_distance <= 2 || best_distance <= key.size() / 3)) {
    message += fmt::format(" (did you mean '{}'?)", suggestion);
  }
  const std::string section = section_of(key);
  if (is_section(section)) {
    std::vector<std::string> leaves;
    for (const Field& f : fields()) {
      if (section_of(f.name) == section) leaves.push_back(leaf_of(f.name));
    }
    message += fmt::format("; valid keys in section '{}': {}", section, fmt::join(leaves, ", "));
  } else {
    message += fmt::format("; valid sections: {}", fmt::join(section_names(), ", "));
  }
  return message;
}

const Field& field_or_throw(const std::string& key, const std::string& source) {
  const Field* f = find_field(key);
  if (f == nullptr) MOETP_FAIL("{}{}", source.empty() ? "" : source + ": ", unknown_key_message(key));
  return *f;
}

Value value_from_json(const Field& f, const json& v, const std::string& source) {
  auto fail = [&]() -> Value {
    MOETP_FAIL("{}: config key '{}' expects {}, got {} ({})", source, f.name, f.type, v.dump(), v.type_name());
  };
  if (f.type == "int") {
    if (v.is_number_unsigned()) {
      if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return fail();
      return static_cast<int64_t>(v.get<uint64_t>());
    }
    return v.is_number_integer() ? Value(v.get<int64_t>()) : fail();
  }
  if (f.type == "double") return v.is_number() ? Value(v.get<double>()) : fail();
  if (f.type == "bool") return v.is_boolean() ? Value(v.get<bool>()) : fail();
  return v.is_string() ? Value(v.get<std::string>()) : fail();
}

Value value_from_text(const Field& f, const std::string& text) {
  auto fail = [&]() -> Value {
    MOETP_FAIL("--set {}={}: expected {}, got '{}'{}", f.name, text, f.type, text,
               f.type == "bool" ? " (use true|false|1|0)" : "");
  };
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  if (f.type == "int") {
    int64_t i = 0;
    auto [ptr, ec] = std::from_chars(begin, end, i);
    return (ec == std::errc() && ptr == end && !text.empty()) ? Value(i) : fail();
  }
  if (f.type == "double") {
    double d = 0;
    auto [ptr, ec] = std::from_chars(begin, end, d);
    return (ec == std::errc() && ptr == end && !text.empty() && std::isfinite(d)) ? Value(d) : fail();
  }
  if (f.type == "bool") {
    if (text == "true" || text == "1") return true;
    if (text == "false" || text == "0") return false;
    return fail();
  }
  return text;
}

std::string format_value(const Value& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, std::string>) return x;
        else if constexpr (std::is_same_v<T, bool>) return x ? "true" : "false";
        else return fmt::format("{}", x);
      },
      v);
}

json value_to_json(const Value& v) {
  return std::visit([](const auto& x) { return json(x); }, v);
}

void apply_object(TrainConfig& cfg, const json& object, const std::string& prefix, const std::string& source) {
  for (const auto& [key, value] : object.items()) {
    const std::string name = prefix.empty() ? key : prefix + "." + key;
    if (const Field* f = find_field(name)) {
      f->set(cfg, value_from_json(*f, value, source));
    } else if (value.is_object() && prefix.empty() && is_section(name)) {
      apply_object(cfg, value, name, source);
    } else {
      MOETP_FAIL("{}: {}", source, unknown_key_message(name));
    }
  }
}

}  // namespace

TrainConfig::TrainConfig() {
  for (const Field& f : fields()) f.set(*this, f.default_value);
}

void apply_json(TrainConfig& cfg, const nlohmann::json& json, const std::string& source) {
  MOETP_CHECK(json.is_object(), "{}: a train config must be a JSON object, got {}", source, json.type_name());
  apply_object(cfg, json, "", source);
}

void apply_json_file(TrainConfig& cfg, const std::string& path) {
  std::ifstream file(path);
  MOETP_CHECK(file.good(), "cannot open train config '{}'", path);
  std::stringstream text;
  text << file.rdbuf();
  nlohmann::json parsed;
  try {
    parsed = nlohmann::json::parse(text.str());
  } catch (const nlohmann::json::parse_error& e) {
    MOETP_FAIL("{}: invalid JSON: {}", path, e.what());
  }
  apply_json(cfg, parsed, path);
}

void apply_override(TrainConfig& cfg, const std::string& key_eq_value) {
  const size_t eq = key_eq_value.find('=');
  MOETP_CHECK(eq != std::string::npos && eq > 0, "--set expects key=value, got '{}'", key_eq_value);
  const Field& f = field_or_throw(key_eq_value.substr(0, eq), "");
  f.set(cfg, value_from_text(f, key_eq_value.substr(eq + 1)));
}

std::vector<std::string> field_names() {
  std::vector<std::string> names;
  for (const Field& f : fields()) names.push_back(f.name);
  return names;
}

std::string help_text() {
  size_t name_width = 0, default_width = 0;
  std::vector<std::string> defaults;
  for (const Field& f : fields()) {
    const std::string d = f.type == "string" ? fmt::format("\"{}\"", format_value(f.default_value))
                                             : format_value(f.default_value);
    name_width = std::max(name_width, f.name.size());
    default_width = std::max(default_width, d.size());
    defaults.push_back(d);
  }
  std::string out;
  for (size_t i = 0; i < fields().size(); ++i) {
    const Field& f = fields()[i];
    out += fmt::format("  {:<{}}  {:<6}  {:<{}}  {}\n", f.name, name_width, f.type, defaults[i], default_width, f.help);
  }
  return out;
}

std::vector<std::pair<std::string, std::string>> rows(const TrainConfig& cfg) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const Field& f : fields()) {
    std::string value = format_value(f.get(cfg));
    out.emplace_back(f.name, value.empty() ? "\"\"" : value);
  }
  return out;
}

std::string format_table(const std::vector<std::pair<std::string, std::string>>& table) {
  size_t width = 0;
  for (const auto& row : table) width = std::max(width, row.first.size());
  std::string out;
  for (const auto& [key, value] : table) out += fmt::format("  {:<{}}  {}\n", key, width, value);
  return out;
}

nlohmann::json to_json(const TrainConfig& cfg) {
  nlohmann::json out = nlohmann::json::object();
  for (const Field& f : fields()) out[section_of(f.name)][leaf_of(f.name)] = value_to_json(f.get(cfg));
  return out;
}

DispatcherKind resolve_dispatcher(DispatcherKind kind, int ep, int etp) {
  if (kind != DispatcherKind::kAuto) return kind;
  return ep == 1 && etp == 1 ? DispatcherKind::kLocal : DispatcherKind::kAll2all;
}

DispatcherKind resolved_dispatcher(const TrainConfig& cfg) {
  return resolve_dispatcher(cfg.moe.dispatcher, cfg.parallel.ep, cfg.parallel.etp);
}

void validate(const TrainConfig& c) {
  MOETP_CHECK(!c.model.config.empty(), "model.config must name a config.json");
  MOETP_CHECK(c.parallel.ep >= 1, "parallel.ep ({}) must be >= 1", c.parallel.ep);
  MOETP_CHECK(c.parallel.etp >= 1, "parallel.etp ({}) must be >= 1", c.parallel.etp);
  MOETP_CHECK(c.moe.dispatcher != DispatcherKind::kLocal || (c.parallel.ep == 1 && c.parallel.etp == 1),
              "moe.dispatcher 'local' needs parallel.ep = parallel.etp = 1, got ep = {}, etp = {}", c.parallel.ep,
              c.parallel.etp);
  MOETP_CHECK(c.train.steps >= 1, "train.steps ({}) must be >= 1", c.train.steps);
  MOETP_CHECK(c.train.global_batch_size >= 1, "train.global_batch_size ({}) must be >= 1", c.train.global_batch_size);
  MOETP_CHECK(c.train.seq_len >= 1, "train.seq_len ({}) must be >= 1", c.train.seq_len);
  MOETP_CHECK(c.train.micro_batches >= 1, "train.micro_batches ({}) must be >= 1", c.train.micro_batches);
  MOETP_CHECK(c.train.global_batch_size % c.train.micro_batches == 0,
              "train.global_batch_size ({}) % train.micro_batches ({}) != 0", c.train.global_batch_size,
              c.train.micro_batches);
  MOETP_CHECK(c.train.seed >= 0, "train.seed ({}) must be >= 0", c.train.seed);
  MOETP_CHECK(c.train.log_every >= 1, "train.log_every ({}) must be >= 1", c.train.log_every);
  MOETP_CHECK(c.optim.min_lr >= 0 && c.optim.lr >= c.optim.min_lr,
              "need optim.lr ({}) >= optim.min_lr ({}) >= 0", c.optim.lr, c.optim.min_lr);
  MOETP_CHECK(c.optim.lr > 0, "optim.lr ({}) must be > 0", c.optim.lr);
  MOETP_CHECK(c.optim.warmup_steps >= 0, "optim.warmup_steps ({}) must be >= 0", c.optim.warmup_steps);
  MOETP_CHECK(c.optim.weight_decay >= 0, "optim.weight_decay ({}) must be >= 0", c.optim.weight_decay);
  MOETP_CHECK(c.optim.beta1 >= 0 && c.optim.beta1 < 1, "optim.beta1 ({}) must be in [0, 1)", c.optim.beta1);
  MOETP_CHECK(c.optim.beta2 >= 0 && c.optim.beta2 < 1, "optim.beta2 ({}) must be in [0, 1)", c.optim.beta2);
  MOETP_CHECK(c.optim.eps > 0, "optim.eps ({}) must be > 0", c.optim.eps);
  MOETP_CHECK(c.train.recompute_layers >= -1, "train.recompute_layers ({}) must be >= -1 (-1: every layer)",
              c.train.recompute_layers);
  MOETP_CHECK(c.optim.zero == 0 || c.optim.zero == 1,
              "optim.zero ({}) must be 0 or 1 (stage 2, sharded gradients, is not implemented)", c.optim.zero);
  MOETP_CHECK(c.train.logit_chunk_rows >= 0, "train.logit_chunk_rows ({}) must be >= 0 (0: the backend's default)",
              c.train.logit_chunk_rows);
  MOETP_CHECK(c.moe.plan_imbalance >= 1, "moe.plan_imbalance ({}) must be >= 1 (1 = balanced routing)",
              c.moe.plan_imbalance);
  MOETP_CHECK(c.optim.grad_clip >= 0, "optim.grad_clip ({}) must be >= 0 (0 = off)", c.optim.grad_clip);
  MOETP_CHECK(!c.data.path.empty(), "data.path must name a token file or a dataset folder");
  MOETP_CHECK(c.train.eval_every >= 0, "train.eval_every ({}) must be >= 0 (0 = off)", c.train.eval_every);
  MOETP_CHECK(c.train.eval_batches >= 0, "train.eval_batches ({}) must be >= 0 (0 = all)", c.train.eval_batches);
  MOETP_CHECK(c.train.eval_every == 0 || !c.data.valid.empty(),
              "train.eval_every = {} needs data.valid (a dataset folder with validation documents)", c.train.eval_every);
  MOETP_CHECK(c.checkpoint.every >= 0, "checkpoint.every ({}) must be >= 0 (0 = off)", c.checkpoint.every);
  MOETP_CHECK(c.checkpoint.keep >= 1, "checkpoint.keep ({}) must be >= 1", c.checkpoint.keep);
}

void validate_with_model(const TrainConfig& c, const ModelConfig& model, int world_size) {
  const int ep = c.parallel.ep, etp = c.parallel.etp;
  MOETP_CHECK(world_size >= 1 && world_size % (ep * etp) == 0,
              "world size ({}) % (parallel.ep ({}) * parallel.etp ({})) != 0", world_size, ep, etp);
  MOETP_CHECK(model.num_experts % ep == 0, "num_experts ({}) % parallel.ep ({}) != 0", model.num_experts, ep);
  MOETP_CHECK(model.moe_intermediate_size % etp == 0, "moe_intermediate_size ({}) % parallel.etp ({}) != 0",
              model.moe_intermediate_size, etp);
  const int64_t per_step = static_cast<int64_t>(world_size) * c.train.micro_batches;
  MOETP_CHECK(c.train.global_batch_size % per_step == 0,
              "train.global_batch_size ({}) % (world size ({}) * train.micro_batches ({})) != 0",
              c.train.global_batch_size, world_size, c.train.micro_batches);
  MOETP_CHECK(c.train.seq_len <= model.max_position_embeddings,
              "train.seq_len ({}) > max_position_embeddings ({})", c.train.seq_len, model.max_position_embeddings);
}

}  // namespace moetp::config
