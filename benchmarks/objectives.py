"""Held-out accuracy of the example after the same number of steps with each policy objective, and with on-policy
distillation from a bigger, better teacher: the table of docs/algorithms.md.

Run: python benchmarks/objectives.py [--steps 150] [--rows ppo gspo ...] [--out runs/objectives]
Each row is one `raylhf train` run of the example job (examples/arith_grpo.yaml, or examples/arith_distill.yaml for
the distillation rows) with `loop.steps=STEPS`, `loop.eval_every=0` (held-out greedy accuracy on the config's 500
eval problems before and after only), `trainer.num_minibatches=4` (see COMMON) and the row's overrides; the same
seed, prompts and warm-started policy (checkpoints/arith-sft) in every row. The teacher (checkpoints/arith-teacher, `examples.arith.warmstart:
prepare_teacher`) is built first when missing. Writes OUT/table.md (the markdown table, also printed) and
OUT/result.json (every row's numbers and the wall time).
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

REPO = Path(__file__).resolve().parent.parent
GRPO, DISTILL = "examples/arith_grpo.yaml", "examples/arith_distill.yaml"
ROWS = {  # name: (config, overrides)
    "ppo": (GRPO, ["algorithm.policy_loss=ppo"]),
    "gspo": (GRPO, ["algorithm.policy_loss=gspo"]),  # the paper's clip 3e-4 / 4e-4, seq-mean-token-mean
    "cispo": (GRPO, ["algorithm.policy_loss=cispo"]),  # clip_low 1.0 (no lower bound), clip_high 0.28
    "ppo + distillation": (DISTILL, []),
    "distillation alone": (DISTILL, ["reward.functions=[{name: 'rewards.final_answer:hash_answer', weight: 0}]",
                                     "reward.accuracy_label=hash_answer"]),
}
# Four optimizer steps per batch: with one, every update is on-policy (r = 1 everywhere), where ppo, gspo and cispo
# give the same gradient up to aggregation; from the second mini-batch on the ratio moves and the objectives part.
COMMON = ["trainer.num_minibatches=4"]
HEADER = ("| run | config | held-out greedy accuracy, step 0 → last step | change | seconds per step (median) |\n"
          "|---|---|---|---|---|")


def run(name: str, steps: int, out: Path) -> dict:
    """One row: its `raylhf train` run, read back from metrics.jsonl."""
    config, overrides = ROWS[name]
    run_dir = out / name.replace(" ", "_").replace("+", "and")
    sets = [f"loop.steps={steps}", "loop.eval_every=0", "logging.progress=false", "checkpoint.every=0", *COMMON,
            *overrides]
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", config, "--run-dir", str(run_dir)]
    start = time.perf_counter()
    subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    trained = [r for r in records if "reward/mean" in r]
    return {"config": config, "overrides": overrides, "steps": len(trained), "eval_before": evals[0],
            "eval_after": evals[-1], "step_s": statistics.median(r["time/step"] for r in trained),
            "wall_s": time.perf_counter() - start,
            **({"reverse_kl_first": trained[0]["distill/reverse_kl"], "reverse_kl_last": trained[-1]["distill/reverse_kl"]}
               if "distill/reverse_kl" in trained[0] else {})}


def table(rows: dict[str, dict]) -> str:
    """The markdown table of docs/algorithms.md."""
    lines = [HEADER]
    for name, r in rows.items():
        config = r["config"].removeprefix("examples/") + "".join(f" `--set {o}`" for o in r["overrides"]
                                                                  if not o.startswith("reward."))
        config += " with reward weight 0" if any(o.startswith("reward.") for o in r["overrides"]) else ""
        lines.append(f"| {name} | {config} | {r['eval_before']:.1%} → {r['eval_after']:.1%} ({r['steps']} steps) | "
                     f"{100 * (r['eval_after'] - r['eval_before']):+.1f} | {r['step_s']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150, help="training steps of every run")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), help="which runs")
    ap.add_argument("--out", default="runs/objectives")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    start = time.perf_counter()
    sys.path.insert(0, str(REPO))
    from examples.arith.warmstart import prepare_teacher

    if any(ROWS[name][0] == DISTILL for name in args.rows):
        prepare_teacher(str(REPO / "checkpoints" / "arith-teacher"))
    rows = {name: run(name, args.steps, out) for name in args.rows}
    text = table(rows)
    wall = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "result.json").write_text(json.dumps({"rows": rows, "wall_s": wall}, indent=1) + "\n")
    print(text)
    print(f"wall time {wall:.0f} s; written: {out / 'table.md'}, {out / 'result.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
