"""Where a step's seconds go, for a few settings of the example job, side by side.

Run: python benchmarks/step_breakdown.py [--steps 60] [--settings on_policy recompute async] [--out runs/step_breakdown]
Each setting is one `raylhf train examples/arith_grpo.yaml` run (same seed, so the same prompts; the sampled
completions are identical wherever the weights are) with `loop.eval_every=0` (held-out accuracy before and after
only) and the setting's overrides; this prints, per setting, the mean over steps (the first 2, warm-up, left
out) of the step-time breakdown (see docs/performance.md), the overhead's share of the summed step time,
generated tokens per second, staleness, the rollout/trainer log-prob mismatch, and held-out greedy accuracy.
Timings move with whatever else runs on the machine: compare settings measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {
    "on_policy": [],  # the example as it is: pi_old from the rollout's log-probs, no scoring pool, threads: auto
    "one_thread": ["rollout.threads=1", "trainer.threads=1", "scoring.threads=1"],  # the default before auto
    "spin": [],  # threads: auto with libgomp's own wait (spin ~3 ms, then sleep) instead of PASSIVE: see ENV
    "recompute": ["algorithm.old_logprobs=recompute"],  # a ScoringWorker re-scores pi_old (the old default)
    "async": ["loop.max_staleness=1"],  # the next step generates while this one trains
    "async_1thread": ["loop.max_staleness=1", "rollout.threads=1"],
    "on_policy_1thread": ["rollout.threads=1"],
    "no_skip": ["algorithm.skip_zero_advantage=false"],  # all-equal groups run through the trainer too
    "small_calls": ["rollout.prompts_per_call=8", "trainer.micro_batch_size=64"],  # the example's earlier batching
}
ENV = {"spin": {"GOMP_SPINCOUNT": "300000"}}  # environment of a setting's run (the actors take the driver's)
KEYS = ["time/step", "time/rollout", "time/generate", "time/reward", "time/score", "time/train_forward_backward",
        "time/optimizer", "time/sync", "time/overhead"]


def run(name: str, steps: int, out: Path) -> dict:
    run_dir = out / name
    sets = [f"loop.steps={steps}", "loop.eval_every=0", "logging.progress=false", *SETTINGS[name]]
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "examples/arith_grpo.yaml", "--run-dir", str(run_dir)]
    subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   env=os.environ | ENV.get(name, {}))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "reward/mean" in r][2:]
    row = {k: statistics.fmean(r[k] for r in steps_) for k in KEYS if k in steps_[0]}
    row["overhead_share"] = sum(r["time/overhead"] for r in steps_) / sum(r["time/step"] for r in steps_)
    row["tokens_per_s"] = sum(r["tokens/generated"] for r in steps_) / sum(r["time/step"] for r in steps_)
    row["staleness"] = statistics.fmean(r["staleness"] for r in steps_)
    row["mismatch_abs_max"] = max(r["mismatch/logprob_abs_max"] for r in steps_)
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    row["eval_before"], row["eval_after"] = evals[0], evals[-1]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--settings", nargs="+", default=["on_policy", "recompute", "async"], choices=list(SETTINGS))
    ap.add_argument("--out", default="runs/step_breakdown")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = {name: run(name, args.steps, out) for name in args.settings}
    (out / "result.json").write_text(json.dumps(rows, indent=1) + "\n")
    names = list(rows)
    print(f"{'':28s}" + "".join(f"{n:>18s}" for n in names))
    for key in dict.fromkeys(k for row in rows.values() for k in row):  # every key, first-seen order
        print(f"{key:28s}" + "".join(f"{rows[n].get(key, float('nan')):18.4g}" for n in names))
    print(f"written: {out / 'result.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
