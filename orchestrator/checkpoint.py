"""Run checkpoints: every `checkpoint.every` steps, written atomically, the newest `keep` kept; resume from
the newest complete one.

A checkpoint is `<run_dir>/checkpoints/step-NNNNNN/`: `policy/` and `critic/` (DeepSpeed checkpoints:
weights, optimizer and LR-scheduler state, one optimizer shard per rank) and `state.json` (step, the
policy version served, the data position, the KL controller, step counters), written last. It is
built in a hidden temporary directory and renamed into place, so a kill while writing leaves the
previous checkpoint the newest complete one. Rollout sampling needs no saved RNG state: its seed is a
function of (loop.seed, policy version, prompt ids), so a resumed run draws the same samples.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

MARKER = "state.json"  # written last: a directory without it is not a checkpoint


@dataclass
class LoopState:
    """Everything of the orchestrator a resumed run needs besides the actors' own checkpoints."""

    step: int = 0  # steps finished
    version: int = 0  # policy version the rollout workers serve
    stream: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})
    kl: dict = field(default_factory=dict)
    nonfinite_run: int = 0
    eval_before: float | None = None
    eval_after: float | None = None


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoints_dir(run_dir)
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).is_file()) if root.is_dir() else []
    return done[-1] if done else None


def save(run_dir: Path, state: LoopState, write_actors, keep: int) -> Path:
    """Write a checkpoint of step `state.step`: `write_actors(tmp_dir)` saves the actors' parts, then
    state.json, then the directory is renamed into place; checkpoints beyond the newest `keep` are removed."""
    root = checkpoints_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write_actors(tmp)
    (tmp / MARKER).write_text(json.dumps(asdict(state), indent=1) + "\n")
    if final.exists():  # the same step written again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    complete = sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a run killed while writing
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_state(path: Path) -> LoopState:
    return LoopState(**json.loads((Path(path) / MARKER).read_text()))


def restore(path: Path, state: LoopState, pools, stream, kl) -> None:
    """Bring a new run's actors (`orchestrator.pools.Pools`), prompt stream and KL controller to checkpoint `path`,
    whose `state` is loaded."""
    pools.load_checkpoint(path, state.version)
    stream.restore(state.stream)
    kl.load_state_dict(state.kl)


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics records written after `step` (by the run that died), so a resumed run appends cleanly."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def resume_hint(run_dir: Path) -> str:
    """How to continue a stopped run, naming its newest complete checkpoint (or saying there is none)."""
    newest = latest(run_dir)
    if newest is None:
        return "No checkpoint was written (set checkpoint.every to write them)."
    return (f"Its newest complete checkpoint is {newest}; continue with: raylhf train CONFIG --resume "
            f"--run-dir {run_dir}")


def find_resume(run_dir_pattern: str, override: str | None) -> tuple[Path, Path] | None:
    """(run directory, its newest complete checkpoint) to resume: `--run-dir` (`override`), else the newest
    directory matching `run_dir_pattern` (`logging.run_dir` with its {time} as `*`) that has one; None if none."""
    if override:
        candidates = [Path(override)]
    else:
        candidates = sorted(Path().glob(run_dir_pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_dir in candidates:
        newest = latest(run_dir)
        if newest is not None:
            return run_dir, newest
    return None
