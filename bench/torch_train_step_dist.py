#!/usr/bin/env python3
"""PyTorch multi-GPU baseline: one full training step of a plain-PyTorch Qwen3-MoE decoder with
expert parallelism (EP, P ranks) x expert tensor parallelism (ETP, T ranks) x D data-parallel
replicas, the routed experts running through the `all2all` dispatcher of
bench/torch_moe_layer_dist.py (imported from the file beside this one; see its docstring for the
mesh, the shards and the collectives).

Model (written here, no transformers), from a Hugging Face Qwen3-MoE config.json
(configs/qwen3-30b-a3b-l4.json, configs/tiny-moe.json; num_experts or num_local_experts,
rope_theta or rope_parameters.rope_theta; sliding window, rope scaling and attention bias are
rejected), bf16 parameters:
  x = embed_tokens[ids]
  per layer: h = RMSNorm(x); attention: q/k/v projections (no bias), per-head RMSNorm of q and k
             over head_dim (q_norm, k_norm), RoPE (theta from the config, HF rotate_half form,
             cos/sin computed in f32 and rounded to bf16), F.scaled_dot_product_attention(
             is_causal=True, enable_gqa=True), o projection; x = x + attn
             h = RMSNorm(x); MoE block: router logits = h·wgᵀ in f32, softmax, top-K,
             renormalised when norm_topk_prob (--routing balanced: token n slot k -> expert
             (n·K + k) % E, weight 1/K), routed experts sharded over (ep, etp) with the all2all
             dispatcher; x = x + moe (layers in mlp_only_layers, or not a multiple of
             decoder_sparse_step, get a replicated dense SwiGLU MLP of intermediate_size)
  RMSNorm (eps from the config, computed in f32, weight applied in bf16 as HF does), lm_head
  (or the embedding when tie_word_embeddings), cross-entropy in f32, mean over the rank's B·S
  targets; plus router_aux_loss_coef x the HF load-balancing loss (Qwen3-MoE's
  load_balancing_loss_func: E · Σ_{k,e} f[k,e] · P[e] with f = fraction of (layer, token) rows
  whose slot k picked expert e and P = mean router probability, both over all MoE layers),
  computed on the GLOBAL batch as etp_spec §5.2 describes: f is all-reduced (mean over ranks, no
  gradient, one small all_reduce per step) and P is the rank's own mean, so that the mean over
  ranks of the per-rank losses is the global aux loss. --aux-loss off drops it.
Initialisation: normal(0, initializer_range) for replicated matrices (same seed on every rank),
  norms ones; experts U(-a, a) with a = initializer_range·√3, each global expert from its own seed
  and every rank cutting its shard out of it: the same global model whatever the layout, so the
  first step's loss agrees across layouts (printed as loss_first, global mean over ranks).
Data: each rank its own B·(S+1) uniform token ids < vocab (seed 4321 + world rank, the same every
  step); inputs ids[:, :S], targets ids[:, 1:] (S targets per sequence).
Step (timed): optimizer.zero_grad(set_to_none=True); loss = model(ids); (loss / W).backward();
  non-expert gradients: ONE flat all_reduce (sum over the world of loss/W gradients = mean over
  ranks) of all replicated parameters' gradients concatenated; expert shard gradients: one flat
  all_reduce (sum) over expert_dp (same p, t; skipped when D = 1); torch.optim.AdamW(fused=True,
  lr 1e-4, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1) on all parameters (bf16 parameters and
  bf16 optimizer state, as bench/torch_train_step.py).

Timing (bench/torch_timing.py), on every rank: --warmup steps, a barrier, then --steps steps back
to back between CUDA events (events at the part boundaries too; no host synchronisation between
steps beyond the dispatcher's own); step ms = elapsed / steps, each part the mean over the steps.
The same tokens every step: a step reads the model, its gradients and the optimizer state (GBs),
so no step finds the previous one's data in the L2 and rotating the token ids would change nothing.
Reported per layout (max over ranks of each rank's means): step ms, and its parts forward / backward / gradient all-reduce / optimizer;
tokens/s per GPU = B·S / step time; model TFLOP/s per GPU = FLOPs / step time with
    FLOPs = 6 · N_active · B·S  +  6 · n_layers · Hq · head_dim · S · B·S
  (per GPU per step; the second term is causal attention forward + backward: QKᵀ and PV are
  2·2·S·Hq·head_dim FLOPs per token forward without the mask, halved by causality, x3 for
  forward + backward), where N_active = the weights a token actually multiplies, embedding
  excluded: per layer q, k, v, o projections (H·Hq·hd + 2·H·Hkv·hd + Hq·hd·H) + router (E·H)
  + K experts at full width (K·3·I·H) (dense layers: 3·intermediate_size·H), plus lm_head (V·H);
  norm weights are left out; peak memory per GPU (torch.cuda.max_memory_allocated, max over
  ranks, GiB, reset before each layout); loss of the first and last timed step (global mean).

Run (one node, 4 GPUs):
  torchrun --nproc-per-node 4 bench/torch_train_step_dist.py --config configs/qwen3-30b-a3b-l4.json \\
      --layouts 4x1,2x2,1x4 --routing balanced --json step.json
  torchrun --nproc-per-node 4 bench/torch_train_step_dist.py --config configs/tiny-moe.json --ep 2 --etp 2
Defaults: --config configs/qwen3-30b-a3b-l4.json (relative to the repository when not found),
B = 2, S = 4096 for qwen3-30b-a3b-l4 and B = 16, S = 128 for any other config (--batch, --seq-len
override), --steps 20, --warmup 3, --routing balanced, --ep W/etp, --etp 1.
--cpu runs on the CPU with gloo in float32 (development check of the logic; timings mean nothing).
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_moe_layer_dist as moe  # noqa: E402
import torch_timing  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = "configs/qwen3-30b-a3b-l4.json"
MODEL_SEED, TOKEN_SEED, LR = 1234, 4321, 1e-4


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------

class Cfg:
    def __init__(self, path):
        with open(path) as f:
            c = json.load(f)
        self.path = path
        self.V, self.H = c["vocab_size"], c["hidden_size"]
        self.n_layers = c["num_hidden_layers"]
        self.Hq, self.Hkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        self.hd = c.get("head_dim") or self.H // self.Hq
        self.E = c.get("num_experts", c.get("num_local_experts", 0)) or 0
        self.K = c.get("num_experts_per_tok", 0)
        self.I = c.get("moe_intermediate_size", 0)
        self.I_dense = c.get("intermediate_size", 0)
        self.norm_topk_prob = bool(c.get("norm_topk_prob", False))
        self.sparse_step = c.get("decoder_sparse_step", 1) or 1
        self.mlp_only = set(c.get("mlp_only_layers", []) or [])
        self.eps = c.get("rms_norm_eps", 1e-6)
        rp = c.get("rope_parameters") or {}
        self.theta = c.get("rope_theta", rp.get("rope_theta", 10000.0))
        self.aux_coef = c.get("router_aux_loss_coef", 0.0)
        self.init_std = c.get("initializer_range", 0.02)
        self.tied = bool(c.get("tie_word_embeddings", False))
        unsupported = []
        if c.get("use_sliding_window"):
            unsupported.append("use_sliding_window")
        if c.get("rope_scaling") or rp.get("rope_type", "default") not in ("default", None):
            unsupported.append("rope scaling")
        if c.get("attention_bias"):
            unsupported.append("attention_bias")
        if c.get("hidden_act", "silu") != "silu":
            unsupported.append(f"hidden_act {c.get('hidden_act')}")
        if unsupported:
            raise ValueError(f"{path}: not implemented here: {', '.join(unsupported)}")
        self.stem = os.path.splitext(os.path.basename(path))[0]

    def sparse(self, layer):
        return self.E > 0 and layer not in self.mlp_only and (layer + 1) % self.sparse_step == 0

    def active_params(self):
        """Weights a token multiplies, embedding and norms excluded (see the docstring)."""
        H, hd = self.H, self.hd
        n = 0
        for layer in range(self.n_layers):
            n += H * self.Hq * hd + 2 * H * self.Hkv * hd + self.Hq * hd * H
            n += (self.E * H + self.K * 3 * self.I * H) if self.sparse(layer) else 3 * self.I_dense * H
        return n + self.V * H

    def flops(self, B, S):
        T = B * S
        return 6 * self.active_params() * T + 6 * self.n_layers * self.Hq * self.hd * S * T


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------

def rms_norm(x, w, eps):
    if hasattr(F, "rms_norm"):
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    else:  # older torch (the --cpu development mode)
        xf = x.float()
        h = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def sdpa_causal(q, k, v):
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]  # older torch (the --cpu development mode)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    S = q.shape[2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(S, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


class Model:
    def __init__(self, cfg, mesh, balanced, device, dtype):
        self.cfg, self.mesh, self.balanced = cfg, mesh, balanced
        H, hd, std = cfg.H, cfg.hd, cfg.init_std
        g = torch.Generator(device=device).manual_seed(MODEL_SEED)

        def normal(*shape):
            return (torch.randn(shape, generator=g, device=device) * std).to(dtype).requires_grad_()

        def ones(n):
            return torch.ones(n, dtype=dtype, device=device).requires_grad_()

        self.embed = normal(cfg.V, H)
        self.layers = []
        for layer in range(cfg.n_layers):
            lp = {"in_norm": ones(H), "wq": normal(cfg.Hq * hd, H), "wk": normal(cfg.Hkv * hd, H),
                  "wv": normal(cfg.Hkv * hd, H), "wo": normal(H, cfg.Hq * hd), "q_norm": ones(hd),
                  "k_norm": ones(hd), "post_norm": ones(H)}
            if cfg.sparse(layer):
                lp["wg"] = normal(cfg.E, H)
                a = std * math.sqrt(3)
                w13, w2 = moe.expert_shards(cfg.E, cfg.I, H, mesh, MODEL_SEED * 131 + layer, device, dtype,
                                            scale13=a, scale2=a)
                lp["w13"], lp["w2"] = w13.requires_grad_(), w2.requires_grad_()
            else:
                lp["w_gate"], lp["w_up"] = normal(cfg.I_dense, H), normal(cfg.I_dense, H)
                lp["w_down"] = normal(H, cfg.I_dense)
            self.layers.append(lp)
        self.norm = ones(H)
        self.lm_head = None if cfg.tied else normal(cfg.V, H)
        self.expert_params = [lp[k] for lp in self.layers for k in ("w13", "w2") if k in lp]
        ids = {id(p) for p in self.expert_params}
        self.replicated_params = [p for p in self.all_params() if id(p) not in ids]
        self._rope = {}

    def all_params(self):
        ps = [self.embed]
        for lp in self.layers:
            ps += list(lp.values())
        ps.append(self.norm)
        if self.lm_head is not None:
            ps.append(self.lm_head)
        return ps

    def rope(self, S, device, dtype):
        if S not in self._rope:
            hd = self.cfg.hd
            inv = 1.0 / (self.cfg.theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
            f = torch.outer(torch.arange(S, device=device, dtype=torch.float32), inv)
            emb = torch.cat((f, f), dim=-1)
            self._rope[S] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rope[S]

    def attention(self, h, lp):
        cfg = self.cfg
        B, S, _ = h.shape
        q = F.linear(h, lp["wq"]).view(B, S, cfg.Hq, cfg.hd)
        k = F.linear(h, lp["wk"]).view(B, S, cfg.Hkv, cfg.hd)
        v = F.linear(h, lp["wv"]).view(B, S, cfg.Hkv, cfg.hd)
        q = rms_norm(q, lp["q_norm"], cfg.eps).transpose(1, 2)
        k = rms_norm(k, lp["k_norm"], cfg.eps).transpose(1, 2)
        v = v.transpose(1, 2)
        cos, sin = self.rope(S, h.device, h.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        o = sdpa_causal(q, k, v).transpose(1, 2).reshape(B, S, cfg.Hq * cfg.hd)
        return F.linear(o, lp["wo"])

    def forward(self, ids, targets, aux_loss=True):
        """Returns (total loss, cross-entropy) of this rank's tokens (the aux term global)."""
        cfg = self.cfg
        B, S = ids.shape
        x = F.embedding(ids, self.embed)
        f_sum, p_sum, n_rows = None, None, 0
        for lp in self.layers:
            x = x + self.attention(rms_norm(x, lp["in_norm"], cfg.eps), lp)
            h = rms_norm(x, lp["post_norm"], cfg.eps).view(B * S, cfg.H)
            if "wg" in lp:
                topk_idx, topk_w, probs = moe.route(h, lp["wg"], cfg.K, cfg.norm_topk_prob, self.balanced)
                y = moe.moe_experts(h, topk_idx, topk_w, lp["w13"], lp["w2"], self.mesh, cfg.E)
                if aux_loss:
                    f = torch.zeros(cfg.K, cfg.E, dtype=torch.float32, device=h.device)
                    f.scatter_add_(1, topk_idx.t(), torch.ones(cfg.K, B * S, dtype=torch.float32, device=h.device))
                    p = probs.sum(0)
                    f_sum = f if f_sum is None else f_sum + f
                    p_sum = p if p_sum is None else p_sum + p
                    n_rows += B * S
            else:
                y = F.linear(F.silu(F.linear(h, lp["w_gate"])) * F.linear(h, lp["w_up"]), lp["w_down"])
            x = x + y.view(B, S, cfg.H)
        x = rms_norm(x, self.norm, cfg.eps)
        logits = F.linear(x, self.lm_head if self.lm_head is not None else self.embed)
        ce = F.cross_entropy(logits.view(-1, cfg.V).float(), targets.reshape(-1))
        loss = ce
        if aux_loss and f_sum is not None and cfg.aux_coef:
            f_glob = f_sum.detach() / n_rows
            dist.all_reduce(f_glob)
            f_glob /= dist.get_world_size()
            aux = cfg.E * (f_glob * (p_sum / n_rows).unsqueeze(0)).sum()
            loss = ce + cfg.aux_coef * aux
        return loss, ce


# ----------------------------------------------------------------------------------------------
# the step and the benchmark
# ----------------------------------------------------------------------------------------------

def flat_all_reduce(grads, group):
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    off = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[off:off + n].view_as(g))
        off += n


def run_layout(cfg, P, T, balanced, B, S, steps, warmup, aux_loss, device, dtype):
    cuda = device.type == "cuda"
    gc.collect()  # the previous case's tensors
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mesh = moe.Mesh.get(P, T)
    W = mesh.W
    model = Model(cfg, mesh, balanced, device, dtype)
    params = model.all_params()
    opt_kw = {"fused": True} if cuda else {}
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **opt_kw)
    g = torch.Generator(device=device).manual_seed(TOKEN_SEED + mesh.rank)
    tok = torch.randint(0, cfg.V, (B, S + 1), generator=g, device=device)
    ids, targets = tok[:, :S].contiguous(), tok[:, 1:].contiguous()

    losses = []

    def step(i, mark):
        opt.zero_grad(set_to_none=True)
        loss, ce = model.forward(ids, targets, aux_loss)
        mark()
        (loss / W).backward()
        mark()
        rep = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.replicated_params]
        for p, gr in zip(model.replicated_params, rep):
            p.grad = gr
        if W > 1:
            flat_all_reduce(rep, None)
        if mesh.D > 1:
            flat_all_reduce([p.grad for p in model.expert_params], mesh.expert_dp)
        mark()
        opt.step()
        if i >= warmup:
            losses.append(loss.detach())

    t = torch_timing.time_loop(step, steps, warmup, marks=3, cuda=cuda, before_timed=dist.barrier)
    parts = [t.ms] + t.parts
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    mx = torch.tensor(parts + [peak], dtype=torch.float64, device=device)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    lo = torch.stack([losses[0], losses[-1]]).double()
    dist.all_reduce(lo)
    lo /= W
    ms, fwd, bwd, red, optm, peak = mx.tolist()
    n_params_rank = sum(p.numel() for p in params)
    flops = cfg.flops(B, S)
    return {"name": f"{cfg.stem}_B{B}_S{S}_{mesh.name()}_{'balanced' if balanced else 'random'}",
            "config": cfg.stem, "batch": B, "seq_len": S, "dp": mesh.D, "ep": P, "etp": T,
            "routing": "balanced" if balanced else "random", "aux_loss": aux_loss,
            "ms": ms, "fwd_ms": fwd, "bwd_ms": bwd, "grad_allreduce_ms": red, "optim_ms": optm,
            "tokens_per_s_per_gpu": B * S / (ms * 1e-3), "flops_per_gpu_step": flops,
            "model_tflops_per_gpu": flops / (ms * 1e-3) / 1e12, "active_params": cfg.active_params(),
            "params_per_rank": n_params_rank, "peak_gib": peak,
            "loss_first": lo[0].item(), "loss_last": lo[1].item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="HF Qwen3-MoE config.json")
    ap.add_argument("--ep", type=int, default=0, help="expert-parallel degree P (default W / etp)")
    ap.add_argument("--etp", type=int, default=1, help="expert tensor-parallel degree T (default 1)")
    ap.add_argument("--layouts", default="", help="comma-separated PxT list, e.g. 4x1,2x2,1x4 (overrides --ep/--etp)")
    ap.add_argument("--routing", choices=("balanced", "random", "both"), default="balanced")
    ap.add_argument("--batch", type=int, default=0, help="sequences per rank B")
    ap.add_argument("--seq-len", type=int, default=0, help="sequence length S")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--aux-loss", choices=("on", "off"), default="on")
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--cpu", action="store_true", help="gloo + float32 on the CPU (development only)")
    args = ap.parse_args()

    device = moe.init_distributed(args.cpu)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    W, rank = dist.get_world_size(), dist.get_rank()
    path = args.config if os.path.exists(args.config) else os.path.join(REPO, args.config)
    if not os.path.exists(path):
        moe.fail_all(f"config file not found: {args.config}")
    try:
        cfg = Cfg(path)
    except (ValueError, KeyError) as e:
        moe.fail_all(f"config {path}: {e}")
    S, B = (4096, 2) if cfg.stem == "qwen3-30b-a3b-l4" else (128, 16)
    S, B = args.seq_len or S, args.batch or B
    layouts = moe.parse_layouts(args, W)
    for P, T in layouts:
        err = moe.layout_error(W, P, T, cfg.E if cfg.E else None, cfg.I if cfg.E else None)
        if err:
            moe.fail_all(f"layout ep={P} etp={T}: {err}")
    if cfg.E and cfg.K > cfg.E:
        moe.fail_all(f"num_experts_per_tok K={cfg.K} exceeds num_experts E={cfg.E}")
    routings = (True, False) if args.routing == "both" else (args.routing == "balanced",)
    aux = args.aux_loss == "on"

    how = torch_timing.step_method(args.steps, args.warmup) + "; per rank, max over ranks"
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo, float32)"
        print(f"torch_train_step_dist: {W} x {dev}, torch {torch.__version__}; {cfg.stem}: {cfg.n_layers} layers, "
              f"H={cfg.H}, E={cfg.E}, K={cfg.K}, I={cfg.I}, V={cfg.V}; per GPU B={B} S={S} ({B * S} tokens); "
              f"N_active={cfg.active_params() / 1e6:.1f}M, FLOPs/GPU/step={cfg.flops(B, S) / 1e12:.2f}T; "
              f"aux loss {'on (global)' if aux else 'off'}; step = zero_grad + fwd + bwd + flat grad all-reduce + "
              f"fused AdamW (bf16 params and state); {how}", flush=True)
        print(f"{'layout (DxPxT)':<15} {'routing':<9} {'step_ms':>9} {'fwd':>8} {'bwd':>8} {'allred':>7} {'optim':>7} "
              f"{'tok/s/GPU':>10} {'TFLOP/s/GPU':>11} {'peak_GiB':>9} {'loss_first':>10} {'loss_last':>10}",
              flush=True)
    results = []
    for P, T in layouts:
        for balanced in routings:
            r = run_layout(cfg, P, T, balanced, B, S, args.steps, args.warmup, aux, device, dtype)
            results.append(r)
            if rank == 0:
                flag = "" if math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]) else "  NON-FINITE"
                lay = f"{r['dp']}x{P}x{T}"
                print(f"{lay:<15} {r['routing']:<9} {r['ms']:9.2f} {r['fwd_ms']:8.2f} {r['bwd_ms']:8.2f} "
                      f"{r['grad_allreduce_ms']:7.2f} {r['optim_ms']:7.2f} {r['tokens_per_s_per_gpu']:10.4g} "
                      f"{r['model_tflops_per_gpu']:11.1f} {r['peak_gib']:9.2f} {r['loss_first']:10.5f} "
                      f"{r['loss_last']:10.5f}{flag}", flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch_version": torch.__version__, "world_size": W,
                       "flops_formula": "6*N_active*B*S + 6*n_layers*Hq*head_dim*S*B*S per GPU per step",
                       "timing": how,
                       "cases": results}, f, indent=2)
            f.write("\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
