"""Build the example policy: a tiny model, a short supervised warm start, an atomic checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import torch
from transformers import GenerationConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from examples.arith.evaluate import greedy_accuracy
from examples.arith.model import tiny_config
from examples.arith.task import make_rows, sft_completion
from examples.arith.tokenizer import build_tokenizer

MARKER = "warmstart.json"  # written last; a directory without it is an unfinished build
STEPS = 300  # SFT steps: leaves held-out accuracy well below the ceiling, so RL has headroom
BATCH = 64
LR = 3e-3
WARMUP = 20
MAX_NEW_TOKENS = 10  # "#### " + up to 4 digits + EOS
EVAL_ROWS = 256
LOG_EVERY = 50


def is_complete(path: str) -> bool:
    """True iff `path` holds a finished checkpoint (the marker is the last file written)."""
    return os.path.isfile(os.path.join(path, MARKER))


def _encode(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> tuple[torch.Tensor, ...]:
    """Right-padded input ids, attention mask and labels with loss only on completion + EOS."""
    seqs, labels = [], []
    for row in rows:
        p = tokenizer(row["prompt"])["input_ids"]  # starts with <bos>
        c = tokenizer(sft_completion(row), add_special_tokens=False)["input_ids"]
        c = c + [tokenizer.eos_token_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [N, T]
    lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])  # [N, T]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [N, T]
    return ids, mask, lab


def _lr_at(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of LR."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    frac = (step - WARMUP) / max(steps - WARMUP, 1)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, steps: int, seed: int) -> float:
    """Supervised warm start on fresh train problems; returns the last logged loss."""
    ids, mask, lab = _encode(tokenizer, make_rows("train", steps * BATCH, seed=seed))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
    model.train()
    start, running = time.time(), 0.0
    for step in range(steps):
        sl = slice(step * BATCH, (step + 1) * BATCH)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps)
        loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=lab[sl]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == steps:
            print(f"[warmstart] step {step + 1}/{steps} loss {running:.4f} ({time.time() - start:.0f}s)", flush=True)
    return running


def prepare(path: str, steps: int | None = None, seed: int = 0) -> str:
    """Return `path` holding the warm-started example policy, building it first if it is missing."""
    path = os.path.abspath(path)
    if is_complete(path):
        return path
    steps = STEPS if steps is None else steps
    start = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[warmstart] building {path}: {n_params / 1e6:.2f}M parameters, {steps} SFT steps", flush=True)
    info = {"steps": steps, "seed": seed, "params": n_params}
    if steps:
        info["loss"] = _train(model, tokenizer, steps, seed)
        info["eval_accuracy"] = greedy_accuracy(model, tokenizer, make_rows("eval", EVAL_ROWS), MAX_NEW_TOKENS)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    info["seconds"] = round(time.time() - start, 1)
    _save_atomically(model, tokenizer, path, info)
    acc = f", held-out greedy accuracy {info['eval_accuracy']:.1%}" if "eval_accuracy" in info else ""
    print(f"[warmstart] done in {info['seconds']:.0f}s{acc} -> {path}", flush=True)
    return path


def build_random(path: str, seed: int = 0) -> str:
    """An untrained (random-init) example policy at `path`: fast, for tests."""
    return prepare(path, steps=0, seed=seed)


def _save_atomically(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, path: str, info: dict) -> None:
    """Write into a sibling temp dir, marker last, then rename it onto `path`."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f, indent=2)
        if is_complete(path):  # another process finished first; keep its checkpoint
            return
        if os.path.exists(path):  # leftovers of an interrupted build without the marker
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
