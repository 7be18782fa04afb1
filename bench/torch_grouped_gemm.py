#!/usr/bin/env python3
"""PyTorch baseline of bench/grouped_gemm_cuda_bench.cpp: torch._grouped_mm (bf16, f32 accumulation
inside) on the same shapes, group sizes and layouts as moetp's grouped GEMM (kernels/cuda/grouped_gemm.h).

  G = 16 groups, M = 16 x 2048 rows, (N, K) in (384, 2048), (2048, 192), (768, 2048), (2048, 384),
  (1536, 2048), (2048, 768); group sizes balanced (2048 each) or RAGGED (the C++ list, same total)
  x (M, K), w (G, N, K), dy (M, N) bf16, offs = int32 cumulative group ends
  fwd   y  = _grouped_mm(x, w.transpose(-2, -1), offs)          (M, N)
  dgrad dx = _grouped_mm(dy, w, offs)                            (M, K)
  wgrad dw = _grouped_mm(dy.t(), x, offs)                        (G, N, K), reduction over each group's rows
The weight gradient is what autograd of _grouped_mm computes: a fresh bf16 tensor, where moetp
accumulates into an f32 dW (beta = 1); the extra add is not timed here.

Timing (bench/torch_timing.py): per shape, max(2, ceil(4 x L2 / bytes)) sets of (x, w, dy) are
allocated and rotated; after warm-up, --iters calls back to back between two CUDA events (or, with
--cuda-graph, one replay of a CUDA graph holding the --iters calls); ms = elapsed / iters. Printed
and, with --json FILE, written for `grouped_gemm_cuda_bench --torch-results FILE` (keys op, dist, N, K, ms). Before timing, a
small ragged case (an empty group, sizes that are multiples of 16) is checked against a float64
per-group loop (max error under 2e-2 of the largest element).

  python3 bench/torch_grouped_gemm.py [--json torch_gg.json] [--iters 100] [--warmup 10] [--cuda-graph]
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_timing  # noqa: E402

GROUPS, ROWS_PER_GROUP = 16, 2048
RAGGED = [1008, 3104, 2048, 16, 4096, 1504, 2592, 0, 2896, 1808, 2240, 3008, 1200, 2496, 1776, 2976]
SHAPES = [(384, 2048), (2048, 192), (768, 2048), (2048, 384), (1536, 2048), (2048, 768)]


def grouped_mm(a, b, offs):
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None:
        sys.exit("torch._grouped_mm is not available in torch " + torch.__version__)
    return fn(a, b, offs=offs)


def products(x, w, dy, offs):
    return {
        "fwd": lambda: grouped_mm(x, w.transpose(-2, -1), offs),
        "dgrad": lambda: grouped_mm(dy, w, offs),
        "wgrad": lambda: grouped_mm(dy.t(), x, offs),
    }


def self_check(device):
    torch.manual_seed(0)
    counts = [32, 0, 48, 16]
    n, k = 64, 96
    m = sum(counts)
    x = torch.randn(m, k, device=device).bfloat16()
    w = torch.randn(len(counts), n, k, device=device).bfloat16()
    dy = torch.randn(m, n, device=device).bfloat16()
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    got = {name: fn().double() for name, fn in products(x, w, dy, offs).items()}
    ref_y = torch.zeros(m, n, dtype=torch.float64, device=device)
    ref_dx = torch.zeros(m, k, dtype=torch.float64, device=device)
    ref_dw = torch.zeros(len(counts), n, k, dtype=torch.float64, device=device)
    start = 0
    for g, c in enumerate(counts):
        xs, dys, wg = x[start:start + c].double(), dy[start:start + c].double(), w[g].double()
        ref_y[start:start + c] = xs @ wg.t()
        ref_dx[start:start + c] = dys @ wg
        ref_dw[g] = dys.t() @ xs
        start += c
    for name, ref in (("fwd", ref_y), ("dgrad", ref_dx), ("wgrad", ref_dw)):
        err = (got[name] - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)
        if err > 2e-2:
            sys.exit(f"self-check failed: {name} max error {err:.3e}")
    print("self-check vs float64 per-group loop: ok")


def ragged_counts(rows):
    """RAGGED scaled to `rows` per group on average (each size rounded down to a multiple of 16, the
    remainder on group 2), the same list as grouped_gemm_cuda_bench's ragged_counts."""
    c = [v * rows // ROWS_PER_GROUP // 16 * 16 for v in RAGGED]
    c[2] += GROUPS * rows - sum(c)
    return c


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here for grouped_gemm_cuda_bench --torch-results")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--cuda-graph", action="store_true", help="time one replay of a CUDA graph of the --iters calls")
    parser.add_argument("--rows", type=int, default=ROWS_PER_GROUP,
                        help="rows per group (multiple of 16); ragged sizes scaled as grouped_gemm_cuda_bench does")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no GPU")
    assert sum(RAGGED) == GROUPS * ROWS_PER_GROUP
    device = torch.device("cuda")
    self_check(device)
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}; G = {GROUPS}, "
          f"M = {GROUPS * args.rows}; {torch_timing.method(args.iters, args.warmup, args.cuda_graph)} "
          f"(L2 {torch_timing.l2_bytes() / 2**20:.0f} MiB)")
    print(f"{'op':5} {'dist':8} {'N':>5} {'K':>5} | {'ms':>8} {'TFLOP/s':>8} {'sets':>5}")
    results = []
    assert args.rows >= 16 and args.rows % 16 == 0, f"--rows wants a multiple of 16, got {args.rows}"
    m = GROUPS * args.rows
    for n, k in SHAPES:
        n_sets = torch_timing.rotation_sets(2 * (m * k + GROUPS * n * k + m * n))  # bf16 x, w, dy
        gen = torch.Generator(device=device).manual_seed(n * 7919 + k)
        sets = []
        for _ in range(n_sets):
            x = torch.rand(m, k, device=device, generator=gen).mul_(2).sub_(1).bfloat16()
            w = torch.rand(GROUPS, n, k, device=device, generator=gen).mul_(0.1).sub_(0.05).bfloat16()
            dy = torch.rand(m, n, device=device, generator=gen).mul_(2).sub_(1).bfloat16()
            sets.append((x, w, dy))
        flops = 2.0 * m * n * k
        for dist, counts in (("balanced", [args.rows] * GROUPS), ("ragged", ragged_counts(args.rows))):
            offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
            fns = [products(x, w, dy, offs) for x, w, dy in sets]
            for op in fns[0]:
                t = torch_timing.time_loop(lambda i, mark, op=op: fns[i % n_sets][op](), args.iters, args.warmup,
                                           sets=n_sets, graph=args.cuda_graph)
                ms = t.ms
                print(f"{op:5} {dist:8} {n:5d} {k:5d} | {ms:8.3f} {flops / ms * 1e-9:8.1f} {n_sets:5d}", flush=True)
                results.append({"op": op, "dist": dist, "N": n, "K": k, "ms": ms, "tflops": flops / ms * 1e-9,
                                "input_sets": n_sets})
        del sets, fns
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "timing": torch_timing.method(args.iters, args.warmup, args.cuda_graph), "results": results},
                      f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
