"""The compute-bound job's policy: a 20.4M-parameter Llama built from config (`SIZE`) with the arithmetic example's
character tokenizer, after a short supervised warm start on scratchpads (`examples.scratch.task`) so that its
completions have the task's format and lengths. Built once, cached at the config's `model.path`."""

from __future__ import annotations

import os
import time

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from examples.arith.model import tiny_config
from examples.arith.tokenizer import build_tokenizer
from examples.arith.warmstart import _save_atomically, is_complete
from examples.scratch.task import make_rows, scratchpad

SIZE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 8, "max_position_embeddings": 256}
MAX_LENGTH = 256
RECIPE = {"task": "scratch", "steps": 100, "batch": 16, "lr": 1e-3, "warmup": 10, "seed": 0, "size": SIZE}


def _batch(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids `[N, T]`, attention mask `[N, T]` and labels `[N, T]` (loss on the completion and EOS)."""
    seqs, labels = [], []
    for row in rows:
        p = tokenizer(row["prompt"])["input_ids"]
        c = tokenizer(scratchpad(row), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, mask, lab


def prepare(path: str) -> str:
    """Return `path` holding the warm-started 20M policy, building it first (a few minutes on 2 cores) if missing."""
    path = os.path.abspath(path)
    if is_complete(path, RECIPE):
        return path
    r = RECIPE
    torch.manual_seed(r["seed"])
    tokenizer = build_tokenizer(max_length=MAX_LENGTH)
    model = LlamaForCausalLM(tiny_config(tokenizer, **SIZE))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[warmstart] building {path}: {n_params / 1e6:.1f}M parameters, {r['steps']} SFT steps", flush=True)
    rows = make_rows("train", r["steps"] * r["batch"], seed=r["seed"] + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.98), fused=True)
    start, running = time.time(), 0.0
    model.train()
    for step in range(r["steps"]):
        ids, mask, lab = _batch(tokenizer, rows[step * r["batch"] : (step + 1) * r["batch"]])
        for g in opt.param_groups:
            g["lr"] = r["lr"] * min(1.0, (step + 1) / r["warmup"])
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % 25 == 0:
            print(f"[warmstart] step {step + 1}: loss {running:.3f} ({time.time() - start:.0f}s)", flush=True)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=96)
    info = {**RECIPE, "params": n_params, "loss": running, "seconds": round(time.time() - start, 1)}
    _save_atomically(model, tokenizer, path, info, RECIPE)
    print(f"[warmstart] done in {info['seconds']:.0f}s -> {path}", flush=True)
    return path
