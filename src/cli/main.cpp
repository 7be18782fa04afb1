// moetp command line: the only place that parses argv. Subcommands dispatch into the library;
// any moetp::Error is printed as "[rank r] message" and the whole MPI job is aborted so that no
// rank waits forever on a peer that failed.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "cli/tools_cmd.h"
#include "git_info.h"
#include "cli/train_cmd.h"
#include "comm/mesh.h"
#include "config/train_config.h"
#include "comm/mpi_comm.h"
#include "core/check.h"
#include "core/log.h"
#include "data/chat.h"
#include "data/corpus.h"
#include "data/hf_tokenizer.h"
#include "data/token_file.h"
#include "data/tokenizer.h"

#ifdef MOETP_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace {

std::string build_info() {
#ifdef MOETP_HAVE_CUDA
  const int gpus = moetp::cuda::device_count();
  return fmt::format("moetp {} (commit {}; backends: cpu, cuda built for sm_90a (Hopper), {} GPU(s) visible)",
                     MOETP_VERSION, MOETP_GIT_COMMIT, gpus);
#else
  return fmt::format("moetp {} (commit {}; backends: cpu; built without CUDA)", MOETP_VERSION, MOETP_GIT_COMMIT);
#endif
}

// Prints every rank's mesh coordinates and group memberships, gathered to rank 0 in rank order.
int run_mesh(moetp::comm::Comm& world, int ep, int etp) {
  moetp::comm::Mesh mesh(world, ep, etp);
  const std::string line = fmt::format(
      "{} | ep_etp rank {}/{} ep rank {}/{} etp rank {}/{} expert_dp rank {}/{}", mesh.describe(),
      mesh.ep_etp().rank(), mesh.ep_etp().size(), mesh.ep().rank(), mesh.ep().size(), mesh.etp().rank(),
      mesh.etp().size(), mesh.expert_dp().rank(), mesh.expert_dp().size());
  // Gather the fixed-width lines as bytes.
  constexpr int64_t kWidth = 160;
  moetp::Tensor mine = moetp::Tensor::zeros({1, kWidth}, moetp::DType::kI32);
  for (size_t i = 0; i < line.size() && i < static_cast<size_t>(kWidth); ++i) mine.data<int32_t>()[i] = line[i];
  moetp::Tensor all = moetp::Tensor::empty({world.size(), kWidth}, moetp::DType::kI32);
  world.all_gather(mine, all);
  if (world.rank() == 0) {
    std::printf("%s\n", build_info().c_str());
    const int32_t* p = all.data<int32_t>();
    for (int r = 0; r < world.size(); ++r) {
      std::string s;
      for (int64_t i = 0; i < kWidth && p[r * kWidth + i] != 0; ++i) s.push_back(static_cast<char>(p[r * kWidth + i]));
      std::printf("%s\n", s.c_str());
    }
  }
  return 0;
}

struct TokenizeArgs {
  moetp::data::CorpusOptions corpus;  // inputs -> dataset folder (data/corpus.h)
  bool print = false;                 // standard input -> ids on standard output
  bool mask = false;                  // with print --chat: also print the loss mask
  bool per_turn = false;              // chat: one sample per assistant turn
  std::string invalid_utf8 = "refuse";
};

// Space-separated values on one line.
template <typename T>
void print_line(const std::vector<T>& values) {
  std::string line;
  for (size_t i = 0; i < values.size(); ++i) {
    fmt::format_to(std::back_inserter(line), "{}{}", i ? " " : "", static_cast<uint64_t>(values[i]));
  }
  std::printf("%s\n", line.c_str());
}

// `moetp tokenize`: inputs to a dataset folder (data/corpus.h), or (--print) all of standard input
// as one text to its ids, space-separated on one line. With --print --chat standard input is one
// JSON conversation (an array of messages or {"messages": [...]}); it is rendered with the chat
// template of tokenizer_config.json and its ids printed, with --mask followed by a line of the 0/1
// loss mask.
int run_tokenize(TokenizeArgs& a) {
  moetp::data::CorpusOptions& c = a.corpus;
  if (!a.print) {
    const std::map<std::string, moetp::data::InvalidUtf8Policy> policies = {
        {"refuse", moetp::data::InvalidUtf8Policy::kRefuse},
        {"replace", moetp::data::InvalidUtf8Policy::kReplace},
        {"skip", moetp::data::InvalidUtf8Policy::kSkip}};
    c.invalid_utf8 = policies.at(a.invalid_utf8);
    c.chat_samples = a.per_turn ? moetp::data::ChatSamples::kPerAssistantTurn : moetp::data::ChatSamples::kWhole;
    const auto start = std::chrono::steady_clock::now();
    auto progress = [&](int64_t done, int64_t total, int64_t records) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double rate = s > 0 ? static_cast<double>(done) / s : 0;
      std::fprintf(stderr, "tokenize: %5.1f%%  %.1f of %.1f MB  %.1f MB/s  %lld records  ETA %.0f s\n",
                   total > 0 ? 100.0 * static_cast<double>(done) / static_cast<double>(total) : 100.0, done / 1e6,
                   total / 1e6, rate / 1e6, static_cast<long long>(records),
                   rate > 0 ? static_cast<double>(total - done) / rate : 0.0);
    };
    const moetp::data::CorpusReport r = moetp::data::tokenize_corpus(c, progress);
    std::string skipped;
    for (const auto& [reason, n] : r.skipped) skipped += fmt::format("{}{} {}", skipped.empty() ? "" : ", ", n, reason);
    std::printf("%s: %lld records from %.1f MB in %.1f s (%.1f MB/s); train %lld documents, %lld tokens (%lld with loss)",
                c.out_dir.c_str(), static_cast<long long>(r.records), r.input_bytes / 1e6, r.seconds,
                r.seconds > 0 ? r.input_bytes / 1e6 / r.seconds : 0.0, static_cast<long long>(r.train_documents),
                static_cast<long long>(r.train_tokens), static_cast<long long>(r.train_loss_tokens));
    if (r.valid_documents > 0) {
      std::printf("; valid %lld documents, %lld tokens (%lld with loss)", static_cast<long long>(r.valid_documents),
                  static_cast<long long>(r.valid_tokens), static_cast<long long>(r.valid_loss_tokens));
    }
    std::printf("; skipped: %s\n", skipped.empty() ? "none" : skipped.c_str());
    return 0;
  }
  std::optional<moetp::data::HfTokenizer> hf;
  if (!c.tokenizer.empty()) hf = moetp::data::HfTokenizer::load(c.tokenizer);
  if (c.chat) {
    MOETP_CHECK(hf.has_value(), "tokenize --chat needs --tokenizer (a tokenizer.json)");
    const std::string config =
        !c.tokenizer_config.empty()
            ? c.tokenizer_config
            : (std::filesystem::path(c.tokenizer).parent_path() / "tokenizer_config.json").string();
    const moetp::data::ChatTemplate chat(config);
    const std::string text{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      MOETP_FAIL("standard input: not valid JSON: {}", e.what());
    }
    const auto messages = moetp::data::parse_messages(j, "standard input");
    const moetp::data::TokenizedChat tokenized = moetp::data::tokenize_chat(*hf, chat.render_chat(messages));
    print_line(tokenized.ids);
    if (a.mask) print_line(tokenized.loss_mask);
    return 0;
  }
  const std::string text{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
  print_line(hf ? hf->encode(text) : moetp::data::encode_bytes(text));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  moetp::comm::MpiRuntime mpi(&argc, &argv);
  int rank = 0;
  try {
    auto world = moetp::comm::MpiComm::world();
    rank = world->rank();
    moetp::log::init(world->rank(), world->size());

    CLI::App app{"moetp: Mixture-of-Experts training with expert parallel x expert tensor parallel"};
    app.require_subcommand(1);
    app.set_version_flag("-V,--version", [] { return build_info(); }, "print the version, commit and backends");
    app.add_subcommand("version", "print the version and the build's backends");
    int ep = 1;
    int etp = 1;
    auto* mesh_cmd = app.add_subcommand("mesh", "print the process mesh of this mpirun job");
    mesh_cmd->add_option("--ep", ep, "expert-parallel degree P")->capture_default_str();
    mesh_cmd->add_option("--etp", etp, "expert tensor-parallel degree T")->capture_default_str();
    moetp::cli::TrainArgs train_args;
    auto* train_cmd = app.add_subcommand("train", "train a Qwen3-MoE model (no arguments: the CPU demo)");
    train_cmd->add_option("--config", train_args.config_files, "training config JSON file(s), applied in order");
    train_cmd->add_option("--set", train_args.overrides, "override one field: --set train.steps=30 (repeatable)");
    train_cmd->add_option("--run-dir", train_args.run_dir, "run directory (default runs/<timestamp>)");
    train_cmd->add_option("--resume", train_args.resume,
                          "resume from a native checkpoint directory, or 'auto' for the latest under the checkpoint root");
    train_cmd->add_option("--init-from-hf", train_args.init_from_hf, "start from a Hugging Face checkpoint directory");
    train_cmd->footer("Config fields (--set key=value):\n" + moetp::config::help_text());
    TokenizeArgs tok_args;
    moetp::data::CorpusOptions& co = tok_args.corpus;
    auto* tok_cmd = app.add_subcommand(
        "tokenize", "tokenize text, JSONL or chat JSONL into a dataset folder, or print the ids of standard input "
                    "(docs/data.md)");
    auto* tok_in = tok_cmd->add_option("inputs", co.inputs,
                                       "files or folders: *.jsonl holds one record per line, any other file is one "
                                       "text document");
    auto* tok_out = tok_cmd->add_option("--out,-o", co.out_dir, "dataset folder to write (atomically)");
    tok_cmd->add_option("--tokenizer", co.tokenizer,
                        "Hugging Face tokenizer.json (byte-level BPE); default: the byte-level tokenizer (vocab 256)");
    tok_cmd->add_option("--tokenizer-config", co.tokenizer_config,
                        "with --chat: tokenizer_config.json holding the chat template (default: beside --tokenizer)");
    auto* tok_print = tok_cmd->add_flag("--print", tok_args.print,
                                        "read all of standard input as one text and print its ids on one line");
    tok_print->excludes(tok_in)->excludes(tok_out);
    auto* tok_chat = tok_cmd->add_flag(
        "--chat", co.chat,
        "chat data: JSONL records {\"messages\": [...]} rendered with the chat template, loss on the assistant turns; "
        "with --print: one JSON conversation from standard input");
    tok_cmd->add_flag("--mask", tok_args.mask, "with --print --chat: print a second line, the 0/1 loss mask of the ids")
        ->needs(tok_chat)
        ->needs(tok_print);
    tok_cmd->add_flag("--per-turn", tok_args.per_turn,
                      "with --chat: one sample per assistant turn (earlier turns keep their reasoning)")
        ->needs(tok_chat);
    tok_cmd->add_option("--text-field", co.text_field, "JSONL field holding a document's text")->capture_default_str();
    tok_cmd->add_option("--eos", co.eos, "token that ends each document (default <|endoftext|>)");
    tok_cmd->add_flag("--split-special-tokens", co.split_special_tokens,
                      "tokenize special tokens inside documents as plain text");
    tok_cmd->add_option("--valid-fraction", co.valid_fraction,
                        "fraction of the records (drawn with --seed) that go to the validation split")
        ->check(CLI::Range(0.0, 0.999999));
    tok_cmd->add_option("--valid", co.valid_inputs, "an input (as given) whose records all go to the validation split");
    tok_cmd->add_option("--seed", co.seed, "seed of the validation draw")->capture_default_str();
    tok_cmd->add_option("--invalid-utf8", tok_args.invalid_utf8, "refuse | replace (by U+FFFD) | skip the record")
        ->check(CLI::IsMember({"refuse", "replace", "skip"}))
        ->capture_default_str();
    tok_cmd->add_flag("--skip-bad-records", co.skip_bad_records,
                      "count and skip JSONL lines that do not parse or lack the field, instead of stopping");
    tok_cmd->add_option("--threads", co.threads, "tokenizer threads (0: one per hardware thread)")->capture_default_str();
    tok_cmd->add_option("--shard-tokens", co.shard_tokens, "tokens per shard file")->capture_default_str();
    tok_cmd->add_flag("--overwrite", co.overwrite, "replace an existing dataset folder");
    tok_cmd->callback([&] {
      if (!tok_args.print && (co.inputs.empty() || co.out_dir.empty())) {
        throw CLI::ValidationError("tokenize", "give INPUT... and --out DIR, or --print");
      }
    });
    std::string inspect_path;
    auto* inspect_cmd = app.add_subcommand("inspect", "list the tensors of a .safetensors file or checkpoint directory");
    inspect_cmd->add_option("path", inspect_path, "file or directory")->required();
    moetp::cli::ConvertArgs conv;
    auto* conv_cmd = app.add_subcommand("convert", "convert a checkpoint between Hugging Face and native formats");
    conv_cmd->add_option("--from", conv.from, "hf | native")->capture_default_str();
    conv_cmd->add_option("--to", conv.to, "hf | native")->capture_default_str();
    conv_cmd->add_option("input", conv.input, "input checkpoint directory")->required();
    conv_cmd->add_option("output", conv.output, "output checkpoint directory (written atomically)")->required();
    conv_cmd->add_option("--ep", conv.ep, "expert-parallel degree to load at")->capture_default_str();
    conv_cmd->add_option("--etp", conv.etp, "expert tensor-parallel degree to load at")->capture_default_str();
    conv_cmd->add_option("--dtype", conv.dtype,
                         "with --to hf: weights dtype: auto (the config's torch_dtype: bfloat16 for Qwen3 releases; "
                         "f32 when it names none) | bf16 | f32")
        ->check(CLI::IsMember({"auto", "bf16", "f32"}))
        ->capture_default_str();
    conv_cmd->add_flag("--allow-nonfinite", conv.allow_nonfinite,
                       "convert weights that hold NaN or Inf (otherwise refused, naming the tensor)");
    conv_cmd->add_flag("--stacked", conv.stacked,
                       "with --to hf: stacked expert tensors (experts.gate_up_proj, experts.down_proj)");
    moetp::cli::EvalArgs ev;
    auto* eval_cmd = app.add_subcommand("eval", "forward only: mean loss and aux loss of a checkpoint on a token file");
    eval_cmd->add_option("--model", ev.model_dir, "HF or native checkpoint directory")->required();
    eval_cmd->add_option("--data", ev.data, "token file")->required();
    eval_cmd->add_option("--seq-len", ev.seq_len, "tokens per sequence")->capture_default_str();
    eval_cmd->add_option("--num-sequences", ev.num_sequences, "first N sequences of the file")->capture_default_str();
    eval_cmd->add_option("--dump-logits", ev.dump_logits, "write the logits to this .safetensors file");
    eval_cmd->add_option("--ep", ev.ep, "expert-parallel degree")->capture_default_str();
    eval_cmd->add_option("--etp", ev.etp, "expert tensor-parallel degree")->capture_default_str();
    eval_cmd->add_flag("--allow-nonfinite", ev.allow_nonfinite,
                       "evaluate weights that hold NaN or Inf (otherwise refused, naming the tensor)");
    eval_cmd->add_option("--dispatcher", ev.dispatcher, moetp::option_choices<moetp::DispatcherKind>())->capture_default_str();
    moetp::cli::PlanArgs plan_args;
    auto* plan_cmd = app.add_subcommand("plan", "per-rank memory at the step's peak for a configuration (no job is run)");
    plan_cmd->add_option("--config", plan_args.config_files, "training config JSON file(s), applied in order");
    plan_cmd->add_option("--set", plan_args.overrides, "override one field: --set train.recompute=layer (repeatable)");
    plan_cmd->add_option("--world", plan_args.world, "ranks (GPUs) of the run")->capture_default_str();
    plan_cmd->add_option("--gpu-mem-gb", plan_args.gpu_mem_gb,
                         "GiB per GPU: whether the plan fits, the largest micro-batch that does, and settings that fit");
    plan_cmd->add_option("--allowance-gb", plan_args.allowance_gb, "CUDA context and allocator slack, GiB")
        ->capture_default_str();
    plan_cmd->add_option("--device", plan_args.device, "cuda | cpu")->capture_default_str();
    try {
      app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
      return rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 1);
    }
    if (app.got_subcommand("version")) {
      if (rank == 0) std::printf("%s\n", build_info().c_str());
      return 0;
    }
    if (app.got_subcommand("mesh")) return run_mesh(*world, ep, etp);
    if (app.got_subcommand("train")) return moetp::cli::run_train(train_args, *world);
    if (app.got_subcommand("inspect")) return rank == 0 ? moetp::cli::run_inspect(inspect_path) : 0;
    if (app.got_subcommand("convert")) return moetp::cli::run_convert(conv, *world);
    if (app.got_subcommand("eval")) return moetp::cli::run_eval(ev, *world);
    if (app.got_subcommand("plan")) return rank == 0 ? moetp::cli::run_plan(plan_args) : 0;
    if (app.got_subcommand("tokenize")) return rank == 0 ? run_tokenize(tok_args) : 0;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d] error: %s\n", rank, e.what());
    std::fflush(stderr);
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    if (size > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    return 1;
  }
}
