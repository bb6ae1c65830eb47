"""`raylhf train`: the run directory (new, or the one to resume), the model and data checked before Ray starts,
Ray, the training loop, and the summary. Exit codes: 0 done, 1 the run stopped (with the next step said),
2 a bad config, data or resume request, 130 Ctrl-C (`orchestrator.cli`)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from orchestrator.config import ConfigError, JobConfig, check_reference, dump_config
from orchestrator.references import check_same_tokenizer, prepare_model


def make_run_dir(cfg: JobConfig, override: str | None) -> Path:
    """A new run directory (`--run-dir`, else `logging.run_dir` filled in) holding the resolved config."""
    name = override or cfg.logging.run_dir.format(name=cfg.logging.name, time=time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n")
    return run_dir


def find_resume(cfg: JobConfig, override: str | None) -> tuple[Path, Path]:
    """(run directory, its newest complete checkpoint) to resume: `--run-dir`, else the newest directory
    that `logging.run_dir` names ({time} matching any time) with a checkpoint. ConfigError if none."""
    from orchestrator.checkpoint import find_resume as find

    pattern = cfg.logging.run_dir.format(name=cfg.logging.name, time="*")
    found = find(pattern, override)
    if found is None:
        raise ConfigError(f"--resume: no complete checkpoint under {override or pattern!r} (checkpoint.every must "
                          "be > 0 in the run that wrote it)")
    return found


def run_train(cfg: JobConfig, run_dir_override: str | None = None, resume: bool = False) -> int:
    """The `raylhf train` command on a loaded config; its exit code."""
    import ray

    from actors.deepspeed_ops import OpLockTimeout
    from orchestrator.checkpoint import ResumeMismatch, base_models, check_resume, load_state, truncate_metrics
    from orchestrator.data import DataError, load_data
    from orchestrator.failures import ActorDied, NonFiniteLoss
    from orchestrator.loop import train
    from orchestrator.metrics import read_metrics
    from orchestrator.placement import PlacementError
    from orchestrator.plots import plot_run
    from orchestrator.ray_setup import connect_ray
    from orchestrator.summary import summary_text

    checkpoint = None
    if resume:
        try:
            run_dir, checkpoint = find_resume(cfg, run_dir_override)
            model_path = prepare_model(cfg.model)
            check_resume(load_state(checkpoint), cfg.model.lora and cfg.model.lora.model_dump(),
                         base_models(cfg, model_path), checkpoint)
        except (ConfigError, ResumeMismatch) as e:
            print(f"raylhf: {'cannot resume: ' if isinstance(e, ResumeMismatch) else ''}{e}", file=sys.stderr)
            return 2
        truncate_metrics(run_dir, int(checkpoint.name.split("-")[1]))
        (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n")
    else:
        run_dir = make_run_dir(cfg, run_dir_override)
        model_path = prepare_model(cfg.model)
    print(f"raylhf: run directory {run_dir}", file=sys.stderr)
    try:
        if cfg.distill.teacher is not None:
            check_reference("distill.teacher", check_same_tokenizer, model_path, cfg.distill.teacher,
                            cfg.model.trust_remote_code)
    except ConfigError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    try:
        data = load_data(cfg, model_path)
    except DataError as e:
        print(f"raylhf: data error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="raylhf-rewards-") as staging:
        started, rewards = connect_ray(cfg, Path(staging))
        try:
            result = train(cfg, run_dir, model_path, rewards, data, resume=checkpoint)
        except (NonFiniteLoss, ActorDied, PlacementError, OpLockTimeout) as e:
            print(f"raylhf: {e}", file=sys.stderr)
            return 1
        finally:
            if started:
                ray.shutdown()
    records = read_metrics(run_dir)
    png = plot_run(records, run_dir / "curves.png")
    print(summary_text(records, result.eval_before, result.eval_after, result.seconds, run_dir, png,
                       result.final_policy))
    return 0
