"""Build the example policy: a tiny model, a short supervised warm start, an atomic checkpoint."""

from __future__ import annotations

import json
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
# Supervised steps until validation accuracy reaches TARGET_ACCURACY (checked every CHECK_EVERY steps),
# on one thread so the same floating-point order gives the same policy on every run on a machine.
# 3-digit addition is learned in a sudden jump whose timing moves with any numeric detail: on two
# machines the same 1000 steps gave 43% and 1%, and LR 3e-3 sat at the edge of divergence (6e-3
# diverged). At LR 1e-3 the jump came smoothly (9% at step 700, 42% at 1000, 79% at 1300), and
# stopping at a target gives every CPU a start of about the same accuracy for RL to improve on.
MAX_STEPS = 3000
TARGET_ACCURACY: float | None = 0.40
CHECK_EVERY = 50
BATCH = 64
LR = 1e-3
WARMUP = 20
MAX_NEW_TOKENS = 10  # "#### " + up to 4 digits + EOS
VALIDATION_ROWS = 256  # train-split problems never trained on; the run's eval split stays untouched
EVAL_ROWS = 256  # eval-split problems, reported (not used for stopping)
VALIDATION_SEED = 10_000


# The distillation teacher (docs/algorithms.md): the same recipe on a model ~3.4x the policy's size (3 layers of
# width 192 instead of 2 of 128), trained until 90% validation accuracy instead of 40%.
TEACHER_SIZE = {"hidden_size": 192, "intermediate_size": 576, "num_hidden_layers": 3, "num_attention_heads": 6,
                "num_key_value_heads": 6}
TEACHER_TARGET = 0.90
TEACHER_MAX_STEPS = 4000


def recipe(max_steps: int = MAX_STEPS, target: float | None = TARGET_ACCURACY, seed: int = 0,
           size: dict | None = None) -> dict:
    """The settings a warm start is built with; a cached checkpoint built otherwise is rebuilt. `size`: overrides
    of the model's shape (`examples.arith.model.DEFAULTS`), recorded only when given."""
    out = {"max_steps": max_steps, "target": target, "seed": seed, "lr": LR, "batch": BATCH, "warmup": WARMUP,
           "check_every": CHECK_EVERY}
    return out | ({"size": size} if size else {})


def is_complete(path: str, settings: dict | None = None) -> bool:
    """True iff `path` holds a finished checkpoint (the marker is the last file written), built with
    `settings` when they are given (a checkpoint from an older recipe does not count)."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return False
    if settings is None:
        return True
    with open(marker) as f:
        info = json.load(f)
    return all(info.get(k) == v for k, v in settings.items())


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


def _lr_at(step: int) -> float:
    """Linear warm-up, then constant: the run stops on accuracy, not at a known step."""
    return LR * min(1.0, (step + 1) / WARMUP)


def _train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    max_steps: int,
    target: float | None,
    seed: int,
) -> dict:
    """Supervised warm start until validation accuracy reaches `target` (None: run all steps)."""
    rows = make_rows("train", max_steps * BATCH, seed=seed)
    trained = {r["prompt"] for r in rows}
    candidates = make_rows("train", VALIDATION_ROWS + len(trained), seed=VALIDATION_SEED)
    validation = [r for r in candidates if r["prompt"] not in trained][:VALIDATION_ROWS]
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
    start, running, accuracy, step = time.time(), 0.0, None, 0
    for step in range(max_steps):
        ids, mask, lab = _encode(tokenizer, rows[step * BATCH : (step + 1) * BATCH])
        for g in opt.param_groups:
            g["lr"] = _lr_at(step)
        model.train()
        loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = 0.9 * running + 0.1 * loss.item() if step else loss.item()
        if (step + 1) % CHECK_EVERY == 0 or step + 1 == max_steps:
            accuracy = greedy_accuracy(model, tokenizer, validation, MAX_NEW_TOKENS)
            print(f"[warmstart] step {step + 1}: loss {running:.3f}, validation accuracy {accuracy:.1%} "
                  f"({time.time() - start:.0f}s)", flush=True)
            if target is not None and accuracy >= target:
                break
    return {"steps_run": step + 1, "loss": running, "validation_accuracy": accuracy}


def prepare(path: str, max_steps: int = MAX_STEPS, target: float | None = TARGET_ACCURACY, seed: int = 0,
            size: dict | None = None) -> str:
    """Return `path` holding the warm-started example policy, building it first if it is missing.

    Training stops at the first check where validation accuracy reaches `target` (None: never). `size` overrides
    the model's shape (the distillation teacher's).
    """
    path = os.path.abspath(path)
    settings = recipe(max_steps, target, seed, size)
    if is_complete(path, settings):
        return path
    if is_complete(path):
        print(f"[warmstart] {path} was built with other settings; rebuilding it", flush=True)
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same floating-point order, hence the same policy, each time
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(tokenizer, **(size or {})))
    n_params = sum(p.numel() for p in model.parameters())
    goal = f"until validation accuracy >= {target:.0%}, at most " if target is not None and max_steps else ""
    print(f"[warmstart] building {path}: {n_params / 1e6:.2f}M parameters, SFT {goal}{max_steps} steps", flush=True)
    info = {**settings, "params": n_params}
    try:
        if max_steps:
            info.update(_train(model, tokenizer, max_steps, target, seed))
            eval_rows = make_rows("eval", EVAL_ROWS)
            info["eval_accuracy"] = greedy_accuracy(model, tokenizer, eval_rows, MAX_NEW_TOKENS)
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    info["seconds"] = round(time.time() - start, 1)
    _save_atomically(model, tokenizer, path, info, settings)
    acc = f", held-out greedy accuracy {info['eval_accuracy']:.1%}" if "eval_accuracy" in info else ""
    print(f"[warmstart] done in {info['seconds']:.0f}s{acc} -> {path}", flush=True)
    return path


def prepare_teacher(path: str) -> str:
    """Return `path` holding the distillation teacher (`TEACHER_SIZE`, SFT to `TEACHER_TARGET`), building it first
    if it is missing: a bigger, better model of the same tokenizer for `distill.teacher`."""
    return prepare(path, TEACHER_MAX_STEPS, TEACHER_TARGET, size=TEACHER_SIZE)


def build_random(path: str, seed: int = 0) -> str:
    """An untrained (random-init) example policy at `path`: fast, for tests."""
    return prepare(path, max_steps=0, seed=seed)


def _save_atomically(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, path: str, info: dict,
                     settings: dict | None = None) -> None:
    """Write into a sibling temp dir, marker last, then rename it onto `path` (`settings`: the recipe it was built
    with, this module's by default)."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(info, f, indent=2)
        if is_complete(path, settings or {k: info[k] for k in recipe()}):  # another process finished first: keep it
            return
        if os.path.exists(path):  # leftovers of an interrupted build without the marker
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
