#!/usr/bin/env python3
"""PyTorch baseline of bench/lm_head_cuda_bench.cpp: the LM head and its cross-entropy, forward +
backward, as a PyTorch training loop computes it (Hugging Face transformers' Qwen3-MoE: logits =
F.linear(hidden, weight) in bf16, F.cross_entropy on the logits in f32, mean over the rows), at the
same shape: N 8192 rows, H 2048, V 151,936; the weight requires grad (its gradient accumulates as
the model's does). FLOPs: 6·N·V·H.

Timing (bench/torch_timing.py): max(2, ceil(4 x L2 / bytes)) sets of (hidden, targets) rotated,
the weight shared; after warm-up, --iters iterations back to back between CUDA events.
--json FILE writes {"ms": ...} for `lm_head_cuda_bench --torch-results FILE`.

  python3 bench/torch_lm_head.py [--json torch.json] [--iters 20] [--warmup 3]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_timing  # noqa: E402

N, H, V = 8192, 2048, 151936


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    w = ((torch.rand(V, H, device=dev, generator=g) * 2 - 1) * 0.02).to(torch.bfloat16).requires_grad_()
    set_bytes = N * H * 2 + N * 8
    sets = torch_timing.rotation_sets(set_bytes)
    hs = [(torch.rand(N, H, device=dev, generator=g) * 2 - 1).to(torch.bfloat16).requires_grad_() for _ in range(sets)]
    ts = [torch.randint(0, V, (N,), device=dev, generator=g) for _ in range(sets)]

    def step(i, mark):
        h, t = hs[i % sets], ts[i % sets]
        logits = F.linear(h, w)
        loss = F.cross_entropy(logits.float(), t)
        loss.backward()

    tm = torch_timing.time_loop(step, a.iters, a.warmup, sets=sets)
    flops = 6.0 * N * V * H
    print(f"torch_lm_head: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
          f"{torch_timing.method(a.iters, a.warmup)}")
    print(f"N {N} H {H} V {V}: {tm.ms:.3f} ms, {flops / tm.ms / 1e9:.1f} TFLOP/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"ms": tm.ms, "tflops": flops / tm.ms / 1e9}, f)


if __name__ == "__main__":
    main()
