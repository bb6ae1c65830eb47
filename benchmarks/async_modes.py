"""Asynchronous modes side by side on a job where training keeps going: on-policy (one thread per actor, and the
machine's cores per actor), `loop.max_staleness` 1 and 2, 2 with partial rollouts, and decoupled PPO.

Run (the lead's command; about 15 minutes on an idle 2-core machine, see "Budget" below):

    python benchmarks/async_modes.py --steps 6 --out runs/async_modes

Options: --config JOB.yaml (default examples/arith_scratch_grpo.yaml; `toy` is the old random-init job),
--modes ... (default DEFAULT_MODES; also async2_2rollout, async1_decoupled, async2_partial_decoupled),
--repeats N, --steps N, --eval-every N, --eval-size N, --metric KEY, --threshold X, --lr X (default: the config's).

The job (default): issue 20's compute-bound GRPO job, scratchpad addition with a 20.5M-parameter Llama warm-started
by `examples/scratch/warmstart.py` (built on the first run, ~35 minutes on 2 cores: copy
`checkpoints/arith-scratch-20m` from a checkout that has it), 8 prompts x G 8 per step, responses of 22-85 tokens, a
partial-credit reward per answer digit, so groups keep differing in reward and every step trains (training is about
two thirds of an on-policy step on one thread). One rollout worker and one trainer rank.

Modes (`MODES`): `on_policy` (max_staleness 0, one torch thread per actor, the project default), `on_policy_cores`
(max_staleness 0 with every core per actor: generation and training take turns, so each may use all cores: on-policy
at its best), `async1`, `async2`, `async2_partial` (+ rollout.partial), `async2_decoupled` (+ algorithm.decoupled),
all asynchronous modes at one thread per actor (each actor its own core). `async2_2rollout`: 2 rollout workers and
one trainer (the issue's "trainer busy most of the step"; three single-threaded actors on 2 cores here): checked in
a 2-step run at load 14, trainer utilization 0.72 in the first step (which also fills the rounds ahead), 1.00 in the
second.

The modes run interleaved (mode after mode, `--repeats` times), each a full `raylhf train` from the same warm start
with the same seed and prompts, so a slow patch of the machine hits them alike. Per mode it prints generated tokens/s
over every step (`tokens/generated` summed / `time/step` summed), the mean completion length, the wall time from the
first step to the first held-out evaluation at or above `--threshold` (summed step and evaluation walls; none: not
reached), the held-out values of `--metric` at each evaluation, the mean version lag per token, the trainer's
utilization (busy share of the step) and the 1-minute load average before and after (another job on the machine
shows there). Compare ratios measured in one run; absolute timings move with the machine.

Threshold (`--metric`, `--threshold`): the held-out greedy accuracy (answer exactly right) is 0.0 for the warm start
and stayed 0.0 in every short run of this job seen (10 steps at the config's lr 3e-5; 6 at lr 1e-4), so the default
threshold is on `eval/reward`, the mean partial credit of the greedy answers on 64 held-out prompts: 0.100 for the
warm start, default threshold 0.12. Short runs move it slowly and noisily: on-policy at lr 1e-4 read 0.100 -> 0.062 ->
0.088 at steps 0, 3, 6; at lr 3e-5 (32 prompts) 0.072 -> 0.078 -> 0.100 at steps 0, 5, 10. So a 6-step run will most
likely report "none" for every mode: time to the threshold needs a longer run, e.g. `--steps 20 --eval-every 4 --modes
on_policy_cores async2_partial async2_decoupled` (about 15 minutes more).

Budget, estimated from 1-6 step checks on the shared 2-core machine at load average 9-17 (2026-12-04): on-policy,
6 steps took 305 s (steps 182 s, three evaluations of 64 prompts 36 s, start-up and the final save 87 s); an
asynchronous step took 12-14 s after a first step of 38-58 s (it also generates the rounds ahead). Scaled to a quiet
machine (on-policy 18.2 s a step at load 4-6, benchmarks/README.md), a mode takes about 2.5-3 minutes, the six
default modes about 15-16 minutes. `on_policy_cores` needs the machine to itself: at load 7-11 its steps took 73-94 s
(generation 47-63 s on two OpenMP threads that stall each other with other processes about), 2 steps 5 minutes.
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
DEFAULT_CONFIG = "examples/arith_scratch_grpo.yaml"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
MODES = {
    "on_policy": {"loop": {"max_staleness": 0}},
    "on_policy_cores": {"loop": {"max_staleness": 0}, "rollout": {"threads": CORES}, "trainer": {"threads": CORES}},
    "async1": {"loop": {"max_staleness": 1}},
    "async2": {"loop": {"max_staleness": 2}},
    "async2_partial": {"loop": {"max_staleness": 2}, "rollout": {"partial": True}},
    "async2_decoupled": {"loop": {"max_staleness": 2}, "algorithm": {"decoupled": True}},
    # not run by default:
    "async1_decoupled": {"loop": {"max_staleness": 1}, "algorithm": {"decoupled": True}},
    "async2_partial_decoupled": {"loop": {"max_staleness": 2}, "rollout": {"partial": True},
                                 "algorithm": {"decoupled": True}},
    "async2_2rollout": {"loop": {"max_staleness": 2}, "rollout": {"num_workers": 2}},
}
DEFAULT_MODES = ["on_policy", "on_policy_cores", "async1", "async2", "async2_partial", "async2_decoupled"]
METRIC, THRESHOLD = "eval/reward", 0.12  # held-out value to reach on the default job (see the module docstring)
TOY_SIZE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
            "num_key_value_heads": 8}


def merge(base: dict, over: dict) -> dict:
    """`base` with `over`'s sections merged in, one level deep (section -> field)."""
    out = dict(base)
    for section, values in over.items():
        out[section] = {**out.get(section, {}), **values} if isinstance(values, dict) else values
    return out


def base_job(config: str, out: Path, steps: int, eval_every: int, eval_size: int, lr: float | None) -> dict:
    """The job every mode starts from: `config` (or the toy job) with the benchmark's loop, evaluation and logging,
    and one torch thread per rollout worker and trainer rank (`threads: auto` would give on-policy every core; the
    `on_policy_cores` mode asks for that)."""
    cfg = toy_job(out) if config == "toy" else yaml.safe_load((REPO / config).read_text())
    cfg = merge(cfg, {"loop": {"steps": steps, "eval_every": eval_every, "eval_size": eval_size},
                      "rollout": {"threads": 1}, "trainer": {"threads": 1},
                      "logging": {"progress": False, "tensorboard": False, "sample_groups": 0},
                      "checkpoint": {"every": 0}})
    if lr is not None:
        cfg = merge(cfg, {"trainer": {"lr": lr}})
    return cfg


def toy_job(out: Path) -> dict:
    """The earlier job: a random-init 20M Llama rewarded for writing 7s (`benchmarks/async_task.py`), which
    on-policy solves in two steps, after which every group ties and training costs nothing."""
    return {
        "model": {"path": build_toy_model(out / "policy")},
        "data": {"train": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "train", "n": 4096}},
                 "eval": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "eval", "n": 64}}},
        "rollout": {"group_size": 8, "max_new_tokens": 96, "prompts_per_call": 2, "temperature": 1.0},
        "reward": {"functions": [{"name": str(REPO / "benchmarks" / "async_task.py") + ":sevens"}],
                   "accuracy_threshold": 0.5},
        "algorithm": {"estimator": "grpo", "kl_coef": 0.0},
        "trainer": {"lr": 5e-4, "micro_batch_size": 16},
        "loop": {"prompts_per_step": 8},
    }


def build_toy_model(path: Path) -> str:
    """The toy job's random-init ~20M-parameter policy (seeded), built once."""
    if (path / "config.json").is_file():
        return str(path)
    import torch
    from transformers import LlamaForCausalLM

    from examples.arith.model import tiny_config
    from examples.arith.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = LlamaForCausalLM(tiny_config(tok, **TOY_SIZE))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def run(job: dict, mode: str, run_dir: Path, metric: str, threshold: float) -> dict:
    """One `raylhf train` of `job` in `mode`; its numbers from metrics.jsonl."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "job.yaml"
    config.write_text(yaml.safe_dump(merge(job, MODES[mode])))
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--run-dir",
                        str(run_dir / "run")], cwd=REPO, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    samples = job["rollout"].get("group_size", 8) * job["loop"]["prompts_per_step"]
    return summarize(records, metric, threshold, samples) | {
        "wall_s": wall, "load_before": load_before, "load_after": os.getloadavg()[0]}


def summarize(records: list[dict], metric: str, threshold: float, samples_per_step: int) -> dict:
    """A run's numbers from its metrics.jsonl records (step 0: the evaluation before RL)."""
    steps = [r for r in records if r["step"] > 0]
    elapsed, reached = 0.0, None
    for r in steps:  # time to the threshold: summed step and evaluation walls from the first step on
        elapsed += r["time/step"] + r.get("time/eval", 0.0)
        if reached is None and r.get(metric, float("-inf")) >= threshold:
            reached = elapsed
    return {
        "tokens_per_s": sum(r["tokens/generated"] for r in steps) / sum(r["time/step"] for r in steps),
        "step_seconds": [round(r["time/step"], 2) for r in steps],
        "mean_completion_tokens": statistics.fmean(r["tokens/generated"] for r in steps) / samples_per_step,
        "reward_mean": statistics.fmean(r.get("reward/mean", float("nan")) for r in steps),
        "seconds_to_threshold": reached,
        "eval_accuracy": [r["eval/accuracy"] for r in records if "eval/accuracy" in r],
        "eval_reward": [round(r["eval/reward"], 4) for r in records if "eval/reward" in r],
        "eval_seconds": sum(r.get("time/eval", 0.0) for r in records),
        "lag_mean": statistics.fmean(r.get("async/lag_mean", 0.0) for r in steps),
        "trainer_utilization": statistics.fmean(r.get("utilization/trainer", 0.0) for r in steps),
        "rollout_utilization": statistics.fmean(r.get("utilization/rollout", 0.0) for r in steps),
        "steps_seconds": sum(r["time/step"] for r in steps),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="job YAML every mode starts from ('toy': the old job)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--metric", default=METRIC, help="held-out metric the threshold is on")
    ap.add_argument("--threshold", type=float, default=THRESHOLD, help="value of --metric to reach")
    ap.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES))
    ap.add_argument("--lr", type=float, default=None, help="trainer.lr of every mode (default: the config's)")
    ap.add_argument("--out", default="runs/async_modes")
    return ap


def main() -> None:
    args = parser().parse_args()
    out = Path(args.out).resolve()
    job = base_job(args.config, out, args.steps, args.eval_every, args.eval_size, args.lr)
    print(f"{args.config}: {args.steps} steps, modes {' '.join(args.modes)}, {CORES} cores, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    rows: dict[str, list[dict]] = {m: [] for m in args.modes}
    for rep in range(args.repeats):
        for mode in args.modes:
            rows[mode].append(run(job, mode, out / f"{mode}-{rep}", args.metric, args.threshold))
            print(mode, json.dumps(rows[mode][-1]), flush=True)
    (out / "result.json").write_text(json.dumps(rows, indent=1) + "\n")
    report(rows, args.modes[0], args.metric)
    print(f"written: {out / 'result.json'}")


def report(rows: dict[str, list[dict]], base_mode: str, metric: str) -> None:
    """One line per mode, tokens/s as a ratio to `base_mode`'s."""
    base = statistics.fmean(r["tokens_per_s"] for r in rows[base_mode])
    print(f"\n{'mode':26s}{'tokens/s':>10s}{'ratio':>8s}{'mean len':>10s}{'to thr. s':>11s}{'held-out':>20s}"
          f"{'lag':>6s}{'trainer util':>14s}{'load avg':>12s}")
    for mode, rs in rows.items():
        tps = statistics.fmean(r["tokens_per_s"] for r in rs)
        reach = [r["seconds_to_threshold"] for r in rs]
        reach_s = "none" if None in reach else f"{statistics.fmean(reach):.0f}"
        loads = f"{min(r['load_before'] for r in rs):.1f}-{max(r['load_after'] for r in rs):.1f}"
        key = "eval_reward" if metric == "eval/reward" else "eval_accuracy"
        acc = "/".join(f"{a:.3f}" for a in rs[0][key])
        print(f"{mode:26s}{tps:10.1f}{tps / base:8.2f}{statistics.fmean(r['mean_completion_tokens'] for r in rs):10.1f}"
              f"{reach_s:>11s}{acc:>20s}{statistics.fmean(r['lag_mean'] for r in rs):6.2f}"
              f"{statistics.fmean(r['trainer_utilization'] for r in rs):14.2f}{loads:>12s}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
