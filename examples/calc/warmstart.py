"""Build the calculator example's policy: a tiny model taught both ways of answering (a call to the tool, then the
answer copied from its result; or a direct guess), the tool in only a minority of its examples, so that greedy
decoding starts out guessing and RL has a better behaviour to find."""

from __future__ import annotations

import os
import time

import torch
from transformers import GenerationConfig, LlamaForCausalLM

from actors.engines.hf import HFEngine
from actors.env_host import EnvHost
from actors.evaluation import greedy_sampling, requests_from_rows
from actors.rollout import RolloutWorker
from examples.arith.model import tiny_config
from examples.arith.tokenizer import build_tokenizer
from examples.arith.warmstart import _save_atomically, is_complete
from examples.calc.task import RESULT_TEMPLATE, TOOL_CHARS, make_rows, transcript
from rewards.final_answer import hash_answer

STEPS = 300
BATCH = 64
LR = 2e-3
WARMUP = 20
TOOL_FRAC = 0.3  # share of warm-start examples that call the tool
MAX_POSITIONS = 96
MAX_NEW_TOKENS = 24  # per turn: "<calc>123*45</calc>" is 19 tokens
ENV = dict(name="rewards.tool_env:ToolEnv", kwargs={"tools": ["examples.calc.task:calc"],
                                                   "result_template": RESULT_TEMPLATE})
LIMITS = dict(max_turns=3, max_total_tokens=64)


def recipe(steps: int = STEPS, seed: int = 0) -> dict:
    """The settings a warm start is built with; a cached checkpoint built otherwise is rebuilt."""
    return {"example": "calc", "steps": steps, "seed": seed, "lr": LR, "batch": BATCH, "tool_frac": TOOL_FRAC}


def _encode(tokenizer, rows: list[dict], rng: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and labels: loss on what the model writes (and EOS), none on the prompt or
    on the tool's result."""
    seqs, labels = [], []
    for row in rows:
        ids = tokenizer(row["prompt"])["input_ids"]
        lab = [-100] * len(ids)
        use_tool = bool(torch.rand((), generator=rng) < TOOL_FRAC)
        for text, written in transcript(row, use_tool):
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += piece
            lab += piece if written else [-100] * len(piece)
        ids.append(tokenizer.eos_token_id)
        lab.append(tokenizer.eos_token_id)
        seqs.append(ids)
        labels.append(lab)
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    return (torch.tensor([s + [pad] * (width - len(s)) for s in seqs]),
            torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]),
            torch.tensor([s + [-100] * (width - len(s)) for s in labels]))


def multiturn_eval(model, tokenizer, rows: list[dict]) -> dict[str, float]:
    """Greedy held-out accuracy with the tool available (multi-turn, in this process) and the share of problems on
    which the model called it."""
    side, was_training = tokenizer.padding_side, model.training
    model.eval()
    try:
        worker = RolloutWorker.serving(HFEngine.from_model(model, tokenizer), env=LIMITS)
        host = EnvHost(ENV["name"], ENV["kwargs"], timeout_s=30.0)
        with torch.no_grad(), torch.random.fork_rng():
            groups = worker.generate(requests_from_rows(rows, tokenizer),
                                     greedy_sampling(MAX_NEW_TOKENS, ("</calc>",)), [host])
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    samples = [(g, s) for g in groups for s in g.samples]
    return {"accuracy": sum(hash_answer("", s.text, g.row["answer"]) for g, s in samples) / len(samples),
            "tool_use": sum(g.env_stats.get("used_tool", 0.0) for g in groups) / len(samples)}


def prepare(path: str, steps: int = STEPS, seed: int = 0) -> str:
    """Return `path` holding the warm-started calculator policy, building it first if it is missing."""
    path = os.path.abspath(path)
    settings = recipe(steps, seed)
    if is_complete(path, settings):
        return path
    start, threads = time.time(), torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same floating-point order, hence the same policy, each time
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(TOOL_CHARS, MAX_POSITIONS)
    model = LlamaForCausalLM(tiny_config(tokenizer, max_position_embeddings=MAX_POSITIONS))
    print(f"[calc-warmstart] building {path}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"SFT {steps} steps, {TOOL_FRAC:.0%} of examples with the tool", flush=True)
    info = dict(settings)
    try:
        rows = make_rows("train", steps * BATCH, seed=seed)
        rng = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0, betas=(0.9, 0.98))
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = LR * min(1.0, (step + 1) / WARMUP)
            ids, mask, lab = _encode(tokenizer, rows[step * BATCH : (step + 1) * BATCH], rng)
            loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % 100 == 0:
                print(f"[calc-warmstart] step {step + 1}: loss {loss.item():.3f} ({time.time() - start:.0f}s)",
                      flush=True)
        if steps:
            info |= {f"eval_{k}": v for k, v in multiturn_eval(model, tokenizer, make_rows("eval", 256)).items()}
    finally:
        torch.set_num_threads(threads)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=MAX_NEW_TOKENS)
    info["seconds"] = round(time.time() - start, 1)
    _save_atomically(model, tokenizer, path, info, settings)
    print(f"[calc-warmstart] done in {info['seconds']:.0f}s: {info} -> {path}", flush=True)
    return path
