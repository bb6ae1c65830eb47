"""Run checkpoints: every `checkpoint.every` steps, written atomically, the newest `keep` kept; resume from
the newest complete one.

A checkpoint is `<run_dir>/checkpoints/step-NNNNNN/`: `policy/` and `critic/` (DeepSpeed checkpoints:
weights, optimizer and LR-scheduler state, one optimizer shard per rank) and `state.json` (step, the
policy version served, the data position, the prompts drawn but not yet trained in asynchronous mode
(`orchestrator.pipeline`), the KL controller, step counters), written last. Under LoRA
(`model.lora`) the DeepSpeed checkpoints hold only the adapters (and a critic's value head) with their optimizer
state, and `state.json` the LoRA settings and each base model's identity (path and the SHA-256 of its weights,
`actors.lora.base_checksum`): a resume against another base or other LoRA settings is refused (`check_resume`). It is
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
    stream: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})  # after every prompt drawn so far
    pending: list = field(default_factory=list)  # asynchronous mode: uids drawn, not yet trained, per round
    kl: dict = field(default_factory=dict)
    nonfinite_run: int = 0
    eval_before: float | None = None
    eval_after: float | None = None
    lora: dict | None = None  # model.lora of the run (None: full fine-tuning)
    bases: dict = field(default_factory=dict)  # LoRA: {"policy": {"path", "sha256"}, "critic": {...}}


class ResumeMismatch(Exception):
    """A checkpoint the config cannot continue: LoRA adapters trained on another base model, or with other
    `model.lora` settings (or full fine-tuning against LoRA)."""


LORA_SHAPE = ("r", "alpha", "target_modules")  # the settings an adapter checkpoint depends on


def check_resume(state: LoopState, lora: dict | None, bases: dict, path: Path) -> None:
    """Refuse (ResumeMismatch) to continue checkpoint `path` (its `state`) under `lora` (`model.lora`, a dict) and
    `bases` (each base model's identity now, as the run records them)."""
    def show(x: dict | None) -> str:
        return "null (full fine-tuning)" if x is None else "{" + ", ".join(f"{k}: {x[k]}" for k in LORA_SHAPE) + "}"

    if (state.lora is None) != (lora is None) or (
            lora is not None and any(state.lora[k] != lora[k] for k in LORA_SHAPE)):
        raise ResumeMismatch(f"checkpoint {path} was written with model.lora {show(state.lora)}, but the config "
                             f"has {show(lora)}; resume with the settings that wrote it, or start a new run")
    for role, saved in state.bases.items():
        now = bases.get(role, {"path": "(none)", "sha256": "(none)"})
        if now["sha256"] != saved["sha256"]:
            field = "model.path" if role == "policy" else "critic.init (or model.path)"
            raise ResumeMismatch(
                f"checkpoint {path} holds LoRA adapters trained on the {role} base model {saved['path']} (weights "
                f"sha256 {saved['sha256'][:16]}...), but the base is now {now['path']} "
                f"(sha256 {now['sha256'][:16]}...); "
                f"adapters mean nothing on other base weights. Set {field} to the original base, or start a new run")


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


def start_state(cfg, model_path: str, resume: Path | None) -> LoopState:
    """The loop's state at the start of a run (`cfg`: the JobConfig): a new one, or checkpoint `resume`'s after
    `check_resume`; either records the run's `model.lora` and base models."""
    state = load_state(resume) if resume else LoopState()
    lora, bases = (cfg.model.lora.model_dump() if cfg.model.lora else None), base_models(cfg, model_path)
    if resume:
        check_resume(state, lora, bases, resume)
    state.lora, state.bases = lora, bases
    return state


def base_models(cfg, model_path: str) -> dict[str, dict[str, str]]:
    """Under LoRA, the identity of each base model the adapters are trained on (path, SHA-256 of its weights),
    which a checkpoint records; {} for full fine-tuning, whose checkpoints hold every weight."""
    from orchestrator.pool_specs import critic_path, uses_critic

    if cfg.model.lora is None:  # cfg: orchestrator.config.JobConfig
        return {}
    paths = {"policy": model_path} | ({"critic": critic_path(cfg, model_path)} if uses_critic(cfg) else {})
    return {role: {"path": path, "sha256": _base_checksum(path)} for role, path in paths.items()}


_CHECKSUMS: dict[tuple, str] = {}


def _base_checksum(path: str) -> str:
    """`actors.lora.base_checksum`, once per process while the directory's files are unchanged (a resume checks the
    base before Ray starts, and the run records it again)."""
    from actors.lora import base_checksum

    key = (path, *sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(path).iterdir()))
    if key not in _CHECKSUMS:
        _CHECKSUMS[key] = base_checksum(path)
    return _CHECKSUMS[key]


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics and sample records written after `step` (by the run that died), so a resumed run appends
    cleanly: each step's records once, and samples.jsonl holds each trained group once."""
    for name in ("metrics.jsonl", "samples.jsonl"):
        path = Path(run_dir) / name
        if not path.is_file():
            continue
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
