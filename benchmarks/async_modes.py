"""Asynchronous modes side by side on a compute-bound job: `loop.max_staleness` 0, 1, 2 and 2 with partial rollouts.

Run: python benchmarks/async_modes.py [--steps 20] [--repeats 1] [--modes on_policy async1 async2 async2_partial]
     [--lr 5e-4] [--out runs/async_modes]

The job: a random-init Llama of 20.5M parameters (hidden 512, 6 layers; the example's character tokenizer) built
from code, GRPO with G = 8, 8 prompts per step, completions of up to 96 tokens whose length varies (each ends at a
sampled EOS), rewarded by `benchmarks/async_task.py:sevens` (7s in the completion / 48, at most 1: long strings of
7s score 1), which a random policy learns over tens of steps; held-out greedy accuracy is the share of 64 held-out
prompts whose greedy completion scores >= 0.5, evaluated every 2 steps. One rollout worker and one trainer rank, one
torch thread each.

The modes run interleaved (mode after mode, `--repeats` times), each a full `raylhf train` (same seed, same prompts),
so a slow patch of the machine hits them alike; per mode it prints generated tokens per second over the steps after
the first two (`tokens/generated` summed / `time/step` summed) and over every step (a short asynchronous run's
last steps only drain the rounds buffered ahead, which flatters the first number), the mean completion length, the
wall time from the first step to the first evaluation at or above `--threshold` (none: not reached), the version
lag, the trainer's utilization, and the 1-minute load average before and after the run (another job on the machine
shows there).
Timings move with whatever else runs on the machine: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
MODES = {
    "on_policy": {"loop": {"max_staleness": 0}},
    "async1": {"loop": {"max_staleness": 1}},
    "async2": {"loop": {"max_staleness": 2}},
    "async2_partial": {"loop": {"max_staleness": 2}, "rollout": {"partial": True}},
    "async2_decoupled": {"loop": {"max_staleness": 2}, "algorithm": {"decoupled": True}},  # not run by default
}
DEFAULT_MODES = ["on_policy", "async1", "async2", "async2_partial"]
SIZE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
        "num_key_value_heads": 8}


def build_model(path: Path) -> str:
    """The random-init ~20M-parameter policy (seeded), built once."""
    if (path / "config.json").is_file():
        return str(path)
    import torch
    from transformers import LlamaForCausalLM

    from examples.arith.model import tiny_config
    from examples.arith.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(tok, **SIZE))
    print(f"policy: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", flush=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def job(model: str, steps: int, mode: str, lr: float) -> dict:
    cfg = {
        "model": {"path": model},
        "data": {"train": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "train", "n": 4096}},
                 "eval": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "eval", "n": 64}}},
        "rollout": {"group_size": 8, "max_new_tokens": 96, "prompts_per_call": 2, "temperature": 1.0},
        "reward": {"functions": [{"name": str(REPO / "benchmarks" / "async_task.py") + ":sevens"}],
                   "accuracy_threshold": 0.5},
        "algorithm": {"estimator": "grpo", "kl_coef": 0.0},
        "trainer": {"lr": lr, "micro_batch_size": 16},
        "loop": {"steps": steps, "prompts_per_step": 8, "eval_every": 2, "eval_size": 64},
        "logging": {"progress": False, "tensorboard": False, "sample_groups": 0},
    }
    for section, values in MODES[mode].items():
        cfg[section] = {**cfg[section], **values}
    return cfg


def run(model: str, steps: int, mode: str, run_dir: Path, threshold: float, lr: float) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "job.yaml"
    config.write_text(yaml.safe_dump(job(model, steps, mode, lr)))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--run-dir", str(run_dir / "run")],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if r["step"] > 0]
    measured = steps_[2:]
    elapsed, reached = 0.0, None
    for r in steps_:  # time to the threshold: summed step and evaluation walls from the first step on
        elapsed += r["time/step"] + r.get("time/eval", 0.0)
        if reached is None and r.get("eval/accuracy", -1.0) >= threshold:
            reached = elapsed
    return {
        "tokens_per_s": sum(r["tokens/generated"] for r in measured) / sum(r["time/step"] for r in measured),
        # every step: in a short run the asynchronous modes' last steps only drain the rounds buffered ahead (no
        # generation left to overlap), which flatters the steps-3-on number; this one is the run's throughput
        "tokens_per_s_all_steps": sum(r["tokens/generated"] for r in steps_) / sum(r["time/step"] for r in steps_),
        "mean_completion_tokens": statistics.fmean(r["tokens/generated"] for r in steps_) / (8 * 8),
        "seconds_to_threshold": reached,
        "eval_accuracy": [r["eval/accuracy"] for r in records if "eval/accuracy" in r],
        "lag_mean": statistics.fmean(r.get("async/lag_mean", 0.0) for r in measured),
        "trainer_utilization": statistics.fmean(r.get("utilization/trainer", 0.0) for r in measured),
        "steps_seconds": sum(r["time/step"] for r in steps_),
        "wall_s": wall,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.5, help="held-out greedy accuracy to reach")
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    ap.add_argument("--lr", type=float, default=5e-4, help="trainer.lr of every mode")
    ap.add_argument("--out", default="runs/async_modes")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    model = build_model(out / "policy")
    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        for mode in args.modes:
            rows[mode].append(run(model, args.steps, mode, out / f"{mode}-{rep}", args.threshold, args.lr))
            print(mode, json.dumps(rows[mode][-1]), flush=True)
    (out / "result.json").write_text(json.dumps(rows, indent=1) + "\n")
    base = statistics.fmean(r["tokens_per_s"] for r in rows[args.modes[0]])
    base_all = statistics.fmean(r["tokens_per_s_all_steps"] for r in rows[args.modes[0]])
    print(f"\n{'mode':16s}{'tokens/s':>10s}{'ratio':>8s}{'all steps':>10s}{'ratio':>8s}{'mean len':>10s}"
          f"{'to thr. s':>11s}{'lag':>6s}{'trainer util':>14s}{'load avg':>16s}")
    for mode, rs in rows.items():
        tps = statistics.fmean(r["tokens_per_s"] for r in rs)
        reach = [r["seconds_to_threshold"] for r in rs]
        reach_s = "none" if None in reach else f"{statistics.fmean(reach):.0f}"
        loads = f"{min(r['load_before'] for r in rs):.1f}-{max(r['load_after'] for r in rs):.1f}"
        tps_all = statistics.fmean(r["tokens_per_s_all_steps"] for r in rs)
        length = statistics.fmean(r["mean_completion_tokens"] for r in rs)
        print(f"{mode:16s}{tps:10.1f}{tps / base:8.2f}{tps_all:10.1f}{tps_all / base_all:8.2f}{length:10.1f}"
              f"{reach_s:>11s}{statistics.fmean(r['lag_mean'] for r in rs):6.2f}"
              f"{statistics.fmean(r['trainer_utilization'] for r in rs):14.2f}{loads:>16s}")
    print(f"written: {out / 'result.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
