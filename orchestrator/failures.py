"""How a run stops when it cannot go on: a dead actor, or a streak of NaN/inf losses, each with the next step."""

from __future__ import annotations

from pathlib import Path

import ray

from orchestrator.checkpoint import resume_hint

# How a dead worker shows: its call raises, or (for a result that lived only in its memory) the result is lost.
WORKER_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class NonFiniteLoss(RuntimeError):
    """Too many steps in a row had a NaN or inf loss."""


class ActorDied(RuntimeError):
    """An actor the run cannot do without died (a trainer or critic rank, or a worker that kept dying after it
    was replaced); the message names it and says how to resume."""

    @classmethod
    def at(cls, step: int, error: Exception, run_dir: Path, who: str = "an actor") -> ActorDied:
        """`who`: the actor, as `orchestrator.pools.Pools.describe` names it."""
        return cls(f"step {step}: {who} died ({type(error).__name__}: {str(error).splitlines()[0]}). "
                   + resume_hint(run_dir))


def nonfinite_streak(streak: int, metrics: dict[str, float], limit: int, step: int, run_dir: Path) -> int:
    """Steps in a row, this one included, whose trainer skipped NaN/inf micro-batches; raises at `limit`."""
    streak = streak + 1 if metrics.get("nonfinite_microbatches", 0) > 0 else 0
    if streak >= limit:
        raise NonFiniteLoss(
            f"step {step}: the loss was NaN or inf in {streak} steps in a row (those micro-batches were skipped); "
            f"stopping. Lower trainer.lr, check the rewards (reward/*) and advantages in "
            f"{run_dir / 'metrics.jsonl'}, or raise trainer.max_nonfinite_steps.")
    return streak
