// moetp command line: the only place that parses argv. Subcommands dispatch into the library;
// any moetp::Error is printed as "[rank r] message" and the whole MPI job is aborted so that no
// rank waits forever on a peer that failed.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "cli/tools_cmd.h"
#include "cli/train_cmd.h"
#include "comm/mesh.h"
#include "config/train_config.h"
#include "comm/mpi_comm.h"
#include "core/check.h"
#include "core/log.h"
#include "data/chat.h"
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
  return fmt::format("moetp {} (CUDA backend built for sm_90a; {} GPU(s) visible)", MOETP_VERSION, gpus);
#else
  return fmt::format("moetp {} (CPU only: built without CUDA)", MOETP_VERSION);
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
  std::string input, output;     // text file -> token file
  std::string tokenizer;         // tokenizer.json; empty: the byte-level tokenizer
  bool print = false;            // standard input -> ids on standard output
  bool chat = false;             // with print: standard input is a JSON conversation (data/chat.h)
  bool mask = false;             // with chat: also print the loss mask
  std::string tokenizer_config;  // with chat: tokenizer_config.json; empty: the one beside tokenizer.json
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

// `moetp tokenize`: a text file to a token file, or (--print) all of standard input as one text to
// its ids, space-separated on one line. With --chat standard input is one JSON conversation (an
// array of messages or {"messages": [...]}); it is rendered with the chat template of
// tokenizer_config.json and its ids printed, with --mask followed by a line of the 0/1 loss mask.
int run_tokenize(const TokenizeArgs& a) {
  std::optional<moetp::data::HfTokenizer> hf;
  if (!a.tokenizer.empty()) hf = moetp::data::HfTokenizer::load(a.tokenizer);
  if (a.chat) {
    MOETP_CHECK(hf.has_value(), "tokenize --chat needs --tokenizer (a tokenizer.json)");
    const std::string config =
        !a.tokenizer_config.empty()
            ? a.tokenizer_config
            : (std::filesystem::path(a.tokenizer).parent_path() / "tokenizer_config.json").string();
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
  if (a.print) {
    const std::string text{std::istreambuf_iterator<char>(std::cin), std::istreambuf_iterator<char>()};
    print_line(hf ? hf->encode(text) : moetp::data::encode_bytes(text));
    return 0;
  }
  if (hf) {
    std::ifstream in(a.input, std::ios::binary);
    MOETP_CHECK(in.is_open(), "cannot open text file '{}'", a.input);
    const std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    moetp::data::write_token_file(a.output, hf->encode(text), hf->vocab_size());
  } else {
    moetp::data::convert_text_file(a.input, a.output);
  }
  const auto f = moetp::data::TokenFile::open(a.output);
  std::printf("%s: %llu tokens, vocab %u\n", a.output.c_str(), static_cast<unsigned long long>(f.num_tokens()),
              f.vocab_size());
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
    auto* tok_cmd = app.add_subcommand(
        "tokenize", "convert a text file to a token file, or print the ids of standard input (docs/data.md)");
    auto* tok_in = tok_cmd->add_option("input", tok_args.input, "text file");
    auto* tok_out = tok_cmd->add_option("output", tok_args.output, "token file to write (atomically)");
    tok_cmd->add_option("--tokenizer", tok_args.tokenizer,
                        "Hugging Face tokenizer.json (byte-level BPE); default: the byte-level tokenizer (vocab 256)");
    auto* tok_print = tok_cmd->add_flag("--print", tok_args.print,
                                        "read all of standard input as one text and print its ids on one line");
    tok_print->excludes(tok_in)->excludes(tok_out);
    auto* tok_chat = tok_cmd->add_flag("--chat", tok_args.chat,
                                       "with --print: read one JSON conversation (array of messages) and print the "
                                       "ids of its rendering by the chat template");
    tok_chat->needs(tok_print);
    tok_cmd->add_flag("--mask", tok_args.mask, "with --chat: print a second line, the 0/1 loss mask of the ids")
        ->needs(tok_chat);
    tok_cmd->add_option("--tokenizer-config", tok_args.tokenizer_config,
                        "with --chat: tokenizer_config.json holding the chat template (default: beside --tokenizer)")
        ->needs(tok_chat);
    tok_cmd->callback([&] {
      if (!tok_args.print && (tok_args.input.empty() || tok_args.output.empty())) {
        throw CLI::ValidationError("tokenize", "give INPUT and OUTPUT, or --print");
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
