"""The end-of-run summary `raylhf train` prints: held-out accuracy before and after, per-step means, reward
failures, and where the metrics, plot and final policy are."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from orchestrator.metrics import reward_labels


@dataclass
class RunResult:
    """What `orchestrator.loop.train` hands back for the summary."""

    run_dir: Path
    eval_before: float | None
    eval_after: float | None
    final_policy: Path
    seconds: float


def summarize(records: list[dict]) -> dict[str, float]:
    """Means over the run's training steps of the numbers a summary prints: the total reward, each
    reward's own mean (`reward/<label>`), accuracy, length and speed."""
    steps = [r for r in records if "reward/mean" in r]
    if not steps:
        return {}
    keys = ["reward/mean", *(f"reward/{x}" for x in reward_labels(steps[0])), "accuracy", "response_length/mean",
            "time/step", "tokens_per_s"]
    return {k: statistics.fmean(r[k] for r in steps) for k in keys if k in steps[0]}


def reward_failure_totals(records: list[dict]) -> dict[str, int]:
    """Failed reward calls per label over the run's training steps."""
    steps = [r for r in records if "reward/mean" in r]
    labels = reward_labels(steps[0]) if steps else []
    return {x: int(sum(r.get(f"reward/{x}/failures", 0) for r in steps)) for x in labels}


def summary_text(records: list[dict], eval_before: float | None, eval_after: float | None, seconds: float,
                 run_dir: Path, plot: Path, final_policy: Path) -> str:
    """The summary block, as printed after a run."""
    lines = ["", "== summary =="]
    if eval_before is not None and eval_after is not None:
        lines.append(f"held-out greedy accuracy: {eval_before:.1%} -> {eval_after:.1%} "
                     f"({(eval_after - eval_before) * 100:+.1f} points)")
    lines += [f"{k} (mean over steps): {v:.3f}" for k, v in summarize(records).items()]
    failures = reward_failure_totals(records)
    lines.append("reward failures: " + (", ".join(f"{k} {n}" for k, n in failures.items() if n) or "none")
                 + (" (see reward/<label>/failures)" if any(failures.values()) else ""))
    lines += [f"wall time: {seconds:.0f} s", f"metrics: {run_dir / 'metrics.jsonl'}", f"plot: {plot}",
              f"final policy (Hugging Face): {final_policy}"]
    return "\n".join(lines)
