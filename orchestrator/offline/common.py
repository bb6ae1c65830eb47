"""Pieces shared by the offline preference trainers (train_rm, train_dpo): the model directory, the
optimizer and its schedule, seeded batches, a progress display and an atomic checkpoint write."""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from typing import Iterator

import torch

from actors.trainer import lr_lambda
from orchestrator.offline.config import LoggingConfig, OptimConfig


def load_job(kind, config: str, overrides: list[str], form: str):
    """(config, training rows, held-out rows or None) of an offline command, or the exit code 2 after
    printing why (a bad config or bad preference data), before any model is loaded."""
    from orchestrator.config import ConfigError
    from orchestrator.offline.config import load_preference_config
    from orchestrator.offline.preferences import PreferenceError, load_preferences

    try:
        cfg = load_preference_config(kind, config, overrides)
        form = form or cfg.form
        train_rows = load_preferences(cfg.data.train.source, cfg.data.train.kwargs, form)
        eval_rows = load_preferences(cfg.data.eval.source, cfg.data.eval.kwargs, form) if cfg.data.eval else None
    except ConfigError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    except PreferenceError as e:
        print(f"raylhf: data error: {e}", file=sys.stderr)
        return 2
    return cfg, train_rows, eval_rows


def batch_indices(n_rows: int, cfg: OptimConfig) -> list[list[int]]:
    """Row indices of every optimizer step: `epochs` seeded shuffles cut into `batch_size` pieces (a short last
    piece of an epoch is kept), stopped at `max_steps`."""
    steps: list[list[int]] = []
    for epoch in range(cfg.epochs):
        order = list(range(n_rows))
        random.Random(f"{cfg.seed}:{epoch}").shuffle(order)
        steps += [order[lo : lo + cfg.batch_size] for lo in range(0, n_rows, cfg.batch_size)]
    return steps[: cfg.max_steps] if cfg.max_steps else steps


def make_optimizer(params, cfg: OptimConfig, total_steps: int):
    """AdamW with linear warm-up then constant / linear / cosine decay to 0 over `total_steps`."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.lr_schedule, cfg.warmup_steps, total_steps))
    return opt, schedule


def chunks(n: int, size: int) -> Iterator[slice]:
    """Slices covering range(n) in pieces of at most `size`."""
    for lo in range(0, n, size):
        yield slice(lo, min(n, lo + size))


class StepProgress:
    """A tqdm bar over optimizer steps with the latest numbers; plain lines every `log_every` steps without it."""

    def __init__(self, total: int, desc: str, cfg: LoggingConfig):
        self.total, self.desc, self.every, self.bar = total, desc, cfg.log_every, None
        if cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0.5 if sys.stderr.isatty() else 10)

    def step(self, step: int, numbers: dict[str, float]) -> None:
        text = {k: f"{v:.4g}" for k, v in numbers.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.total:
            print(f"[{self.desc}] step {step}/{self.total} " + " ".join(f"{k} {v}" for k, v in text.items()),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def say(command: str, text: str) -> None:
    """A progress line of an offline command on stderr, e.g. "[train-dpo] ..."."""
    print(f"[{command}] {text}", file=sys.stderr, flush=True)


def finish(model, tokenizer, path: str, summary: dict, start: float) -> dict:
    """`summary` with the wall time and the output directory, after saving the model there with it."""
    summary["seconds"] = round(time.time() - start, 1)
    summary["output_dir"] = save_atomically(model, tokenizer, path, summary)
    return summary


def save_atomically(model, tokenizer, path: str, info: dict) -> str:
    """Write model + tokenizer + `info` (JSON, as `training.json`) into a sibling temp dir, then rename it
    onto `path`, replacing an older checkpoint there: a reader sees the old or the new, never half of one."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    old = None
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "checkpoint"))
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, old):
            if leftover and os.path.exists(leftover):
                shutil.rmtree(leftover)
    return path
