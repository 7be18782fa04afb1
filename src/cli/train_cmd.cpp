#include "cli/train_cmd.h"

#include <mpi.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>

#include "config/model_config.h"
#include "config/train_config.h"
#include "core/log.h"
#include "data/source.h"
#include "io/checkpoint.h"
#include "train/report.h"
#include "train/stop.h"
#include "train/trainer.h"

namespace moetp::cli {

namespace {

// A relative path that does not exist from the current directory is looked up in the installed
// share folder (<prefix>/bin/moetp -> <prefix>/share/moetp/<path>), so that an installed moetp finds
// its configs and demo corpus from anywhere. Unchanged when neither exists (the caller's error names it).
std::string resolve_path(const std::string& path) {
  namespace fs = std::filesystem;
  if (path.empty() || fs::exists(path) || fs::path(path).is_absolute()) return path;
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return path;
  const fs::path installed = exe.parent_path().parent_path() / "share" / "moetp" / path;
  return fs::exists(installed) ? installed.string() : path;
}

}  // namespace

int run_train(const TrainArgs& args, comm::Comm& world) {
  config::TrainConfig cfg;
  for (const std::string& f : args.config_files) config::apply_json_file(cfg, f);
  for (const std::string& o : args.overrides) config::apply_override(cfg, o);
  if (!args.run_dir.empty()) cfg.run.dir = args.run_dir;
  if (cfg.run.dir.empty()) {
    // Every rank must agree on the directory: rank 0's clock decides.
    Tensor stamp = Tensor::from_vector<int64_t>({static_cast<int64_t>(std::time(nullptr))}, {1});
    world.broadcast(stamp, 0);
    const std::time_t t = static_cast<std::time_t>(stamp.data<int64_t>()[0]);
    char buf[32];
    std::strftime(buf, sizeof(buf), "%Y%m%d-%H%M%S", std::localtime(&t));
    cfg.run.dir = std::string("runs/") + buf;
  }
  cfg.model.config = resolve_path(cfg.model.config);
  cfg.data.path = resolve_path(cfg.data.path);
  config::validate(cfg);
  const config::ModelConfig model_cfg = config::ModelConfig::load(cfg.model.config);
  config::validate_with_model(cfg, model_cfg, world.size());
  MOETP_CHECK(std::filesystem::exists(cfg.data.path),
              "data '{}' not found (data.path: a token file or a dataset folder; run from the repository root, or "
              "--set data.path=...)",
              cfg.data.path);

  const bool lead = world.rank() == 0;
  if (lead) {
    std::printf("moetp train: %d rank(s), model %s, data %s\n", world.size(), cfg.model.config.c_str(),
                cfg.data.path.c_str());
    std::printf("%s", config::format_table(config::rows(cfg)).c_str());
    std::printf("  (dispatcher resolved to '%s'; model: %lld layers, %lld experts, top-%lld, %.2fM parameters, %.2fM active)\n",
                option_name(config::resolved_dispatcher(cfg)).data(), static_cast<long long>(model_cfg.num_hidden_layers),
                static_cast<long long>(model_cfg.num_experts), static_cast<long long>(model_cfg.num_experts_per_tok),
                static_cast<double>(model_cfg.num_params()) / 1e6, static_cast<double>(model_cfg.num_active_params()) / 1e6);
    std::filesystem::create_directories(cfg.run.dir);
    nlohmann::json saved = {{"train", config::to_json(cfg)}, {"model", model_cfg.to_hf_json()}, {"world_size", world.size()}};
    std::ofstream(cfg.run.dir + "/config.json") << saved.dump(2) << '\n';
    std::fflush(stdout);
  }

  // A failure on one rank must stop every rank. The trainer (and its NCCL communicators) stays
  // alive while this rank aborts the job: destroying NCCL communicators needs the other ranks,
  // which are waiting in a collective for this one, so unwinding first would hang the job.
  std::unique_ptr<train::Trainer> trainer_ptr;
  try {
    data::DataOptions data_opt;
    data_opt.path = cfg.data.path;
    data_opt.seq_len = cfg.train.seq_len;
    data_opt.global_batch_size = cfg.train.global_batch_size;
    data_opt.seed = static_cast<uint64_t>(cfg.train.seed);
    data_opt.overlong = cfg.data.overlong;
    trainer_ptr = std::make_unique<train::Trainer>(cfg, model_cfg, world, data::open_train_data(data_opt));
    train::Trainer& trainer = *trainer_ptr;
    if (lead) {
      std::printf("data: %s\n", trainer.data().describe().c_str());
      if (trainer.validation_data() != nullptr) {
        std::printf("validation: %s\n", trainer.validation_data()->describe().c_str());
      }
      std::printf("device: %s (%s)\n", device_name(trainer.device()).data(), trainer.device_reason().c_str());
      std::printf("memory plan: %.2f GiB per rank at the step's peak (moetp plan for the items)\n",
                  trainer.memory_plan().peak_bytes / (1024.0 * 1024.0 * 1024.0));
      std::fflush(stdout);
    }
    const std::string ckpt_root = cfg.checkpoint.dir.empty() ? cfg.run.dir + "/checkpoints" : cfg.checkpoint.dir;
    MOETP_CHECK(args.resume.empty() || args.init_from_hf.empty(), "--resume and --init-from-hf exclude each other");
    if (!args.init_from_hf.empty()) {
      trainer.init_from_hf(args.init_from_hf);
      if (lead) std::printf("initialised from Hugging Face checkpoint %s\n", args.init_from_hf.c_str());
    }
    if (!args.resume.empty()) {
      std::string dir = args.resume;
      if (dir == "auto") {
        if (lead) {
          for (const std::string& line : io::recover_checkpoints(ckpt_root)) std::printf("%s\n", line.c_str());
        }
        world.barrier();
        const std::vector<std::string> all = io::list_checkpoints(ckpt_root);
        dir = all.empty() ? "" : all.back();
        if (lead && dir.empty()) std::printf("--resume auto: no checkpoint under %s, starting from step 0\n", ckpt_root.c_str());
      }
      if (!dir.empty()) {
        trainer.load_checkpoint(dir);
        if (lead) std::printf("resumed from %s at step %lld\n", dir.c_str(), static_cast<long long>(trainer.current_step()));
        if (trainer.current_step() >= cfg.train.steps) {
          if (lead) {
            std::printf("nothing to do: the checkpoint is at step %lld and train.steps = %d; to train further, raise "
                        "it (e.g. --set train.steps=%lld; the learning-rate schedule is stretched to the new length)\n",
                        static_cast<long long>(trainer.current_step()), cfg.train.steps,
                        static_cast<long long>(trainer.current_step() + cfg.train.steps));
          }
          return 0;
        }
      }
    }
    std::unique_ptr<train::MetricsWriter> metrics;
    if (lead) metrics = std::make_unique<train::MetricsWriter>(cfg.run.dir + "/metrics.jsonl");
    std::vector<train::StepResult> history;
    const auto start = std::chrono::steady_clock::now();
    train::install_stop_handlers();
    // Test hook (tests/e2e/graceful_stop.sh): the last rank signals itself after this step.
    const char* signal_at = std::getenv("MOETP_TEST_SIGNAL_AT_STEP");
    int stopped_by = 0;  // the signal of an agreed stop request, on every rank
    while (trainer.current_step() < cfg.train.steps) {
      train::StepResult r = trainer.step();
      if (signal_at != nullptr && r.step == std::atoll(signal_at) && world.rank() == world.size() - 1) {
        std::raise(SIGUSR1);
      }
      // Any rank's stop request stops all: agreed on after every step (one scalar all-reduce).
      stopped_by = static_cast<int>(
          world.all_reduce_scalar(static_cast<int64_t>(train::stop_signal()), comm::ReduceOp::kMax));
      const bool save = (cfg.checkpoint.every > 0 &&
                         (r.step % cfg.checkpoint.every == 0 || r.step == cfg.train.steps)) ||
                        stopped_by != 0;
      if (save) {
        trainer.save_checkpoint(fmt::format("{}/step-{:08d}", ckpt_root, r.step));
        if (lead) io::prune_checkpoints(ckpt_root, cfg.checkpoint.keep);
      }
      std::optional<train::EvalResult> ev;
      if (cfg.train.eval_every > 0 && (r.step % cfg.train.eval_every == 0 || r.step == cfg.train.steps)) {
        ev = trainer.evaluate();
      }
      if (!lead) {
        if (stopped_by != 0) break;
        continue;
      }
      metrics->write(r);
      if (ev) metrics->write(*ev);
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (r.step == 1 || r.step % cfg.train.log_every == 0 || r.step == cfg.train.steps) {
        std::printf("%s\n", train::progress_line(r, cfg.train.steps, elapsed).c_str());
        if (history.empty() && r.peak_mem_gb >= 0) std::printf("%s\n", trainer.memory_line(r).c_str());
      }
      if (ev) std::printf("%s\n", train::eval_line(*ev).c_str());
      std::fflush(stdout);
      history.push_back(std::move(r));
      if (stopped_by != 0) break;
    }
    if (stopped_by != 0 && trainer.current_step() < cfg.train.steps) {
      if (lead) {
        if (!history.empty()) {
          train::write_loss_svg(cfg.run.dir + "/loss.svg", history);
          train::write_expert_load_svg(cfg.run.dir + "/expert_load.svg", history);
        }
        std::printf("stopped by signal %d (%s) after step %lld of %d; checkpoint %s/step-%08lld; continue with "
                    "--resume auto (exit status %d)\n",
                    stopped_by, strsignal(stopped_by), static_cast<long long>(trainer.current_step()), cfg.train.steps,
                    ckpt_root.c_str(), static_cast<long long>(trainer.current_step()), train::kExitStopped);
        std::fflush(stdout);
      }
      return train::kExitStopped;
    }
    if (lead && !history.empty()) {
      train::write_loss_svg(cfg.run.dir + "/loss.svg", history);
      train::write_expert_load_svg(cfg.run.dir + "/expert_load.svg", history);
      std::printf("done: loss %.4f -> %.4f over %lld steps; run directory %s (metrics.jsonl, loss.svg, expert_load.svg)\n",
                  history.front().loss, history.back().loss, static_cast<long long>(history.size()), cfg.run.dir.c_str());
    }
  } catch (const std::exception& e) {
    if (world.size() > 1) {
      std::fprintf(stderr, "[rank %d] error: %s\n", world.rank(), e.what());
      std::fflush(stderr);
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
    throw;
  }
  return 0;
}

}  // namespace moetp::cli
