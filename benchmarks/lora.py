"""LoRA against full fine-tuning on the GRPO example, at equal steps, side by side in one run.

Run: python benchmarks/lora.py [--steps 200] [--eval-size 500] [--out runs/lora_bench]
Two `raylhf train` runs one after the other (never side by side: they would share the cores), same seed, same
prompts, same warm start (checkpoints/arith-sft): `examples/arith_grpo.yaml` (full fine-tuning) and
`examples/arith_grpo_lora.yaml` (rank-8 adapters on every linear layer, its own learning rate), each with
`loop.steps=STEPS` (the cosine schedule spans the STEPS) and held-out greedy accuracy before and after only.
Per run it prints, from `metrics.jsonl`:

* held-out greedy accuracy before and after, and the gain in points;
* `optimizer/state_bytes`: what the trainer's optimizer holds (AdamW's two moments and ZeRO's fp32 master copy of
  the trained parameters);
* `memory/peak_rss_bytes`: peak resident memory of the trainer rank's process (its `ru_maxrss`, the largest
  over the steps), which includes the base model, torch and DeepSpeed themselves;
* `sync/bytes`: bytes of the weights each step's sync puts into the object store (every receiver reads them);
* the median step time and the run's wall time.
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
RUNS = {"full": "examples/arith_grpo.yaml", "lora": "examples/arith_grpo_lora.yaml"}


def run(name: str, steps: int, eval_size: int, out: Path) -> dict:
    run_dir = out / name
    sets = [f"loop.steps={steps}", "loop.eval_every=0", f"loop.eval_size={eval_size}", "logging.progress=false"]
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", RUNS[name], "--run-dir", str(run_dir)]
    start = time.perf_counter()
    subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "reward/mean" in r]
    evals = [r["eval/accuracy"] for r in records if "eval/accuracy" in r]
    return {
        "eval_before": evals[0], "eval_after": evals[-1], "eval_gain_points": 100 * (evals[-1] - evals[0]),
        "optimizer_state_bytes": steps_[-1]["optimizer/state_bytes"],
        "trainer_peak_rss_bytes": max(r["memory/peak_rss_bytes"] for r in steps_),
        "sync_bytes_per_step": statistics.fmean(r["sync/bytes"] for r in steps_),
        "step_s_median": statistics.median(r["time/step"] for r in steps_),
        "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--eval-size", type=int, default=500)
    ap.add_argument("--out", default="runs/lora_bench")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = {name: run(name, args.steps, args.eval_size, out) for name in RUNS}
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    result = {"steps": args.steps, "eval_size": args.eval_size, "cpu": cpu, "cores": len(os.sched_getaffinity(0)),
              "runs": rows}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.steps} GRPO steps each, {cpu}, {result['cores']} cores")
    print(f"{'':26s}{'full':>16s}{'lora':>16s}{'lora/full':>12s}")
    for key in rows["full"]:
        a, b = rows["full"][key], rows["lora"][key]
        ratio = f"{b / a:12.3f}" if a and not key.startswith("eval") else ""
        print(f"{key:26s}{a:16.4g}{b:16.4g}{ratio}")
    print(f"written: {out / 'result.json'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
