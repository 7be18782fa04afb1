#!/usr/bin/env python3
"""PyTorch baseline of bench/attention_cuda_bench.cpp: causal grouped-query attention forward +
backward with torch.nn.functional.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on
the same shapes and the same layout as moetp's kernels (q, dout (B, S, Q, D), k, v (B, S, G, D),
bf16, passed to SDPA as (B, heads, S, D) views), so the numbers compare one to one.

Shapes (names as in the C++ benchmark): B2_S4096_Q32_G4_D128 (qwen3-30b-a3b attention), the same
at D 64, B1_S32768_Q32_G4_D128 (long fine-tuning sequences), B16_S128_Q4_G2_D16 (configs/tiny-moe.json) and B16_S128_Q4_G2_D64. Per shape one row per
SDPA backend that accepts it (default dispatch, flash, efficient, cudnn; a backend that refuses the
shape is listed as such). Timing (bench/torch_timing.py): max(2, ceil(4 x L2 / bytes)) sets of
(q, k, v, dout) rotated; after warm-up, --iters iterations (forward, out.backward(dout)) back to
back between CUDA events, an event between forward and backward; fwd and bwd ms are the means
over the iterations. FLOPs (causal, as flash-attention
counts them): forward 2·B·Q·S²·D, backward 2.5 times that. --json FILE writes, per shape, the fastest
backend's numbers for `attention_cuda_bench --torch-results FILE`.

Before timing, a small case is checked against a float64 reference (explicit causal softmax with
repeat_interleave'd key/value heads): max error of out, dq, dk, dv under 2e-2 of the largest
element.

  python3 bench/torch_attention.py [--json torch.json] [--iters 50] [--warmup 5]
"""
import argparse
import json
import math
import os
import sys

import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_timing  # noqa: E402

# SDPA explains at length (UserWarning) why a backend refuses a shape; the table says "refused".
warnings.filterwarnings("ignore", category=UserWarning)

SHAPES = [  # name, B, S, Q, G, D
    ("B2_S4096_Q32_G4_D128", 2, 4096, 32, 4, 128),
    ("B2_S4096_Q32_G4_D64", 2, 4096, 32, 4, 64),
    ("B1_S32768_Q32_G4_D128", 1, 32768, 32, 4, 128),
    ("B16_S128_Q4_G2_D16", 16, 128, 4, 2, 16),
    ("B16_S128_Q4_G2_D64", 16, 128, 4, 2, 64),
]


def backends():
    """(name, context factory) per SDPA backend; 'default' lets torch choose."""
    import contextlib
    out = [("default", contextlib.nullcontext)]
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return out
    for name, attr in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                       ("cudnn", "CUDNN_ATTENTION")):
        if hasattr(SDPBackend, attr):
            out.append((name, lambda a=attr: sdpa_kernel(getattr(SDPBackend, a))))
    return out


def make_inputs(B, S, Q, G, D, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def uniform(shape, a):
        return ((torch.rand(shape, generator=g, device=device) * 2 - 1) * a).to(torch.bfloat16)

    # Same ranges as the C++ benchmark: q, k in [-2, 2), v, dout in [-1, 1).
    q = uniform((B, S, Q, D), 2.0).requires_grad_()
    k = uniform((B, S, G, D), 2.0).requires_grad_()
    v = uniform((B, S, G, D), 1.0).requires_grad_()
    dout = uniform((B, S, Q, D), 1.0)
    return q, k, v, dout


def attention(q, k, v):
    """(B, S, H, D) tensors in, (B, S, Q, D) out, through SDPA's (B, H, S, D) layout."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(1, 2)


def self_check(device):
    B, S, Q, G, D = 2, 77, 8, 2, 64
    q, k, v, dout = make_inputs(B, S, Q, G, D, device, seed=1)
    out = attention(q, k, v)
    out.backward(dout)
    got = [out.detach(), q.grad, k.grad, v.grad]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    kr = k64.repeat_interleave(Q // G, dim=2)
    vr = v64.repeat_interleave(Q // G, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q64, kr) / math.sqrt(D)
    mask = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    ref = torch.einsum("bhij,bjhd->bihd", p, vr)
    ref.backward(dout.double())
    want = [ref.detach(), q64.grad, k64.grad, v64.grad]
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        if not err < 2e-2:
            sys.exit(f"self-check failed: {name} max error {err:.3e} of the largest element")
    print("self-check vs float64 reference: ok (out, dq, dk, dv within 2e-2 of the largest element)")


def time_case(B, S, Q, G, D, ctx, iters, warmup):
    one = make_inputs(B, S, Q, G, D, "cuda")
    n_sets = torch_timing.rotation_sets(torch_timing.tensor_bytes(*one))
    sets = [one] + [make_inputs(B, S, Q, G, D, "cuda", seed=s) for s in range(1, n_sets)]

    def step(i, mark):
        q, k, v, dout = sets[i % n_sets]
        q.grad = k.grad = v.grad = None
        out = attention(q, k, v)
        mark()
        out.backward(dout)

    with ctx():
        t = torch_timing.time_loop(step, iters, warmup, sets=n_sets, marks=1)
    return t.parts[0], t.parts[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here (for attention_cuda_bench --torch-results)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        self_check("cpu")
        print("no GPU: self-check only")
        return
    self_check("cuda")
    props = torch.cuda.get_device_properties(0)
    print(f"torch_attention: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}; "
          f"{torch_timing.method(args.iters, args.warmup)}")
    print(f"{'case':<22} {'backend':<9} {'fwd_ms':>8} {'fwd_TF/s':>8} {'bwd_ms':>8} {'bwd_TF/s':>8} {'total_ms':>9}")
    results = []
    for name, B, S, Q, G, D in SHAPES:
        fwd_flops = 2.0 * B * Q * S * S * D
        best = None
        for bname, ctx in backends():
            try:
                fwd_ms, bwd_ms = time_case(B, S, Q, G, D, ctx, args.iters, args.warmup)
            except RuntimeError as e:
                print(f"{name:<22} {bname:<9} refused: {str(e).splitlines()[0][:80]}")
                continue
            total = fwd_ms + bwd_ms
            print(f"{name:<22} {bname:<9} {fwd_ms:8.3f} {fwd_flops / fwd_ms / 1e9:8.1f} {bwd_ms:8.3f} "
                  f"{2.5 * fwd_flops / bwd_ms / 1e9:8.1f} {total:9.3f}", flush=True)
            if best is None or total < best["ms"]:
                best = {"name": name, "backend": bname, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms, "ms": total}
        if best:
            results.append(best)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch_version": torch.__version__,
                       "timing": torch_timing.method(args.iters, args.warmup), "cases": results}, f, indent=2)


if __name__ == "__main__":
    main()
