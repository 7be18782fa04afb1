#!/usr/bin/env python3
"""PyTorch multi-GPU baseline: one Qwen3-MoE MoE block, forward + backward, with expert parallelism
(EP, P ranks) x expert tensor parallelism (ETP, T ranks) x D data-parallel replicas, the `all2all`
dispatcher of docs/etp_spec.md (etp_spec §6.4) written with torch.distributed (NCCL).

Mesh (etp_spec §2): W = D·P·T ranks, world rank g = d·(P·T) + p·T + t (etp fastest);
  ep group = same (d, t), etp group = same (d, p), expert_dp group = same (p, t).
Parameters (bf16): router wg (E, H) replicated; rank (p, t) holds the L = E/P experts
  [p·L, (p+1)·L) and of each the t-th slice of width i = I/T: w13_local (L, 2i, H) = gate rows
  [t·i, (t+1)·i) then up rows over the same range, w2_local (L, H, i) = down_proj columns
  [t·i, (t+1)·i). Every rank's shard is cut out of the same global model (per-expert seeds).
Each rank has its own N tokens x (N, H) bf16 (seed depends on the world rank).

Forward on every rank:
  router   logits = x·wgᵀ in f32, softmax, torch.topk(K), renormalised (norm_topk_prob);
           --routing balanced: token n slot k -> expert (n·K + k) % E, weight 1/K (no router
           gradient); --routing random: the real top-K of random router weights.
  permute  the N·K (token, slot) rows sorted by expert (stable sort: then token, then slot),
           x rows gathered in that order.
  dispatch counts per expert: one all_to_all_single of the (E,) count vector over ep (each EP rank
           gets, from every source, its L experts' counts), one all_gather_into_tensor of those
           over etp, then ONE device->host copy of all counts (the only host sync); rows:
           all_to_all_single over ep with input/output split sizes; then over etp
           all_gather_into_tensor of the received rows PADDED to the largest row count of the etp
           group (no padding with balanced routing); then one permutation (index_select) from
           (etp rank, ep source, local expert) blocks to expert-major order (local expert, ep
           source, etp rank: sorted by expert, then source rank, as the spec says).
  experts  torch._grouped_mm with int32 end offsets per local expert: h = x·w13ᵀ (rows, 2i),
           a = silu(h[:, :i]) · h[:, i:], y = a·w2ᵀ (rows, H) = this rank's partial (TP slice).
  combine  inverse permutation (index_copy into the padded gathered layout), reduce_scatter_tensor
           over etp (sum of the T partials; each rank gets back the rows it gathered), drop the
           padding, the reverse all_to_all_single over ep, then out = Σ_k w_k · y in f32
           (index_add into (N, H)), rounded to bf16.
Backward: autograd from dout (bf16). The collectives are autograd Functions: all_to_all's backward
is the reverse all_to_all, all_gather's backward is reduce_scatter (sum) and vice versa, the
permutation's backward is the inverse permutation. Expert gradients stay local (D = 1: nothing to
reduce); the timed step does not all-reduce any gradient.

Timing (bench/torch_timing.py), per case (layout x routing) and on every rank: max(2, ceil(4 x L2
/ bytes)) (x, dout) sets rotated; --warmup iterations, a barrier, then --iters iterations back to
back between CUDA events (an event between forward and backward; the dispatcher's one host sync
per forward stays, it is part of the algorithm); each rank takes its means; the table shows the
max over ranks of the per-rank means (fwd, bwd, fwd+bwd), expert TFLOP/s per GPU
(6·N·K·3·I·H per rank per iteration: every rank computes the same FLOPs whatever the layout), the
load imbalance of the rows each rank multiplies (max / mean over ranks) and the peak memory
(torch.cuda.max_memory_allocated, max over ranks, GiB, reset before each case).

--check: before timing (or alone with --check-only), at small sizes (N=64 per rank, H=256, E=8,
K=2, I=128) on the same ranks, for every layout (P, T) with P·T dividing W (so D = W/(P·T) >= 1)
and both routings: forward + backward distributed, expert gradients all-reduced (sum) over
expert_dp, router gradient summed over world, everything gathered to rank 0 and compared with a
float64 single-rank reference (dense per-expert loop, autograd) on all ranks' tokens with the same
top-K selection; relative L2 of out, dx, dw13, dw2 (and dwg with random routing) must be < 5e-2.

Run (one node, 4 GPUs):
  torchrun --nproc-per-node 4 bench/torch_moe_layer_dist.py --check-only
  torchrun --nproc-per-node 4 bench/torch_moe_layer_dist.py --ep 2 --etp 2 [--routing balanced]
  torchrun --nproc-per-node 4 bench/torch_moe_layer_dist.py --layouts 4x1,2x2,1x4 --json out.json
Options: --tokens N (per rank, 8192), --intermediate I (768), --iters (50), --warmup (5),
--routing balanced|random|both (both), --check (self-check first), --check-only, --json FILE.
--cpu runs on the CPU with gloo in float32 (gloo has no bf16; a development check of the logic
where there is no GPU, e.g. `--cpu --check-only`; its timings mean nothing).
"""
import os

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_moe_layer import experts_dense  # noqa: E402  (the float64 reference loop, shared)
import torch_timing  # noqa: E402

H_DEFAULT, E_DEFAULT, K_DEFAULT = 2048, 128, 8


# ----------------------------------------------------------------------------------------------
# process group setup and the mesh
# ----------------------------------------------------------------------------------------------

def init_distributed(cpu):
    """Initialises the default process group from torchrun's environment; returns the device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        sys.exit("launch with torchrun, e.g. torchrun --nproc-per-node 4 " + os.path.basename(sys.argv[0]))
    if cpu:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA device (use --cpu for the gloo/float32 development mode)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    try:
        dist.init_process_group("nccl", device_id=device)
    except TypeError:  # older torch without device_id
        dist.init_process_group("nccl")
    return device


def layout_error(W, P, T, E=None, I=None):
    """None when (W, P, T, E, I) is a valid layout, else the message naming the values."""
    if P < 1 or T < 1:
        return f"ep ({P}) and etp ({T}) must be >= 1"
    if W % (P * T):
        return f"world size W={W} is not a multiple of ep·etp = {P}·{T} = {P * T}"
    if E is not None and E % P:
        return f"experts E={E} not divisible by ep P={P}"
    if I is not None and I % T:
        return f"intermediate size I={I} not divisible by etp T={T}"
    return None


def fail_all(msg):
    """Every rank calls this with the same message (validation is deterministic): rank 0 prints."""
    if dist.get_rank() == 0:
        print(f"error: {msg}", file=sys.stderr, flush=True)
    dist.destroy_process_group()
    sys.exit(2)


class Mesh:
    """(D, P, T) mesh of etp_spec §2: coordinates (d, p, t) of this rank and its ep, etp and
    expert_dp groups (None where the group has one rank: nothing to communicate). Build meshes with
    Mesh.get: dist.new_group is collective, so every rank must create the same groups in the same
    order; get() caches one mesh per (P, T)."""

    _cache = {}

    @classmethod
    def get(cls, P, T):
        if (P, T) not in cls._cache:
            cls._cache[(P, T)] = cls(P, T)
        return cls._cache[(P, T)]

    def __init__(self, P, T):
        W, g = dist.get_world_size(), dist.get_rank()
        err = layout_error(W, P, T)
        if err:
            raise ValueError(err)
        self.W, self.P, self.T, self.D = W, P, T, W // (P * T)
        self.rank = g
        self.d, self.p, self.t = g // (P * T), (g % (P * T)) // T, g % T
        D = self.D

        def rank_of(d, p, t):
            return d * P * T + p * T + t

        def groups(outer, members, mine):
            """One group per outer coordinate tuple (members listed in group-rank order); returns
            the one holding this rank."""
            found = None
            for key in outer:
                ranks = members(*key)
                if len(ranks) == 1:
                    continue
                grp = dist.new_group(ranks)
                if key == mine:
                    found = grp
            return found

        self.ep = groups([(d, t) for d in range(D) for t in range(T)],
                         lambda d, t: [rank_of(d, p, t) for p in range(P)], (self.d, self.t))
        self.etp = groups([(d, p) for d in range(D) for p in range(P)],
                          lambda d, p: [rank_of(d, p, t) for t in range(T)], (self.d, self.p))
        self.expert_dp = groups([(p, t) for p in range(P) for t in range(T)],
                                lambda p, t: [rank_of(d, p, t) for d in range(D)], (self.p, self.t))

    def name(self):
        return f"D{self.D}xP{self.P}xT{self.T}"


# ----------------------------------------------------------------------------------------------
# collectives (NCCL; gloo fallbacks for the --cpu development mode) and their autograd Functions
# ----------------------------------------------------------------------------------------------

def _is_gloo(group):
    return dist.get_backend(group) == "gloo"


def all_to_all(x, out_splits, in_splits, group):
    """Rows x[sum(in_splits[:q]) : ...] go to group rank q; returns the received rows."""
    x = x.contiguous()
    out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, out_splits, in_splits, group=group)
    return out


def all_gather_rows(x, group, n):
    """(M, ...) on each of the n group ranks -> (n·M, ...), group rank order."""
    x = x.contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    if _is_gloo(group):
        dist.all_gather(list(out.chunk(n)), x, group=group)
    else:
        dist.all_gather_into_tensor(out, x, group=group)
    return out


def reduce_scatter_rows(x, group, n):
    """(n·M, ...) on each group rank -> (M, ...): block r of the sum over ranks for group rank r."""
    x = x.contiguous()
    if _is_gloo(group):
        tmp = x.clone()
        dist.all_reduce(tmp, group=group)
        return tmp.chunk(n)[dist.get_rank(group)].clone()
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


class AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        return all_to_all(g, in_splits, out_splits, ctx.group), None, None, None


class AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return all_gather_rows(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter_rows(g, ctx.group, ctx.n), None, None


class ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, n):
        ctx.group, ctx.n = group, n
        return reduce_scatter_rows(x, group, n)

    @staticmethod
    def backward(ctx, g):
        return all_gather_rows(g, ctx.group, ctx.n), None, None


class GatherRows(torch.autograd.Function):
    """out = x[idx] where idx is injective (a permutation, possibly skipping padding rows);
    backward scatters the gradient back (no atomics), zero in rows idx does not name."""

    @staticmethod
    def forward(ctx, x, idx):
        ctx.save_for_backward(idx)
        ctx.n = x.shape[0]
        return x.index_select(0, idx)

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        shape = (ctx.n,) + tuple(g.shape[1:])
        gin = g.new_empty(shape) if idx.numel() == ctx.n else g.new_zeros(shape)
        return gin.index_copy_(0, idx, g.contiguous()), None


class ScatterRows(torch.autograd.Function):
    """out (n, ...) with out[idx] = y, zero elsewhere (the inverse of GatherRows)."""

    @staticmethod
    def forward(ctx, y, idx, n):
        ctx.save_for_backward(idx)
        shape = (n,) + tuple(y.shape[1:])
        out = y.new_empty(shape) if idx.numel() == n else y.new_zeros(shape)
        return out.index_copy_(0, idx, y.contiguous())

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        return g.index_select(0, idx), None, None


def grouped_mm(a, b, offs):
    """out[rows of group g] = a[rows of g] @ b[g]; offs: int32 end offsets of the row groups."""
    if a.is_cuda:
        fn = getattr(torch, "_grouped_mm", None) or F.grouped_mm
        return fn(a, b, offs=offs)
    outs, start = [], 0  # CPU (--cpu development mode): a loop over the groups
    for g, end in enumerate(offs.tolist()):
        outs.append(a[start:end] @ b[g])
        start = end
    return torch.cat(outs) if outs else a.new_empty((0, b.shape[-1]))


# ----------------------------------------------------------------------------------------------
# the MoE block
# ----------------------------------------------------------------------------------------------

_BALANCED = {}


def route(x, wg, K, norm_topk_prob, balanced):
    """Returns (topk_idx (N, K) int64, topk_w (N, K) f32, probs (N, E) f32)."""
    logits = x.float() @ wg.float().t()
    probs = torch.softmax(logits, dim=-1)
    topk_w, topk_idx = torch.topk(probs, K, dim=-1)
    if norm_topk_prob:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    if balanced:
        N, E = x.shape[0], wg.shape[0]
        key = (N, K, E, x.device)
        if key not in _BALANCED:
            idx = (torch.arange(N * K, device=x.device) % E).view(N, K)
            _BALANCED[key] = (idx, torch.full((N, K), 1.0 / K, device=x.device))
        topk_idx, topk_w = _BALANCED[key]
    return topk_idx, topk_w, probs


def moe_experts(x, topk_idx, topk_w, w13, w2, mesh, E, stats=None):
    """The routed experts of one MoE block with the all2all dispatcher (see the module docstring).
    x (N, H); topk_idx (N, K) int64; topk_w (N, K) f32; w13 (L, 2i, H), w2 (L, H, i) this rank's
    shards. Returns (N, H) in x's dtype. stats (dict), when given, gets 'rows' = rows multiplied."""
    N, H = x.shape
    K = topk_idx.shape[1]
    P, T = mesh.P, mesh.T
    L = E // P
    flat = topk_idx.reshape(-1)
    order = torch.sort(flat, stable=True).indices  # by expert, then token, then slot
    token = order // K
    counts = torch.bincount(flat, minlength=E)  # (E,) int64: rows per global expert
    # counts: recv[q·L + j] = rows from ep source q for local expert j; then all etp partners'
    recv = all_to_all(counts, [L] * P, [L] * P, mesh.ep) if P > 1 else counts
    gath = all_gather_rows(recv, mesh.etp, T) if T > 1 else recv  # (T·P·L,) = [t'][q][j]
    host = torch.cat([counts, gath]).cpu()  # the one host sync
    send_splits = host[:E].view(P, L).sum(1).tolist()
    c_host = host[E:].view(T, P, L)
    recv_splits = c_host[mesh.t].sum(1).tolist()
    rows_t = c_host.sum((1, 2)).tolist()
    M_t, M_max, R = rows_t[mesh.t], max(rows_t), sum(rows_t)
    if stats is not None:
        stats["rows"] = R

    x_M = x.index_select(0, token)  # (N·K, H), sorted by expert
    x_r = AllToAll.apply(x_M, recv_splits, send_splits, mesh.ep) if P > 1 else x_M  # [q][j] blocks
    if T > 1:
        if M_max > M_t:
            x_r = F.pad(x_r, (0, 0, 0, M_max - M_t))
        x_g = AllGather.apply(x_r, mesh.etp, T)  # (T·M_max, H): [t'][q][j] blocks, padded per t'
        n_src = T * M_max
    else:
        x_g, n_src = x_r, M_t
    c = gath.view(T, P, L)
    if P * T > 1:
        # permutation from [t'][q][j] blocks to [j][q][t'] (expert-major, then source rank)
        c_flat = c.reshape(T, P * L)
        starts = (torch.cumsum(c_flat, 1) - c_flat
                  + torch.arange(T, device=c.device).unsqueeze(1) * M_max).view(T, P, L)
        c_new = c.permute(2, 1, 0).reshape(-1)
        s_new = starts.permute(2, 1, 0).reshape(-1)
        dst = torch.cumsum(c_new, 0) - c_new
        idx = torch.repeat_interleave(s_new - dst, c_new, output_size=R) + torch.arange(R, device=c.device)
        x_e = GatherRows.apply(x_g, idx)
    else:
        x_e = x_g
    offs = torch.cumsum(c.sum((0, 1)), 0).to(torch.int32)  # (L,) end offsets per local expert

    h = grouped_mm(x_e, w13.transpose(-2, -1), offs)  # (R, 2i)
    i = h.shape[1] // 2
    a = F.silu(h[:, :i]) * h[:, i:]
    y = grouped_mm(a, w2.transpose(-2, -1), offs)  # (R, H): partial sums over this TP slice

    y_g = ScatterRows.apply(y, idx, n_src) if P * T > 1 else y
    if T > 1:
        y_r = ReduceScatter.apply(y_g, mesh.etp, T)  # (M_max, H): sum over the T slices
        if M_max > M_t:
            y_r = y_r[:M_t]
    else:
        y_r = y_g
    y_M = AllToAll.apply(y_r, send_splits, recv_splits, mesh.ep) if P > 1 else y_r  # (N·K, H)
    w_M = topk_w.reshape(-1)[order]
    out = torch.zeros(N, H, dtype=torch.float32, device=x.device)
    out = out.index_add(0, token, y_M.float() * w_M.unsqueeze(-1))
    return out.to(x.dtype)


def expert_shards(E, I, H, mesh, seed, device, dtype, scale13=None, scale2=None):
    """This rank's (w13_local (L, 2i, H), w2_local (L, H, i)), cut out of the global experts
    w13 (E, 2I, H), w2 (E, H, I) whose expert e is drawn U(-s, s) with a generator seeded by
    (seed, e): the same global model whatever the layout. Not yet requiring grad."""
    T, L = mesh.T, E // mesh.P
    i = I // T
    s13 = scale13 if scale13 is not None else 1 / H ** 0.5
    s2 = scale2 if scale2 is not None else 1 / I ** 0.5
    w13 = torch.empty(L, 2 * i, H, dtype=dtype, device=device)
    w2 = torch.empty(L, H, i, dtype=dtype, device=device)
    g = torch.Generator(device=device)
    t0, t1 = mesh.t * i, (mesh.t + 1) * i
    for j in range(L):
        e = mesh.p * L + j
        g.manual_seed(seed * 1_000_003 + e)
        full13 = (torch.rand(2 * I, H, generator=g, device=device) * 2 - 1) * s13
        full2 = (torch.rand(H, I, generator=g, device=device) * 2 - 1) * s2
        w13[j, :i] = full13[t0:t1].to(dtype)
        w13[j, i:] = full13[I + t0:I + t1].to(dtype)
        w2[j] = full2[:, t0:t1].to(dtype)
    return w13, w2


def uniform(shape, a, gen, device, dtype):
    return ((torch.rand(shape, generator=gen, device=device) * 2 - 1) * a).to(dtype)


class DistMoeLayer:
    """Router + routed experts of one MoE block on this rank (parameters as in the docstring)."""

    def __init__(self, H, E, K, I, mesh, balanced, device, dtype, seed=0, norm_topk_prob=True):
        self.H, self.E, self.K, self.I, self.mesh = H, E, K, I, mesh
        self.balanced, self.norm_topk_prob = balanced, norm_topk_prob
        g = torch.Generator(device=device).manual_seed(seed)
        # Scales as the one-GPU baseline: router logits of std ~1 for x ~ U(-1, 1).
        self.wg = uniform((E, H), 3 / H ** 0.5, g, device, dtype).requires_grad_()
        w13, w2 = expert_shards(E, I, H, mesh, seed + 1, device, dtype)
        self.w13, self.w2 = w13.requires_grad_(), w2.requires_grad_()
        self.stats = {}

    def params(self):
        return [self.wg, self.w13, self.w2]

    def forward(self, x):
        topk_idx, topk_w, _ = route(x, self.wg, self.K, self.norm_topk_prob, self.balanced)
        self.topk_idx = topk_idx
        return moe_experts(x, topk_idx, topk_w, self.w13, self.w2, self.mesh, self.E, self.stats)


# ----------------------------------------------------------------------------------------------
# --check: distributed result vs a float64 single-rank reference on rank 0
# ----------------------------------------------------------------------------------------------

def reference_f64(x, wg, w13, w2, topk_idx, K, balanced, norm_topk_prob=True):
    """float64 MoE block on the given top-K selection (dense loop over experts, autograd)."""
    xd = x.double().requires_grad_()
    wg, w13, w2 = (t.double().requires_grad_() for t in (wg, w13, w2))
    if balanced:
        topk_w = torch.full(topk_idx.shape, 1.0 / K, dtype=torch.float64, device=x.device)
    else:
        probs = torch.softmax(xd @ wg.t(), dim=-1)
        topk_w = probs.gather(1, topk_idx)
        if norm_topk_prob:
            topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return experts_dense(xd, topk_idx, topk_w, w13, w2), xd, wg, w13, w2


def gather_to_list(t):
    t = t.contiguous()
    lst = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(lst, t)
    return lst


def check_layout(P, T, balanced, device, dtype):
    """One layout and routing at small sizes; returns (ok, line) on rank 0, (ok, None) elsewhere."""
    N, H, E, K, I = 64, 256, 8, 2, 128
    mesh = Mesh.get(P, T)
    g = mesh.rank
    layer = DistMoeLayer(H, E, K, I, mesh, balanced, device, dtype, seed=11)
    gen = torch.Generator(device=device).manual_seed(1000 + g)
    x = uniform((N, H), 1.0, gen, device, dtype).requires_grad_()
    dout = uniform((N, H), 1.0, gen, device, dtype)
    out = layer.forward(x)
    out.backward(dout)
    dw13, dw2 = layer.w13.grad, layer.w2.grad
    if mesh.D > 1:  # expert gradients: sum over the data-parallel replicas
        dw13, dw2 = dw13.float(), dw2.float()
        dist.all_reduce(dw13, group=mesh.expert_dp)
        dist.all_reduce(dw2, group=mesh.expert_dp)
    dwg = layer.wg.grad.float() if layer.wg.grad is not None else torch.zeros(E, H, device=device)
    dist.all_reduce(dwg)  # replicated router: sum over world

    xs, outs, dxs, douts = (gather_to_list(t) for t in (x.detach(), out.detach(), x.grad, dout))
    idxs = gather_to_list(layer.topk_idx)
    w13s, w2s = gather_to_list(layer.w13.detach()), gather_to_list(layer.w2.detach())
    dw13s, dw2s = gather_to_list(dw13.to(dtype)), gather_to_list(dw2.to(dtype))
    ok, line = True, None
    if g == 0:
        L, i = E // P, I // T

        def assemble(s13, s2):
            full13 = torch.empty(E, 2 * I, H, dtype=torch.float64, device=device)
            full2 = torch.empty(E, H, I, dtype=torch.float64, device=device)
            for p in range(P):
                for t in range(T):
                    r = p * T + t  # replica d = 0
                    full13[p * L:(p + 1) * L, t * i:(t + 1) * i] = s13[r][:, :i].double()
                    full13[p * L:(p + 1) * L, I + t * i:I + (t + 1) * i] = s13[r][:, i:].double()
                    full2[p * L:(p + 1) * L, :, t * i:(t + 1) * i] = s2[r].double()
            return full13, full2

        w13_full, w2_full = assemble(w13s, w2s)
        dw13_full, dw2_full = assemble(dw13s, dw2s)
        ref, xd, wgd, w13d, w2d = reference_f64(torch.cat(xs), layer.wg.detach(), w13_full, w2_full,
                                                torch.cat(idxs), K, balanced)
        ref.backward(torch.cat(douts).double())

        def rel(a, b):
            return ((a.double() - b).norm() / b.norm()).item()

        errs = {"out": rel(torch.cat(outs), ref), "dx": rel(torch.cat(dxs), xd.grad),
                "dw13": rel(dw13_full, w13d.grad), "dw2": rel(dw2_full, w2d.grad)}
        if not balanced:
            errs["dwg"] = rel(dwg, wgd.grad)
        ok = all(v < 5e-2 for v in errs.values())
        line = (f"  check {mesh.name():<11} {'balanced' if balanced else 'random':<8} rel L2 vs float64: "
                + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ("  ok" if ok else "  FAILED"))
    flag = torch.tensor([1 if ok else 0], device=device)
    dist.broadcast(flag, 0)
    return bool(flag.item()), line


def self_check(device, dtype):
    W = dist.get_world_size()
    layouts = [(P, W // D // P) for D in range(1, W + 1) if W % D == 0
               for P in range(1, W // D + 1) if (W // D) % P == 0]
    layouts = [(P, T) for P, T in layouts if 8 % P == 0 and 128 % T == 0]
    if dist.get_rank() == 0:
        print(f"self-check on {W} ranks (N=64 per rank, H=256, E=8, K=2, I=128), layouts (P, T): {layouts}",
              flush=True)
    all_ok = True
    for P, T in layouts:
        for balanced in (True, False):
            ok, line = check_layout(P, T, balanced, device, dtype)
            all_ok &= ok
            if line:
                print(line, flush=True)
    if dist.get_rank() == 0:
        print("self-check " + ("passed" if all_ok else "FAILED (limit 5e-2)"), flush=True)
    return all_ok


# ----------------------------------------------------------------------------------------------
# benchmark
# ----------------------------------------------------------------------------------------------

def parse_layouts(args, W):
    if args.layouts:
        out = []
        for item in args.layouts.split(","):
            try:
                p, t = item.lower().split("x")
                out.append((int(p), int(t)))
            except ValueError:
                sys.exit(f"--layouts: '{item}' is not PxT (e.g. 2x2)")
        return out
    P = args.ep if args.ep else W // args.etp
    return [(P, args.etp)]


def run_case(P, T, balanced, N, H, E, K, I, iters, warmup, device, dtype):
    cuda = device.type == "cuda"
    gc.collect()  # the previous case's tensors
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    mesh = Mesh.get(P, T)
    layer = DistMoeLayer(H, E, K, I, mesh, balanced, device, dtype, seed=I)
    gen = torch.Generator(device=device).manual_seed(100 + mesh.rank)
    n_sets = torch_timing.rotation_sets(2 * N * H * torch.tensor([], dtype=dtype).element_size(), device)
    xs = [uniform((N, H), 1.0, gen, device, dtype).requires_grad_() for _ in range(n_sets)]
    douts = [uniform((N, H), 1.0, gen, device, dtype) for _ in range(n_sets)]

    def step(it, mark):
        for p in layer.params():
            p.grad = None
        x = xs[it % n_sets]
        x.grad = None
        out = layer.forward(x)
        mark()
        out.backward(douts[it % n_sets])

    t = torch_timing.time_loop(step, iters, warmup, sets=n_sets, marks=1, cuda=cuda, before_timed=dist.barrier)
    fwd, bwd, tot = t.parts[0], t.parts[1], t.ms
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
    rows = float(layer.stats["rows"])
    mx = torch.tensor([fwd, bwd, tot, peak, rows], dtype=torch.float64, device=device)
    sm = torch.tensor([rows], dtype=torch.float64, device=device)
    dist.all_reduce(mx, op=dist.ReduceOp.MAX)
    dist.all_reduce(sm)
    fwd, bwd, tot, peak, rows_max = mx.tolist()
    imbalance = rows_max / (sm.item() / mesh.W)
    flops = 6 * N * K * 3 * I * H  # per rank per iteration
    return {"name": f"N{N}_H{H}_E{E}_K{K}_I{I}_{mesh.name()}_{'balanced' if balanced else 'random'}",
            "dp": mesh.D, "ep": P, "etp": T, "routing": "balanced" if balanced else "random",
            "tokens_per_rank": N, "fwd_ms": fwd, "bwd_ms": bwd, "ms": tot,
            "expert_tflops_per_gpu": flops / (tot * 1e-3) / 1e12, "tokens_per_s_per_gpu": N / (tot * 1e-3),
            "rows_max_over_mean": imbalance, "peak_gib": peak, "input_sets": n_sets}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--ep", type=int, default=0, help="expert-parallel degree P (default W / etp)")
    ap.add_argument("--etp", type=int, default=1, help="expert tensor-parallel degree T (default 1)")
    ap.add_argument("--layouts", default="", help="comma-separated PxT list, e.g. 4x1,2x2,1x4 (overrides --ep/--etp)")
    ap.add_argument("--routing", choices=("balanced", "random", "both"), default="both")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per rank N")
    ap.add_argument("--intermediate", type=int, default=768, help="expert FFN width I")
    ap.add_argument("--hidden", type=int, default=H_DEFAULT)
    ap.add_argument("--experts", type=int, default=E_DEFAULT)
    ap.add_argument("--topk", type=int, default=K_DEFAULT)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--check", action="store_true", help="run the float64 self-check before timing")
    ap.add_argument("--check-only", action="store_true", help="run only the self-check")
    ap.add_argument("--json", help="write the results here (rank 0)")
    ap.add_argument("--cpu", action="store_true", help="gloo + float32 on the CPU (development only)")
    args = ap.parse_args()

    device = init_distributed(args.cpu)
    dtype = torch.float32 if args.cpu else torch.bfloat16
    W, rank = dist.get_world_size(), dist.get_rank()
    H, E, K, I, N = args.hidden, args.experts, args.topk, args.intermediate, args.tokens
    layouts = parse_layouts(args, W)
    for P, T in layouts:
        err = layout_error(W, P, T, E, I)
        if err:
            fail_all(f"layout ep={P} etp={T}: {err}")
    if K > E:
        fail_all(f"top-k K={K} exceeds the number of experts E={E}")

    ok = True
    if args.check or args.check_only:
        ok = self_check(device, dtype)
        if args.check_only or not ok:
            dist.destroy_process_group()
            sys.exit(0 if ok else 1)

    routings = (True, False) if args.routing == "both" else (args.routing == "balanced",)
    if rank == 0:
        dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (gloo, float32)"
        print(f"torch_moe_layer_dist: {W} x {dev}, torch {torch.__version__}; per rank N={N} H={H} E={E} K={K} "
              f"I={I}; all2all dispatcher (EP all_to_all_single, ETP padded all_gather_into_tensor / "
              f"reduce_scatter_tensor); per rank {torch_timing.method(args.iters, args.warmup)}; "
              f"max over ranks of the per-rank means",
              flush=True)
        print(f"{'layout (DxPxT)':<15} {'routing':<9} {'fwd_ms':>8} {'bwd_ms':>8} {'fwd+bwd_ms':>10} "
              f"{'TFLOP/s/GPU':>11} {'rows max/mean':>13} {'peak_GiB':>9}", flush=True)
    results = []
    for P, T in layouts:
        for balanced in routings:
            r = run_case(P, T, balanced, N, H, E, K, I, args.iters, args.warmup, device, dtype)
            results.append(r)
            if rank == 0:
                lay = f"{r['dp']}x{P}x{T}"
                print(f"{lay:<15} {r['routing']:<9} {r['fwd_ms']:8.3f} {r['bwd_ms']:8.3f} {r['ms']:10.3f} "
                      f"{r['expert_tflops_per_gpu']:11.1f} {r['rows_max_over_mean']:13.3f} {r['peak_gib']:9.2f}",
                      flush=True)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch_version": torch.__version__, "world_size": W,
                       "timing": torch_timing.method(args.iters, args.warmup) + "; max over ranks",
                       "dispatcher": "all2all (EP all_to_all_single; ETP padded all_gather_into_tensor, "
                                     "reduce_scatter_tensor)",
                       "cases": results}, f, indent=2)
            f.write("\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
