#include "train/report.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>

namespace moetp::train {

MetricsWriter::MetricsWriter(const std::string& path) : out_(path, std::ios::app), path_(path) {
  MOETP_CHECK(out_.good(), "cannot open {} for writing", path);
}

void MetricsWriter::write(const StepResult& r) {
  nlohmann::json j = {{"step", r.step},
                      {"loss", r.loss},
                      {"ce_loss", r.ce_loss},
                      {"aux_loss", r.aux_loss},
                      {"grad_norm", r.grad_norm},
                      {"lr", r.lr},
                      {"tokens_per_s", r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0},
                      {"seconds", r.seconds},
                      {"model_tflops_per_rank", r.model_tflops_per_rank},
                      {"loss_tokens", r.loss_tokens},
                      {"padding", r.padding},
                      {"epoch", r.epoch},
                      {"expert_counts", r.expert_counts}};
  if (r.peak_mem_gb >= 0) j["peak_mem_gb"] = r.peak_mem_gb;
  if (!r.peak_mem_phase.empty()) j["peak_mem_phase"] = r.peak_mem_phase;
  if (r.device_mem_gb >= 0) j["device_mem_gb"] = r.device_mem_gb;
  out_ << j.dump() << '\n';
  out_.flush();
  MOETP_CHECK(out_.good(), "write to {} failed", path_);
}

void MetricsWriter::write(const EvalResult& r) {
  const nlohmann::json j = {{"step", r.step},
                            {"eval_loss", r.ce_loss},
                            {"eval_loss_tokens", r.loss_tokens},
                            {"eval_batches", r.batches},
                            {"eval_seconds", r.seconds}};
  out_ << j.dump() << '\n';
  out_.flush();
  MOETP_CHECK(out_.good(), "write to {} failed", path_);
}

namespace {

std::string svg_open(int w, int h) {
  return fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" "
      "font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      w, h);
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  MOETP_CHECK(f.good(), "cannot open {} for writing", path);
  f << text;
  MOETP_CHECK(f.good(), "write to {} failed", path);
}

// Polyline of ys over xs in the box (x0, y0, w, h) with the given value range.
std::string polyline(const std::vector<double>& xs, const std::vector<double>& ys, double xmin, double xmax,
                     double ymin, double ymax, int x0, int y0, int w, int h, const char* color) {
  std::string pts;
  for (size_t i = 0; i < xs.size(); ++i) {
    const double px = x0 + (xmax > xmin ? (xs[i] - xmin) / (xmax - xmin) : 0.5) * w;
    const double py = y0 + h - (ymax > ymin ? (ys[i] - ymin) / (ymax - ymin) : 0.5) * h;
    pts += fmt::format("{:.1f},{:.1f} ", px, py);
  }
  return fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n", color, pts);
}

}  // namespace

void write_loss_svg(const std::string& path, const std::vector<StepResult>& history) {
  constexpr int kW = 740, kH = 400, kX0 = 60, kY0 = 30, kPw = 620, kPh = 320;
  std::vector<double> xs, loss, aux;
  for (const StepResult& r : history) {
    xs.push_back(static_cast<double>(r.step));
    loss.push_back(r.loss);
    aux.push_back(r.aux_loss);
  }
  std::string s = svg_open(kW, kH);
  s += fmt::format("<text x=\"{}\" y=\"18\" font-size=\"14\">training loss (blue) and aux loss (orange, own scale)</text>\n", kX0);
  s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#888\"/>\n", kX0, kY0, kPw, kPh);
  if (!xs.empty()) {
    const auto [lmin, lmax] = std::minmax_element(loss.begin(), loss.end());
    const auto [amin, amax] = std::minmax_element(aux.begin(), aux.end());
    s += polyline(xs, loss, xs.front(), xs.back(), *lmin, *lmax, kX0, kY0, kPw, kPh, "#1f77b4");
    s += polyline(xs, aux, xs.front(), xs.back(), *amin, *amax, kX0, kY0, kPw, kPh, "#ff7f0e");
    s += fmt::format("<text x=\"4\" y=\"{}\" fill=\"#1f77b4\">{:.3f}</text>\n<text x=\"4\" y=\"{}\" fill=\"#1f77b4\">{:.3f}</text>\n",
                     kY0 + 10, *lmax, kY0 + kPh, *lmin);
    s += fmt::format("<text x=\"{}\" y=\"{}\" fill=\"#ff7f0e\">{:.3f}</text>\n<text x=\"{}\" y=\"{}\" fill=\"#ff7f0e\">{:.3f}</text>\n",
                     kX0 + kPw + 4, kY0 + 10, *amax, kX0 + kPw + 4, kY0 + kPh, *amin);
    s += fmt::format("<text x=\"{}\" y=\"{}\">step {}</text>\n<text x=\"{}\" y=\"{}\">step {}</text>\n", kX0, kY0 + kPh + 16,
                     history.front().step, kX0 + kPw - 50, kY0 + kPh + 16, history.back().step);
  }
  write_file(path, s + "</svg>\n");
}

void write_expert_load_svg(const std::string& path, const std::vector<StepResult>& history) {
  const size_t num_layers = history.empty() ? 0 : history.front().expert_counts.size();
  const size_t num_experts = num_layers == 0 ? 0 : history.front().expert_counts.front().size();
  constexpr int kCellH = 8, kX0 = 60, kPw = 620, kGap = 40;
  const int cell_w = history.empty() ? 1 : std::max(1, kPw / static_cast<int>(history.size()));
  const int panel_h = static_cast<int>(num_experts) * kCellH;
  const int height = 40 + static_cast<int>(num_layers) * (panel_h + kGap);
  std::string s = svg_open(kX0 + kPw + 40, std::max(height, 80));
  s += fmt::format("<text x=\"{}\" y=\"18\" font-size=\"14\">tokens per expert (rows) over steps (columns); darker = more; "
                   "even load = mid grey</text>\n", kX0);
  if (num_layers == 0) s += "<text x=\"60\" y=\"50\">no MoE layers</text>\n";
  for (size_t l = 0; l < num_layers; ++l) {
    const int y0 = 40 + static_cast<int>(l) * (panel_h + kGap);
    s += fmt::format("<text x=\"4\" y=\"{}\">MoE {}</text>\n<text x=\"4\" y=\"{}\" font-size=\"10\">e0..e{}</text>\n",
                     y0 + 12, l, y0 + 26, num_experts - 1);
    for (size_t i = 0; i < history.size(); ++i) {
      const std::vector<float>& c = history[i].expert_counts[l];
      double total = 0;
      for (float v : c) total += v;
      for (size_t e = 0; e < c.size(); ++e) {
        // share relative to an even split: 0 -> white, even -> mid grey, >= 2x even -> black
        const double rel = total > 0 ? c[e] * static_cast<double>(c.size()) / total : 0.0;
        const int shade = 255 - static_cast<int>(std::min(1.0, rel / 2.0) * 255.0);
        s += fmt::format("<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"rgb({},{},{})\"/>\n",
                         kX0 + static_cast<int>(i) * cell_w, y0 + static_cast<int>(e) * kCellH, cell_w, kCellH, shade,
                         shade, shade);
      }
    }
  }
  write_file(path, s + "</svg>\n");
}

std::string progress_line(const StepResult& r, int64_t total_steps, double elapsed_s) {
  const double rate = r.seconds > 0 ? static_cast<double>(r.tokens) / r.seconds : 0.0;
  const double per_step = r.step > 0 ? elapsed_s / static_cast<double>(r.step) : 0.0;
  const int64_t eta = static_cast<int64_t>(per_step * static_cast<double>(total_steps - r.step));
  const std::string mem = r.peak_mem_gb >= 0 ? fmt::format(" | {:.1f} GB/GPU", r.peak_mem_gb) : "";
  // Below 1 TFLOP/s (small models, the CPU) in GFLOP/s, so the column is never a bare 0.0.
  const std::string flops = r.model_tflops_per_rank >= 1.0
                                ? fmt::format("{:.1f} TFLOP/s/rank", r.model_tflops_per_rank)
                                : fmt::format("{:.2f} GFLOP/s/rank", r.model_tflops_per_rank * 1000.0);
  const std::string pad =
      r.padding > 0 && r.tokens > 0
          ? fmt::format(" | pad {:.1f}%", 100.0 * static_cast<double>(r.padding) / static_cast<double>(r.tokens))
          : "";
  return fmt::format(
      "step {:>5}/{} | loss {:.4f} | aux {:.4f} | grad {:.3f} | lr {:.2e} | {:.1f}k tok/s | {}{}{} | ETA {}m{:02}s",
      r.step, total_steps, r.loss, r.aux_loss, r.grad_norm, r.lr, rate / 1000.0, flops, mem, pad, eta / 60, eta % 60);
}

std::string eval_line(const EvalResult& r) {
  return fmt::format("eval  {:>5} | valid loss {:.4f} (ppl {:.2f}) over {} targets in {} batches | {:.1f}s", r.step,
                     r.ce_loss, std::exp(std::min(r.ce_loss, 50.0)), r.loss_tokens, r.batches, r.seconds);
}

}  // namespace moetp::train
