#!/usr/bin/env python3
"""Hugging Face parity fixture for moetp (run where PyTorch and transformers are installed).

  python3 tools/make_hf_fixture.py OUT_DIR
      Builds a small random Qwen3-MoE (3 layers, layer 1 dense via mlp_only_layers, 8 experts,
      top-2, untied embeddings), saves it with save_pretrained to OUT_DIR/model, and writes
      OUT_DIR/fixture.safetensors with: input_ids (2, 17) i32, logits (2, 16, V) of the first 16
      tokens, ce_loss, aux_loss, loss (= ce + coef * aux), and grad.<name> for a few parameters.
      The loss is defined exactly as moetp's: inputs = ids[:, :16], targets = ids[:, 1:], mean
      cross-entropy over the 32 targets, plus router_aux_loss_coef times transformers'
      load_balancing_loss_func over the MoE layers of that forward (no attention mask).

  python3 tools/make_hf_fixture.py --check OUT_DIR MOETP_SAVED_DIR
      Loads a checkpoint written by moetp (e.g. `moetp convert --from hf --to hf`) with
      from_pretrained and checks its logits equal the fixture's (max relative error <= 1e-5).
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

GRAD_PARAMS = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.gate.weight",
    "model.layers.0.mlp.experts.gate_up_proj",
    "model.layers.0.mlp.experts.down_proj",
    "model.layers.1.mlp.gate_proj.weight",
    "model.layers.2.self_attn.k_norm.weight",
    "lm_head.weight",
]


def build_config():
    return Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
        mlp_only_layers=[1], rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
        router_aux_loss_coef=0.01, max_position_embeddings=64, output_router_logits=True,
        use_sliding_window=False, attention_bias=False)


def forward_loss(model, ids):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    inputs, targets = ids[:, :16], ids[:, 1:]
    out = model(input_ids=inputs, output_router_logits=True)
    logits = out.logits.float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    cfg = model.config
    aux = load_balancing_loss_func(out.router_logits, cfg.num_experts, cfg.num_experts_per_tok, None)
    return logits, ce, aux


def make(out_dir):
    torch.manual_seed(0)
    cfg = build_config()
    model = Qwen3MoeForCausalLM(cfg).float()
    # Random (not default-initialised) norms so the norm weights are exercised too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(os.path.join(out_dir, "model"), safe_serialization=True)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 17), generator=g)
    logits, ce, aux = forward_loss(model, ids)
    loss = ce + cfg.router_aux_loss_coef * aux
    loss.backward()
    params = dict(model.named_parameters())
    tensors = {
        "input_ids": ids.to(torch.int32).contiguous(),
        "logits": logits.detach().contiguous(),
        "ce_loss": ce.detach().reshape(1),
        "aux_loss": aux.detach().float().reshape(1),
        "loss": loss.detach().reshape(1),
    }
    for name in GRAD_PARAMS:
        tensors["grad." + name] = params[name].grad.detach().float().contiguous()
    save_file(tensors, os.path.join(out_dir, "fixture.safetensors"))
    files = sorted(os.listdir(os.path.join(out_dir, "model")))
    print(json.dumps({"loss": loss.item(), "ce": ce.item(), "aux": aux.item(), "model_files": files}))


def check(out_dir, saved_dir):
    fixture = load_file(os.path.join(out_dir, "fixture.safetensors"))
    model = Qwen3MoeForCausalLM.from_pretrained(saved_dir, torch_dtype=torch.float32)
    ids = fixture["input_ids"].long()
    with torch.no_grad():
        logits, ce, aux = forward_loss(model, ids)
    ref = fixture["logits"]
    rel = ((logits - ref).abs().max() / ref.abs().max()).item()
    print(json.dumps({"max_rel_logits": rel, "ce": ce.item(), "aux": aux.item()}))
    if rel > 1e-5:
        sys.exit(f"moetp-saved checkpoint gives different logits in transformers: max rel error {rel}")
    print("moetp-saved checkpoint loads in transformers with the same logits")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 2:
        os.makedirs(sys.argv[1], exist_ok=True)
        make(sys.argv[1])
    else:
        sys.exit(__doc__)
