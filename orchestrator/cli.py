"""`raylhf` command line: train a policy, or show a resolved config."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from actors.types import RewardSpec
from orchestrator.config import ConfigError, JobConfig, dump_config, load_config

EXAMPLES = """examples:
  raylhf train examples/arith_grpo.yaml
  raylhf train examples/arith_grpo.yaml --set loop.steps=5 --set trainer.lr=1e-4
  raylhf config show examples/arith_grpo.yaml --set rollout.group_size=4
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raylhf", description="Distributed RLHF / GRPO on Ray.", epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = dict(action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set trainer.lr=1e-5 (repeatable; values are YAML)")

    p = sub.add_parser("train", help="run a training job", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="job config YAML, e.g. examples/arith_grpo.yaml")
    p.add_argument("--set", dest="overrides", **overrides)
    p.add_argument("--run-dir", help="output directory (default: logging.run_dir of the config)")

    c = sub.add_parser("config", help="inspect a config")
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with every field explained")
    show.add_argument("config", help="job config YAML")
    show.add_argument("--set", dest="overrides", **overrides)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg))
        return 0
    return run_train(cfg, args.run_dir)


def _absolute_file_spec(spec: str) -> str:
    """'rel/file.py:fn' → '/abs/rel/file.py:fn' so actors find it whatever their working directory."""
    target, _, attr = spec.partition(":")
    if (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def reward_specs(cfg: JobConfig) -> list[RewardSpec]:
    """The config's rewards as the actors take them: file and model paths absolute, labels resolved."""
    return [RewardSpec(label=f.label, name=f.name and _absolute_file_spec(f.name), weight=f.weight,
                       model=f.model and str(Path(f.model).expanduser().resolve()), batched=f.batched,
                       batch_size=f.batch_size, num_gpus=f.num_gpus)
            for f in cfg.reward.functions]


def ship_reward_files(specs: list[RewardSpec], staging: Path) -> tuple[list[RewardSpec], list[str]]:
    """For a remote cluster, whose nodes cannot read our files: each reward *file* is copied into `staging`
    under a unique module name and named by that module; the copies are the job's Ray `py_modules`,
    which Ray uploads at `ray.init` and puts on every worker's import path. A file is shipped alone:
    its sibling modules are not (install shared helpers on the cluster, or keep them in the file)."""
    from rewards.loader import file_module_name

    shipped, modules = [], []
    for spec in specs:
        target, _, attr = (spec.name or "").rpartition(":")
        if spec.name is None or not (target.endswith(".py") or "/" in target):
            shipped.append(spec)
            continue
        module = file_module_name(target)
        copy = staging / f"{module}.py"
        if not copy.exists():
            shutil.copyfile(target, copy)
            modules.append(str(copy))
        shipped.append(dataclasses.replace(spec, name=f"{module}:{attr}"))
    return shipped, modules


def connect_ray(cfg: JobConfig, staging: Path) -> tuple[bool, list[RewardSpec]]:
    """Start or join Ray (see `init_ray`); the reward specs the actors of this job must use.

    Joining a cluster at `ray.address` ships the reward files (see `ship_reward_files`, copies in
    `staging`, which must live until Ray has started); an embedded Ray reads them where they are.
    """
    import ray

    specs = reward_specs(cfg)
    modules: list[str] = []
    if cfg.ray.address and not ray.is_initialized():
        specs, modules = ship_reward_files(specs, staging)
    return init_ray(cfg, {"py_modules": modules} if modules else None), specs


def make_run_dir(cfg: JobConfig, override: str | None) -> Path:
    name = override or cfg.logging.run_dir.format(name=cfg.logging.name, time=time.strftime("%Y%m%d-%H%M%S"))
    run_dir = Path(name)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n")
    return run_dir


def prepare_model(cfg: JobConfig) -> str:
    """The absolute model directory, built first by `model.prepare` when the config names one."""
    path = str(Path(cfg.model.path).expanduser().resolve())
    if cfg.model.prepare:
        from rewards.loader import load_function

        load_function(cfg.model.prepare)(path)
    return path


def init_ray(cfg: JobConfig, runtime_env: dict | None = None) -> bool:
    """Connect to `ray.address` (with the job's `runtime_env`), or start an embedded Ray bound to 127.0.0.1;
    False if already connected."""
    import ray

    from orchestrator.pools import logical_cpus_needed

    if ray.is_initialized():
        return False
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, runtime_env=runtime_env, log_to_driver=cfg.logging.worker_logs)
        return True
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(logical_cpus_needed(cfg)))
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=cfg.logging.worker_logs, configure_logging=True, logging_level="WARNING")
    return True


def run_train(cfg: JobConfig, run_dir_override: str | None = None) -> int:
    import ray

    from orchestrator.data import DataError
    from orchestrator.loop import load_data, reward_failure_totals, summarize, train
    from orchestrator.metrics import read_metrics
    from orchestrator.plots import plot_run

    run_dir = make_run_dir(cfg, run_dir_override)
    print(f"raylhf: run directory {run_dir}", file=sys.stderr)
    model_path = prepare_model(cfg)
    try:
        data = load_data(cfg, model_path)
    except DataError as e:
        print(f"raylhf: data error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="raylhf-rewards-") as staging:
        started, rewards = connect_ray(cfg, Path(staging))
        try:
            result = train(cfg, run_dir, model_path, rewards, data)
        finally:
            if started:
                ray.shutdown()
    records = read_metrics(run_dir)
    png = plot_run(records, run_dir / "curves.png")
    s = summarize(records)
    print("\n== summary ==")
    if result.eval_before is not None and result.eval_after is not None:
        print(f"held-out greedy accuracy: {result.eval_before:.1%} -> {result.eval_after:.1%} "
              f"({(result.eval_after - result.eval_before) * 100:+.1f} points)")
    for k, v in s.items():
        print(f"{k} (mean over steps): {v:.3f}")
    failures = reward_failure_totals(records)
    print("reward failures: " + (", ".join(f"{k} {n}" for k, n in failures.items() if n) or "none")
          + (" (see reward/<label>/failures)" if any(failures.values()) else ""))
    print(f"wall time: {result.seconds:.0f} s")
    print(f"metrics: {run_dir / 'metrics.jsonl'}\nplot: {png}\nfinal policy (Hugging Face): {result.final_policy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
