#!/usr/bin/env python3
"""PyTorch baseline of bench/moe_layer_cuda_bench.cpp: one Qwen3-MoE layer's MoE block, forward +
backward on one GPU, the same computation and shapes as moetp's CudaMoeLayer (moe/cuda_moe.h).

  bf16 parameters wg (E, H), w13 (E, 2I, H) (gate rows [0, I), up rows [I, 2I)), w2 (E, H, I)
  router in f32: logits = x·wgᵀ, softmax, torch.topk, renormalised top-K weights
  rows sorted by expert, then token, then slot (a stable sort of the flattened expert ids)
  experts: torch._grouped_mm with per-expert end offsets, silu(gate) * up
  combine: index_add of w · y into an f32 (N, H) buffer, rounded to bf16
  backward: autograd from dout (bf16)

Shapes: H = 2048, E = 128, K = 8, N = 8192 tokens, I in (768, 384, 192); routing "random" (random
router weights) or "balanced" (token n slot k -> expert (n·K + k) % E, weight 1/K, no router
gradient). Timing (bench/torch_timing.py): max(2, ceil(4 x L2 / bytes)) (x, dout) sets rotated (with
random routing each set is also a different routing); after warm-up, --iters iterations (forward,
backward) back to back between CUDA events, an event between forward and backward; fwd, bwd and
total ms are means over the iterations. The weights (E·3·I·H bf16, 0.3 to 1.2 GB) are one model,
as in training; they exceed the L2 many times over, so an iteration does not find them there.
Printed per case, the same table as the C++ benchmark. --json FILE writes the numbers for
`moe_layer_cuda_bench --torch-results FILE`.

Before timing, a small case is checked against a float64 reference (per-expert dense loop,
autograd) so that the baseline computes the same function: rel L2 of out, dx, dwg, dw13, dw2 under
5e-2 (see self_check).

  python3 bench/torch_moe_layer.py [--json torch.json] [--iters 50] [--warmup 5] [--tokens 8192]
  python3 bench/torch_moe_layer.py --check-only     # the self-check alone (CPU when no GPU)
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_timing  # noqa: E402

H, E, K = 2048, 128, 8
INTERMEDIATES = (768, 384, 192)


def grouped_mm(a, b, offs):
    """out[rows of g] = a[rows of g] @ b[g]; offs: int32 end offsets of the row groups."""
    if a.is_cuda:
        fn = getattr(torch, "_grouped_mm", None) or F.grouped_mm
        return fn(a, b, offs=offs)
    # CPU (only for --check-only without a GPU): a loop over the groups.
    outs, start = [], 0
    for g, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ b[g])
        start = end
    return torch.cat(outs)


class TorchMoeLayer:
    def __init__(self, H, E, K, I, force_balance, norm_topk_prob=True, seed=0, device="cuda"):
        self.H, self.E, self.K, self.I = H, E, K, I
        self.force_balance, self.norm_topk_prob = force_balance, norm_topk_prob
        g = torch.Generator(device=device).manual_seed(seed)

        def uniform(shape, a):
            w = (torch.rand(shape, generator=g, device=device) * 2 - 1) * a
            return w.to(torch.bfloat16).requires_grad_()

        # Scales as the C++ benchmark: router logits of std ~1 for x ~ U(-1, 1).
        self.wg = uniform((E, H), 3 / H**0.5)
        self.w13 = uniform((E, 2 * I, H), 1 / H**0.5)
        self.w2 = uniform((E, H, I), 1 / I**0.5)
        self._balanced = {}
        self.counts = None

    def params(self):
        return [self.wg, self.w13, self.w2]

    def route(self, x):
        N = x.shape[0]
        logits = x.float() @ self.wg.float().t()  # router in f32
        probs = torch.softmax(logits, dim=-1)
        topk_w, topk_idx = torch.topk(probs, self.K, dim=-1)
        if self.norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
        if self.force_balance:
            if N not in self._balanced:
                idx = (torch.arange(N * self.K, device=x.device) % self.E).view(N, self.K)
                w = torch.full((N, self.K), 1.0 / self.K, device=x.device)
                self._balanced[N] = (idx, w)
            topk_idx, topk_w = self._balanced[N]
        return topk_idx, topk_w

    def forward(self, x):
        N, H, E, K, I = x.shape[0], self.H, self.E, self.K, self.I
        topk_idx, topk_w = self.route(x)
        flat_idx = topk_idx.reshape(-1)
        order = torch.sort(flat_idx, stable=True).indices  # by expert, then token, then slot
        counts = torch.zeros(E, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_idx, torch.ones_like(flat_idx, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        self.counts = counts
        token = order // K
        x_M = x.index_select(0, token)
        h = grouped_mm(x_M, self.w13.transpose(-2, -1), offs)  # (M, 2I)
        a = F.silu(h[:, :I]) * h[:, I:]
        y = grouped_mm(a, self.w2.transpose(-2, -1), offs)  # (M, H)
        w_M = topk_w.reshape(-1)[order]
        out = torch.zeros(N, H, dtype=torch.float32, device=x.device)
        out = out.index_add(0, token, y.float() * w_M.unsqueeze(-1))
        return out.to(torch.bfloat16)


def reference_f64(layer, x, topk_idx):
    """The same layer in float64 with a dense per-expert loop, on the given top-k selection (so that a
    near-tie cannot pick other experts); the routing weights keep their gradient."""
    wg, w13, w2 = (p.detach().double().requires_grad_() for p in layer.params())
    xd = x.detach().double().requires_grad_()
    probs = torch.softmax(xd @ wg.t(), dim=-1)
    topk_w = probs.gather(1, topk_idx)
    if layer.norm_topk_prob:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return experts_dense(xd, topk_idx, topk_w, w13, w2), xd, (wg, w13, w2)


def experts_dense(x, topk_idx, topk_w, w13, w2):
    """out[n] = Σ_k w[n, k] · expert_{idx[n, k]}(x[n]): a dense loop over experts (reference path;
    also used by torch_moe_layer_dist.py). w13 (E, 2I, H) gate | up, w2 (E, H, I)."""
    I = w2.shape[-1]
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        tok, slot = (topk_idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok] @ w13[e].t()
        y = (F.silu(h[:, :I]) * h[:, I:]) @ w2[e].t()
        out = out.index_add(0, tok, y * topk_w[tok, slot].unsqueeze(-1))
    return out


def self_check(device):
    """rel L2 against float64 under 5e-2: a wrong function is off by O(1); bf16 storage of the
    activations and of the gradients (bf16 parameters give bf16 .grad) accounts for about 5e-3 on
    the GPU (measured up to 2e-2 with torch 1.13's CPU bf16 kernels)."""
    N, Hs, Es, Ks, Is = 256, 256, 8, 2, 128
    layer = TorchMoeLayer(Hs, Es, Ks, Is, force_balance=False, seed=1, device=device)
    g = torch.Generator(device=device).manual_seed(2)
    x = ((torch.rand(N, Hs, generator=g, device=device) * 2 - 1)).to(torch.bfloat16).requires_grad_()
    dout = (torch.rand(N, Hs, generator=g, device=device) * 2 - 1).to(torch.bfloat16)
    out = layer.forward(x)
    out.backward(dout)
    topk_idx, _ = layer.route(x.detach())
    ref, xd, (wg, w13, w2) = reference_f64(layer, x, topk_idx)
    ref.backward(dout.double())

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    errs = {"out": rel(out, ref), "dx": rel(x.grad, xd.grad), "dwg": rel(layer.wg.grad, wg.grad),
            "dw13": rel(layer.w13.grad, w13.grad), "dw2": rel(layer.w2.grad, w2.grad)}
    print(f"self-check vs float64 on {device} (N=256 H=256 E=8 K=2 I=128), rel L2: "
          + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v < 5e-2}
    if bad:
        sys.exit(f"self-check failed (limit 5e-2): {bad}")


def case_name(N, I, balanced):
    return f"N{N}_H{H}_E{E}_K{K}_I{I}_{'balanced' if balanced else 'random'}"


def run_case(N, I, balanced, xs, douts, iters, warmup):
    layer = TorchMoeLayer(H, E, K, I, force_balance=balanced, seed=I)
    params = layer.params()

    def step(i, mark):
        for p in params:
            p.grad = None
        x = xs[i % len(xs)]
        x.grad = None
        out = layer.forward(x)
        mark()
        out.backward(douts[i % len(douts)])

    t = torch_timing.time_loop(step, iters, warmup, sets=len(xs), marks=1)
    counts = layer.counts.float()
    imbalance = (counts.max() / counts.mean()).item()
    return t.parts[0], t.parts[1], t.ms, imbalance


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here (for moe_layer_cuda_bench --torch-results)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip-check", action="store_true", help="skip the float64 self-check")
    ap.add_argument("--check-only", action="store_true",
                    help="run only the self-check (on the CPU when there is no GPU)")
    args = ap.parse_args()
    if args.check_only:
        self_check("cuda" if torch.cuda.is_available() else "cpu")
        return
    if not torch.cuda.is_available():
        sys.exit("torch_moe_layer.py needs a CUDA device")
    device = "cuda"
    if not args.skip_check:
        self_check(device)

    N = args.tokens
    g = torch.Generator(device=device).manual_seed(100)
    n_sets = torch_timing.rotation_sets(2 * 2 * N * H)  # bf16 x and dout
    xs = [(torch.rand(N, H, generator=g, device=device) * 2 - 1).to(torch.bfloat16).requires_grad_()
          for _ in range(n_sets)]
    douts = [(torch.rand(N, H, generator=g, device=device) * 2 - 1).to(torch.bfloat16) for _ in range(n_sets)]

    props = torch.cuda.get_device_properties(0)
    print(f"torch_moe_layer: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}; "
          f"N={N} H={H} E={E} K={K}; {torch_timing.method(args.iters, args.warmup)} ({n_sets} sets)")
    print(f"{'case':<36} {'fwd_ms':>8} {'bwd_ms':>8} {'total_ms':>9} {'expert_TFLOP/s':>14} {'tokens/s':>12} "
          f"{'max/mean':>9}")
    results = []
    for I in INTERMEDIATES:
        for balanced in (False, True):
            fwd, bwd, ms, imbalance = run_case(N, I, balanced, xs, douts, args.iters, args.warmup)
            flops = 3 * 2 * N * K * (3 * I * H)
            tflops = flops / (ms * 1e-3) / 1e12
            tokens_per_s = N / (ms * 1e-3)
            name = case_name(N, I, balanced)
            print(f"{name:<36} {fwd:8.3f} {bwd:8.3f} {ms:9.3f} {tflops:14.1f} {tokens_per_s:12.4g} {imbalance:9.2f}",
                  flush=True)
            results.append({"name": name, "fwd_ms": fwd, "bwd_ms": bwd, "ms": ms, "expert_tflops": tflops,
                            "tokens_per_s": tokens_per_s, "max_over_mean_load": imbalance})
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch_version": torch.__version__,
                       "timing": torch_timing.method(args.iters, args.warmup), "input_sets": n_sets,
                       "cases": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
