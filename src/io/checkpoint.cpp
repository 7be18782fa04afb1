#include "io/checkpoint.h"

#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include "io/safetensors.h"

namespace moetp::io {

namespace fs = std::filesystem;

namespace {

enum class Naming { kHfPerExpert, kHfStacked, kNative };

// Rank 0's progress of a long load: a line every 5 s (tensors done, bytes, rate) and a summary.
class Progress {
 public:
  Progress(bool enabled, std::string what, size_t total)
      : enabled_(enabled), what_(std::move(what)), total_(total), start_(std::chrono::steady_clock::now()), last_(start_) {}
  void add(uint64_t bytes) {
    ++done_;
    bytes_ += bytes;
    const auto now = std::chrono::steady_clock::now();
    if (enabled_ && std::chrono::duration<double>(now - last_).count() > 5.0) {
      last_ = now;
      print("");
    }
  }
  void finish() { print(" done"); }

 private:
  void print(const char* suffix) {
    if (!enabled_) return;
    const double s = std::max(1e-9, std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    std::printf("%s: %zu/%zu tensors, %.1f MB (this rank's shards) in %.2f s, %.1f MB/s%s\n", what_.c_str(), done_, total_,
                static_cast<double>(bytes_) / 1e6, s, static_cast<double>(bytes_) / 1e6 / s, suffix);
    std::fflush(stdout);
  }
  bool enabled_;
  std::string what_;
  size_t total_, done_ = 0;
  uint64_t bytes_ = 0;
  std::chrono::steady_clock::time_point start_, last_;
};

// A contiguous range of a parameter's global rows stored as one tensor on disk.
struct Block {
  std::string tensor;
  int64_t first_row = 0;    // global row of the parameter where the block starts
  int64_t rows = 0;
  int64_t stacked = -1;     // >= 0: the block is index `stacked` of dim 0 of a stacked tensor
  Shape disk_shape;         // expected shape of the tensor on disk
};

bool is_expert_w13(const model::ParamDesc& p) { return p.kind == model::ParamKind::kExpert && p.name.ends_with(".w13"); }

// "model.layers.{l}.mlp.experts.w13" -> "model.layers.{l}.mlp.experts."
std::string experts_prefix(const model::ParamDesc& p) { return p.name.substr(0, p.name.rfind('.') + 1); }

std::vector<Block> blocks_of(const model::ParamDesc& p, const config::ModelConfig& cfg, Naming naming,
                             const std::string& prefix) {
  const Shape& g = p.spec.global_shape;
  if (p.kind == model::ParamKind::kReplicated) return {Block{prefix + p.name, 0, g[0], -1, g}};
  const int64_t E = cfg.num_experts, I = cfg.moe_intermediate_size, H = cfg.hidden_size;
  const std::string ex = experts_prefix(p);
  const bool w13 = is_expert_w13(p);
  std::vector<Block> blocks;
  for (int64_t e = 0; e < E; ++e) {
    switch (naming) {
      case Naming::kHfPerExpert:
        if (w13) {
          blocks.push_back({fmt::format("{}{}.gate_proj.weight", ex, e), e * 2 * I, I, -1, {I, H}});
          blocks.push_back({fmt::format("{}{}.up_proj.weight", ex, e), e * 2 * I + I, I, -1, {I, H}});
        } else {
          blocks.push_back({fmt::format("{}{}.down_proj.weight", ex, e), e * H, H, -1, {H, I}});
        }
        break;
      case Naming::kHfStacked:
        blocks.push_back(w13 ? Block{ex + "gate_up_proj", e * 2 * I, 2 * I, e, {E, 2 * I, H}}
                             : Block{ex + "down_proj", e * H, H, e, {E, H, I}});
        break;
      case Naming::kNative:
        blocks.push_back(w13 ? Block{fmt::format("{}{}.{}", prefix, p.name, e), e * 2 * I, 2 * I, -1, {2 * I, H}}
                             : Block{fmt::format("{}{}.{}", prefix, p.name, e), e * H, H, -1, {H, I}});
        break;
    }
  }
  return blocks;
}

void copy_rows_into(const Tensor& src, Tensor& dst, int64_t dst_row) {
  dst.narrow_rows(dst_row, src.rows()).copy_from(src.view(dst.narrow_rows(dst_row, src.rows()).shape()));
}

// Every tensor of `blocks` is in the checkpoint with the shape the model needs.
void check_blocks(const SafetensorsDir& dir, const model::ParamDesc& p, const std::vector<Block>& blocks) {
  for (const Block& b : blocks) {
    MOETP_CHECK(dir.contains(b.tensor), "checkpoint {}: tensor '{}' (for parameter '{}') is missing", dir.dir(),
                b.tensor, p.name);
    const TensorInfo& info = dir.file_of(b.tensor).info(b.tensor);
    MOETP_CHECK(info.shape == b.disk_shape, "checkpoint {}: tensor '{}' has shape {}, the model needs {}",
                dir.file_of(b.tensor).path(), b.tensor, shape_str(info.shape), shape_str(b.disk_shape));
  }
}

// Reads this rank's shard of one parameter (or of a state tensor with the same layout) from
// blocks check_blocks accepted.
Tensor load_shard(const SafetensorsDir& dir, const model::ParamDesc& p, const std::vector<Block>& blocks) {
  Tensor local = Tensor::empty(shard::local_shape(p.spec), DType::kF32);
  if (local.ndim() == 1) {
    local.copy_from(dir.read(blocks.front().tensor));
    return local;
  }
  const shard::ColumnRange cols = shard::column_range(p.spec);
  for (const shard::Run& run : shard::compute_runs(p.spec)) {
    int64_t g = run.global_row, l = run.local_row, left = run.length;
    size_t bi = 0;
    while (left > 0) {
      while (g >= blocks[bi].first_row + blocks[bi].rows) ++bi;
      const Block& b = blocks[bi];
      const int64_t len = std::min(left, b.first_row + b.rows - g);
      Tensor piece;
      if (b.stacked < 0) {
        piece = dir.read_rows(b.tensor, g - b.first_row, len, cols.begin, cols.end);
      } else {
        // dim 0 = expert; the block's rows are dim 1; columns (dim 2) sliced in memory.
        piece = dir.read_rows(b.tensor, b.stacked, 1, g - b.first_row, g - b.first_row + len)
                    .view({len, b.disk_shape[2]})
                    .slice(1, cols.begin, cols.end)
                    .contiguous();
      }
      copy_rows_into(piece, local, l);
      g += len;
      l += len;
      left -= len;
    }
  }
  return local;
}

// The rows [base, base + count) of a parameter's global tensor, all columns, rebuilt on a
// member of the etp group from every TP rank's shard (collective over etp).
Tensor ep_block(const model::ParamDesc& p, const Tensor& local, const comm::Mesh& mesh, const config::ModelConfig& cfg,
                int64_t base, int64_t count) {
  const int T = mesh.etp_size();
  Tensor all = Tensor::empty({T, local.numel()}, DType::kF32);
  mesh.etp().all_gather(local.contiguous().view({1, local.numel()}), all);
  const int64_t ncols = p.spec.global_shape.size() > 1 ? p.spec.global_shape[1] : 1;
  Tensor out = Tensor::zeros({count, ncols}, DType::kF32);
  const auto [d, pp, t_me] = mesh.coords();
  (void)d;
  (void)t_me;
  for (int t = 0; t < T; ++t) {
    const shard::ShardSpec spec =
        is_expert_w13(p) ? shard::w13_spec(cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size,
                                           mesh.ep_size(), pp, T, t)
                         : shard::w2_spec(cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size, mesh.ep_size(),
                                          pp, T, t);
    const shard::ColumnRange cols = shard::column_range(spec);
    const Tensor src = all.narrow_rows(t, 1).view(shard::local_shape(spec));
    for (const shard::Run& run : shard::compute_runs(spec)) {
      out.slice(0, run.global_row - base, run.global_row - base + run.length)
          .slice(1, cols.begin, cols.end)
          .copy_from(src.narrow_rows(run.local_row, run.length));
    }
  }
  return out;
}

std::string file_name(int p, int num_files) {
  return fmt::format("model-{:05d}-of-{:05d}.safetensors", p + 1, num_files);
}

void write_json(const std::string& path, const nlohmann::json& j) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream f(tmp);
    MOETP_CHECK(f.good(), "cannot open {} for writing", tmp);
    f << j.dump(2) << '\n';
    f.flush();
    MOETP_CHECK(f.good(), "write to {} failed", tmp);
  }
  fs::rename(tmp, path);
}

// Slot `slot` of parameter `index` (0: values, k: state k - 1) under checkpoint prefix `prefix`.
struct Source {
  size_t index;
  int slot;
  std::string prefix;
};

// The sources a save writes or a load reads: values, then (with_state) each state slot.
std::vector<Source> sources_of(const model::ParamStore& store, bool with_state) {
  std::vector<Source> out;
  for (size_t i = 0; i < store.num_params(); ++i) out.push_back({i, 0, ""});
  if (!with_state) return out;
  const std::vector<std::string> prefixes = store.state_prefixes();
  for (size_t k = 0; k < prefixes.size(); ++k) {
    for (size_t i = 0; i < store.num_params(); ++i) out.push_back({i, static_cast<int>(k + 1), prefixes[k]});
  }
  return out;
}

// The safetensors dtype of a save and the config.json that describes it.
std::pair<std::string, nlohmann::json> weights_dtype(const config::ModelConfig& cfg, Naming naming,
                                                     const SaveOptions& opts) {
  nlohmann::json config = cfg.to_hf_json();
  if (naming == Naming::kNative) return {"F32", config};
  HfWeightDType w = opts.weights;
  if (w == HfWeightDType::kAuto) {
    const std::string named = cfg.weights_dtype();
    MOETP_CHECK(named.empty() || named == "bfloat16" || named == "float32",
                "the model config names weights of dtype '{}', which moetp cannot write (bfloat16 or float32: "
                "choose one with --dtype)",
                named);
    w = named == "bfloat16" ? HfWeightDType::kBF16 : HfWeightDType::kF32;
  }
  const char* torch_name = w == HfWeightDType::kBF16 ? "bfloat16" : "float32";
  config["torch_dtype"] = torch_name;
  if (config.contains("dtype")) config["dtype"] = torch_name;
  return {w == HfWeightDType::kBF16 ? "BF16" : "F32", config};
}

}  // namespace

std::vector<std::string> hf_side_files(const std::string& dir) {
  std::vector<std::string> out;
  for (const char* name : {"tokenizer.json", "tokenizer_config.json", "generation_config.json",
                           "special_tokens_map.json", "vocab.json", "merges.txt"}) {
    const fs::path p = fs::path(dir) / name;
    if (fs::is_regular_file(p)) out.push_back(p.string());
  }
  return out;
}

namespace {

void save_impl(const model::ParamStore& store, Naming naming, const std::string& dir, const nlohmann::json* state,
               const SaveOptions& opts) {
  const comm::Mesh& mesh = store.mesh();
  comm::Comm& world = mesh.world();
  const config::ModelConfig& cfg = store.config();
  const auto [disk_dtype, config_json] = weights_dtype(cfg, naming, opts);
  for (const std::string& f : opts.files) {
    MOETP_CHECK(fs::is_regular_file(f), "checkpoint {}: file '{}' to copy into it does not exist", dir, f);
  }
  const auto t0 = std::chrono::steady_clock::now();
  const std::string tmp = dir + ".tmp";
  world.run_collectively("checkpoint save (prepare)", [&] {
    if (world.rank() == 0) {
      fs::remove_all(tmp);
      fs::create_directories(tmp);
    }
  });
  world.barrier();

  const std::vector<Source> sources = sources_of(store, state != nullptr);
  const auto [d, p, t] = mesh.coords();
  const bool writer = d == 0 && t == 0;  // writes EP rank p's file; rank 0 also the replicated tensors
  const int64_t L = cfg.num_experts > 0 ? cfg.num_experts / mesh.ep_size() : 0;
  // The tensors this rank writes for a source, in file order; per-expert blocks are rows
  // [base, base + L · rows per expert) of the EP group's gathered rows (ep_block).
  auto ep_rows = [&](const model::ParamDesc& param) { return L * (param.spec.global_shape[0] / cfg.num_experts); };
  auto outputs = [&](const Source& s) {
    const model::ParamDesc& param = store.param(s.index);
    std::vector<Block> blocks = blocks_of(param, cfg, naming, s.prefix);
    if (param.kind == model::ParamKind::kReplicated || naming == Naming::kHfStacked) {
      blocks.resize(world.rank() == 0 ? 1 : 0);  // one whole tensor (stacked: every block names it)
      return blocks;
    }
    const int64_t base = p * ep_rows(param), end = base + ep_rows(param);
    std::erase_if(blocks, [&](const Block& b) { return !writer || b.first_row < base || b.first_row >= end; });
    return blocks;
  };
  uint64_t bytes = 0;
  std::unique_ptr<SafetensorsStreamWriter> out;
  world.run_collectively("checkpoint save (plan)", [&] {
    if (!writer) return;
    std::vector<SafetensorsStreamWriter::Entry> entries;
    for (const Source& s : sources) {
      for (const Block& b : outputs(s)) entries.push_back({b.tensor, b.disk_shape, disk_dtype});
    }
    out = std::make_unique<SafetensorsStreamWriter>(tmp + "/" + file_name(p, mesh.ep_size()), std::move(entries),
                                                    std::map<std::string, std::string>{{"format", "pt"}});
    bytes = out->data_bytes();
  });
  world.run_collectively("checkpoint save (write)", [&] {
    // A failed write is kept until the loop ends, so this rank still joins every collective.
    std::exception_ptr write_error;
    auto write = [&](const Tensor& value) {
      if (write_error) return;
      try {
        out->write_next(value);
      } catch (...) {
        write_error = std::current_exception();
      }
    };
    // One source at a time: host memory holds one shard and one gathered block.
    for (const Source& s : sources) {
      const model::ParamDesc& param = store.param(s.index);
      const std::vector<Block> mine = outputs(s);
      const bool replicated = param.kind == model::ParamKind::kReplicated;
      // No collective for a replicated tensor, unless its state is sharded over the replicas.
      if (replicated && mine.empty() && !store.collective_read(s.index, s.slot)) continue;
      Tensor local = Tensor::empty(shard::local_shape(param.spec), DType::kF32);
      store.read(s.index, s.slot, local);
      if (replicated) {
        if (!mine.empty()) write(local);
      } else if (naming == Naming::kHfStacked) {
        // One tensor holds every expert: gather it whole (on request only; per-expert is the default).
        const Tensor full = shard::gather_full(local, param.spec, mesh.ep_etp());
        if (!mine.empty()) write(full.view(mine.front().disk_shape));
      } else {
        const int64_t base = p * ep_rows(param);
        const Tensor block = ep_block(param, local, mesh, cfg, base, ep_rows(param));
        for (const Block& b : mine) write(block.narrow_rows(b.first_row - base, b.rows));
      }
    }
    if (write_error) std::rethrow_exception(write_error);
    if (out) out->commit();
  });
  world.barrier();
  const uint64_t total = static_cast<uint64_t>(world.all_reduce_scalar(static_cast<int64_t>(bytes), comm::ReduceOp::kSum));

  world.run_collectively("checkpoint save (finish)", [&] {
    if (world.rank() != 0) return;
    IndexFile index;
    index.metadata["total_size"] = total;
    for (const Source& s : sources) {
      const model::ParamDesc& param = store.param(s.index);
      for (const Block& b : blocks_of(param, cfg, naming, s.prefix)) {
        const int ep_rank = param.kind == model::ParamKind::kReplicated || naming == Naming::kHfStacked
                                ? 0
                                : static_cast<int>(b.first_row / (param.spec.global_shape[0] / cfg.num_experts) / L);
        index.weight_map[b.tensor] = file_name(ep_rank, mesh.ep_size());
      }
    }
    write_index(tmp + "/model.safetensors.index.json", index);
    write_json(tmp + "/config.json", config_json);
    bool has_generation_config = false;
    for (const std::string& f : opts.files) {
      const fs::path name = fs::path(f).filename();
      fs::copy_file(f, fs::path(tmp) / name, fs::copy_options::overwrite_existing);
      has_generation_config |= name == "generation_config.json";
    }
    if (naming != Naming::kNative && !has_generation_config) {
      nlohmann::json gen = {{"_from_model_config", true}};
      for (const char* key : {"bos_token_id", "eos_token_id", "pad_token_id"}) {
        if (config_json.contains(key)) gen[key] = config_json.at(key);
      }
      write_json(tmp + "/generation_config.json", gen);
    }
    // Test hooks (tests/e2e/checkpoint_crash.sh): MOETP_TEST_CRASH_IN_SAVE=1 dies with the new
    // checkpoint half-done, =2 between the two renames (the old one moved aside, the new one complete).
    const char* crash = std::getenv("MOETP_TEST_CRASH_IN_SAVE");
    if (crash != nullptr && std::string(crash) == "1") std::_Exit(3);
    if (state != nullptr) write_json(tmp + "/trainer_state.json", *state);  // written last: the completion marker
    const std::string old = dir + ".old";
    fs::remove_all(old);
    if (fs::exists(dir)) fs::rename(dir, old);
    if (crash != nullptr && std::string(crash) == "2") std::_Exit(3);
    fs::rename(tmp, dir);
    fs::remove_all(old);
    if (opts.show_progress) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("saved %s: %zu tensors, %.1f MB in %.2f s (%.1f MB/s)\n", dir.c_str(), index.weight_map.size(),
                  static_cast<double>(total) / 1e6, s, static_cast<double>(total) / 1e6 / std::max(s, 1e-9));
      std::fflush(stdout);
    }
  });
  world.barrier();
}

Naming detect_hf_naming(const SafetensorsDir& dir, const model::ParamStore& store) {
  for (size_t i = 0; i < store.num_params(); ++i) {
    const model::ParamDesc& p = store.param(i);
    if (p.kind != model::ParamKind::kExpert) continue;
    const std::string ex = experts_prefix(p);
    if (dir.contains(ex + "0.gate_proj.weight")) return Naming::kHfPerExpert;
    if (dir.contains(ex + "gate_up_proj")) return Naming::kHfStacked;
    MOETP_FAIL("checkpoint {}: no expert tensors for '{}' (looked for '{}0.gate_proj.weight' and '{}gate_up_proj')",
               dir.dir(), p.name, ex, ex);
  }
  return Naming::kHfPerExpert;
}

// Two collective phases: every rank checks config.json and every tensor it will read (nothing
// written yet, so a bad checkpoint leaves the model as it was on every rank), then reads and
// writes one tensor at a time. An I/O error in the second phase leaves the store partly loaded.
void load_impl(model::ParamStore& store, const std::string& path, bool native) {
  comm::Comm& world = store.mesh().world();
  const config::ModelConfig& cfg = store.config();
  const std::vector<Source> sources = sources_of(store, native);
  std::optional<SafetensorsDir> dir;
  Naming naming = Naming::kNative;
  world.run_collectively(native ? "native checkpoint check" : "HF checkpoint check", [&] {
    MOETP_CHECK(fs::is_directory(path), "checkpoint directory '{}' does not exist", path);
    const config::ModelConfig on_disk = config::ModelConfig::load(path + "/config.json");
    MOETP_CHECK(on_disk.same_model(cfg),
                "checkpoint {}: its config.json describes a different model than the one being loaded "
                "(hidden {} vs {}, layers {} vs {}, experts {} vs {}, vocab {} vs {})",
                path, on_disk.hidden_size, cfg.hidden_size, on_disk.num_hidden_layers, cfg.num_hidden_layers,
                on_disk.num_experts, cfg.num_experts, on_disk.vocab_size, cfg.vocab_size);
    dir.emplace(SafetensorsDir::open(path));
    naming = native ? Naming::kNative : detect_hf_naming(*dir, store);
    for (const Source& s : sources) {
      const model::ParamDesc& p = store.param(s.index);
      check_blocks(*dir, p, blocks_of(p, cfg, naming, s.prefix));
    }
  });
  world.run_collectively(native ? "native checkpoint load" : "HF checkpoint load", [&] {
    Progress progress(world.rank() == 0, "loading " + path, sources.size());
    for (const Source& s : sources) {
      const model::ParamDesc& p = store.param(s.index);
      const Tensor local = load_shard(*dir, p, blocks_of(p, cfg, naming, s.prefix));
      store.write(s.index, s.slot, local);
      progress.add(local.num_bytes());
    }
    progress.finish();
  });
}

}  // namespace

void save_hf(const model::ParamStore& store, const std::string& dir, const SaveOptions& opts) {
  save_impl(store, opts.expert_layout == HfExpertLayout::kStacked ? Naming::kHfStacked : Naming::kHfPerExpert, dir,
            nullptr, opts);
}

void load_hf(model::ParamStore& store, const std::string& dir) { load_impl(store, dir, false); }

void save_native(const model::ParamStore& store, const nlohmann::json& state, const std::string& dir,
                 const SaveOptions& opts) {
  save_impl(store, Naming::kNative, dir, &state, opts);
}

nlohmann::json load_native(model::ParamStore& store, const std::string& dir) {
  const std::string state_path = dir + "/trainer_state.json";
  nlohmann::json state;
  store.mesh().world().run_collectively("native checkpoint state", [&] {
    std::ifstream f(state_path);
    MOETP_CHECK(f.good(), "checkpoint {} is incomplete or not a moetp checkpoint: {} is missing", dir, state_path);
    try {
      state = nlohmann::json::parse(f);
    } catch (const nlohmann::json::exception& e) {
      MOETP_FAIL("{}: invalid JSON: {}", state_path, e.what());
    }
  });
  load_impl(store, dir, true);
  return state;
}

void save_hf(const model::Qwen3MoeModel& model, const std::string& dir, const SaveOptions& opts) {
  save_hf(model::ModelParamStore(model), dir, opts);
}

void load_hf(model::Qwen3MoeModel& model, const std::string& dir) {
  model::ModelParamStore store(model);
  load_hf(store, dir);
}

void save_native(const model::Qwen3MoeModel& model, const std::vector<ExtraState>& extras,
                 const nlohmann::json& state, const std::string& dir, const SaveOptions& opts) {
  save_native(model::ModelParamStore(model, extras), state, dir, opts);
}

nlohmann::json load_native(model::Qwen3MoeModel& model, const std::vector<ExtraState>& extras,
                           const std::string& dir) {
  model::ModelParamStore store(model, extras);
  return load_native(store, dir);
}

std::vector<std::string> list_checkpoints(const std::string& root) {
  std::vector<std::string> out;
  if (!fs::is_directory(root)) return out;
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && name.starts_with("step-") && !name.ends_with(".tmp") && !name.ends_with(".old") &&
        fs::exists(entry.path() / "trainer_state.json")) {
      out.push_back(entry.path().string());
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> recover_checkpoints(const std::string& root) {
  std::vector<std::string> done;
  if (!fs::is_directory(root)) return done;
  auto complete = [](const fs::path& d) {
    std::ifstream f(d / "trainer_state.json");
    if (!f.good()) return false;
    try {
      return nlohmann::json::parse(f).is_object();
    } catch (const nlohmann::json::exception&) {
      return false;
    }
  };
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(root)) entries.push_back(e.path());
  std::sort(entries.begin(), entries.end());
  for (const fs::path& p : entries) {
    const std::string name = p.filename().string();
    if (!name.starts_with("step-") || !(name.ends_with(".tmp") || name.ends_with(".old"))) continue;
    const fs::path target = p.parent_path() / name.substr(0, name.size() - 4);
    const fs::path tmp = fs::path(target.string() + ".tmp"), old = fs::path(target.string() + ".old");
    if (!fs::exists(p)) continue;  // handled with its sibling
    if (!fs::exists(target)) {
      if (fs::is_directory(tmp) && complete(tmp)) {
        fs::rename(tmp, target);
        done.push_back(fmt::format("recovered {} from its completed save {}", target.string(), tmp.string()));
      } else if (fs::is_directory(old) && complete(old)) {
        fs::rename(old, target);
        done.push_back(fmt::format("recovered {} from its previous version {}", target.string(), old.string()));
      }
    }
    if (fs::is_directory(old) && fs::exists(target) && complete(target)) {
      fs::remove_all(old);
      done.push_back(fmt::format("removed {} (superseded by {})", old.string(), target.string()));
    }
  }
  return done;
}

void prune_checkpoints(const std::string& root, int keep) {
  std::vector<std::string> all = list_checkpoints(root);
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i) fs::remove_all(all[i]);
}

}  // namespace moetp::io
