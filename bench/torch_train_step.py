#!/usr/bin/env python3
"""PyTorch / Hugging Face baseline of bench/train_step_cuda_bench.cpp: one full training step of
Qwen3MoeForCausalLM on one GPU, the same configurations and shapes as the C++ benchmark.

  model:  transformers' Qwen3MoeForCausalLM from the same config.json (Qwen3MoeConfig.from_json_file,
          random init after torch.manual_seed), bf16 parameters on cuda, attn_implementation="sdpa",
          experts implementation "grouped_mm" when transformers supports it (--experts-impl; the
          implementation that ran is printed), output_router_logits=True so .loss includes
          router_aux_loss_coef · aux loss (the coefficient from the config)
  step:   optimizer.zero_grad(set_to_none=True); loss = model(input_ids, labels=input_ids).loss;
          loss.backward(); torch.optim.AdamW(fused=True, lr=1e-4, betas (0.9, 0.95), eps 1e-8,
          weight_decay 0.1).step()
  tokens: uniform ids < vocab, (B, S), fixed seed, the same every step. labels=input_ids: HF shifts
          internally, so each sequence has S - 1 targets (moetp: S targets from B·(S+1) tokens);
          the cost difference is negligible.
  timing: bench/torch_timing.py: --warmup steps, then --steps steps back to back between two CUDA
          events, ms = elapsed / steps. The same tokens every step: a step reads the model, its
          gradients and the AdamW state (GBs for qwen3-30b-a3b-l4), so the L2 holds nothing of the
          previous step and rotating the token ids would change nothing (tiny-moe fits in the L2
          whatever the tokens: a latency case, on both sides). Peak memory from
          torch.cuda.max_memory_allocated over the whole case (model build, warm-up, timed steps).

NOTE: torch keeps bf16 master weights and bf16 AdamW state (fused AdamW on the bf16 parameters,
bf16 gradients), while moetp keeps f32 masters, f32 moments and f32 gradients: torch does less
optimizer work and holds less memory per parameter.

Cases (same names as the C++ program, <config stem>_B<B>_S<S>):
  configs/tiny-moe.json          S = 128,  B = 16
  configs/qwen3-30b-a3b-l4.json  S = 4096, B = 2   (8192 tokens)
--config (repeatable) replaces the list; --seq-len / --batch override S / B of every case (a
--config without them gets S = 128, B = 16, except the two default files).

  python3 bench/torch_train_step.py [--json torch_step.json] [--steps 20] [--warmup 3]
  ./build/bench/train_step_cuda_bench --torch-results torch_step.json
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_timing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = ("configs/tiny-moe.json", "configs/qwen3-30b-a3b-l4.json")
MODEL_SEED, TOKEN_SEED, LR = 1234, 4321, 1e-4


def stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def default_shape(path):
    """(S, B) of a config file: the two default cases by file name, else S = 128, B = 16."""
    return (4096, 2) if stem(path) == "qwen3-30b-a3b-l4" else (128, 16)


def make_cases(args):
    paths = args.config or [p if os.path.exists(p) else os.path.join(REPO, p) for p in DEFAULT_CONFIGS]
    cases = []
    for p in paths:
        S, B = default_shape(p)
        if args.seq_len:
            S = args.seq_len
        if args.batch:
            B = args.batch
        cases.append((p, S, B, f"{stem(p)}_B{B}_S{S}"))
    return cases


def build_model(path, experts_impl):
    """Returns (model, experts implementation that ran, attention implementation)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig.from_json_file(path)
    config.output_router_logits = True
    config.use_cache = False
    torch.manual_seed(MODEL_SEED)

    def construct(extra):
        with torch.device("cuda"):
            try:
                return Qwen3MoeForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.bfloat16,
                                                        **extra)
            except TypeError:  # older spelling of the dtype argument
                return Qwen3MoeForCausalLM._from_config(config, attn_implementation="sdpa",
                                                        torch_dtype=torch.bfloat16, **extra)

    model, impl_note = None, "default"
    if experts_impl and experts_impl != "default":
        try:
            model = construct({"experts_implementation": experts_impl})
        except Exception as e:  # noqa: BLE001 - any failure: fall back to transformers' default
            print(f"  experts_implementation={experts_impl!r} at construction failed ({type(e).__name__}: {e}); "
                  f"trying set_experts_implementation / the default", flush=True)
            model = None
        if model is None:
            model = construct({})
            try:
                if hasattr(model, "set_experts_implementation"):
                    model.set_experts_implementation(experts_impl)
                else:
                    model.config._experts_implementation = experts_impl
            except Exception as e:  # noqa: BLE001
                print(f"  could not select experts implementation {experts_impl!r} "
                      f"({type(e).__name__}: {e}); running the default", flush=True)
    else:
        model = construct({})
    model = model.to(device="cuda", dtype=torch.bfloat16)
    model.train()
    impl = getattr(model.config, "_experts_implementation", None)
    impl_note = impl if impl else "default (transformers has no experts implementation switch)"
    attn = getattr(model.config, "_attn_implementation", "?")
    return model, impl_note, attn


def run_case(path, S, B, steps, warmup, experts_impl):
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model, impl, attn = build_model(path, experts_impl)
    cfg = model.config
    g = torch.Generator(device="cuda").manual_seed(TOKEN_SEED)
    input_ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g, device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)

    losses = []

    def step(i, mark):
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=input_ids, labels=input_ids, output_router_logits=True, use_cache=False)
        out.loss.backward()
        opt.step()
        if i >= warmup:
            losses.append(out.loss.detach())

    ms = torch_timing.time_loop(step, steps, warmup).ms
    peak_gb = torch.cuda.max_memory_allocated() / 1e9
    n_params = sum(p.numel() for p in model.parameters())
    del opt, model
    return {"ms": ms, "tokens_per_s": B * S / (ms * 1e-3), "peak_mem_gb": peak_gb,
            "loss_first": losses[0].item(), "loss_last": losses[-1].item(), "params": n_params,
            "experts_implementation": impl, "attn_implementation": attn}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here (for train_step_cuda_bench --torch-results)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--config", action="append", help="config.json (repeatable; replaces the default cases)")
    ap.add_argument("--seq-len", type=int, default=0)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--experts-impl", default="grouped_mm",
                    help="transformers experts implementation to request ('default' for transformers' default)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("torch_train_step.py needs a CUDA device")
    import transformers

    props = torch.cuda.get_device_properties(0)
    print(f"torch_train_step: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"transformers {transformers.__version__}; one step = zero_grad + forward(loss incl. aux) + backward + "
          f"fused AdamW (lr {LR}); {torch_timing.step_method(args.steps, args.warmup)}")
    print("note: torch keeps bf16 master weights and bf16 AdamW state; moetp keeps f32 masters, moments and "
          "gradients, so torch does less optimizer work")
    print(f"{'case':<28} {'ms':>10} {'tokens/s':>12} {'peak_GB':>9} {'loss_first':>11} {'loss_last':>11}  "
          f"experts_impl / attn")
    results = []
    for path, S, B, name in make_cases(args):
        try:
            r = run_case(path, S, B, args.steps, args.warmup, args.experts_impl)
        except torch.cuda.OutOfMemoryError as e:
            peak = torch.cuda.max_memory_allocated() / 1e9
            print(f"{name:<28} FAILED: out of memory (peak {peak:.2f} GB): {str(e).splitlines()[0]}", flush=True)
            results.append({"case": name, "ms": None, "tokens_per_s": None, "peak_mem_gb": peak,
                            "error": "out of memory"})
            torch.cuda.empty_cache()
            continue
        flag = "" if math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) else "  NON-FINITE LOSS"
        print(f"{name:<28} {r['ms']:10.2f} {r['tokens_per_s']:12.4g} {r['peak_mem_gb']:9.2f} "
              f"{r['loss_first']:11.5f} {r['loss_last']:11.5f}  {r['experts_implementation']} / "
              f"{r['attn_implementation']}{flag}", flush=True)
        results.append({"case": name, "batch": B, "seq_len": S, **r})
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch_version": torch.__version__,
                       "transformers_version": transformers.__version__,
                       "timing": torch_timing.step_method(args.steps, args.warmup),
                       "note": "torch: bf16 master weights and bf16 AdamW state (fused AdamW on bf16 params)",
                       "cases": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
