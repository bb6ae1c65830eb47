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
  raylhf train-rm examples/arith_rm.yaml
  raylhf train-dpo examples/arith_dpo.yaml --set beta=0.2
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/arith-grpo-20250101-120000 --k 1 8 --samples 16
  raylhf export runs/arith-grpo-20250101-120000/final_policy exported/arith-policy
"""
EVAL_EXAMPLES = """examples:
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/arith-grpo-20250101-120000
  raylhf eval examples/arith_grpo.yaml --checkpoint checkpoints/arith-sft --k 1 4 --samples 8 --out sft.json
  raylhf eval examples/arith_grpo.yaml --checkpoint runs/x --set loop.eval_size=50 --set rollout.temperature=0.7
"""
EXPORT_EXAMPLES = """examples:
  raylhf export runs/arith-grpo-20250101-120000 exported/arith-policy
  raylhf export checkpoints/arith-sft exported/arith-sft --force
  raylhf export /models/custom-arch exported/custom --trust-remote-code
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
    p.add_argument("--run-dir", help="output directory (default: logging.run_dir of the config), e.g. --run-dir runs/try1")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint of --run-dir (default: the newest run "
                        "directory of logging.run_dir that has one), e.g. --resume --run-dir runs/try1")

    show_example = "example:\n  raylhf config show examples/arith_grpo.yaml --set rollout.group_size=4\n"
    c = sub.add_parser("config", help="inspect a config", epilog=show_example,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    csub = c.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config with every field explained", epilog=show_example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("config", help="job config YAML, e.g. examples/arith_grpo.yaml")
    show.add_argument("--set", dest="overrides", **overrides)

    for name, what, example in (("train-rm", "train a reward model on preference pairs or rankings", "examples/arith_rm.yaml"),
                                ("train-dpo", "train a policy with offline DPO on preference pairs", "examples/arith_dpo.yaml")):
        how = "--set loss=kwise" if name == "train-rm" else "--set beta=0.2"
        t = sub.add_parser(name, help=what, epilog=f"example:\n  raylhf {name} {example} {how}\n",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        t.add_argument("config", help=f"{name} config YAML, e.g. {example}")
        t.add_argument("--set", dest="overrides", **overrides)

    e = sub.add_parser("eval", help="held-out greedy accuracy and pass@k of a checkpoint (no Ray)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EVAL_EXAMPLES)
    e.add_argument("config", help="job config YAML whose data.eval, reward and rollout sampling are used, "
                                  "e.g. examples/arith_grpo.yaml")
    e.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="policy to evaluate: a model directory or a run directory (its final_policy/), e.g. runs/x")
    e.add_argument("--k", action="extend", nargs="+", type=int, metavar="K",
                   help="pass@k for each K (default 1), e.g. --k 1 8")
    e.add_argument("--samples", type=int, metavar="N", help="completions per problem at rollout.temperature "
                   "for pass@k, N >= every K (default: max(K, rollout.group_size)), e.g. --samples 16")
    e.add_argument("--set", dest="overrides", **overrides)
    e.add_argument("--out", default="eval.json", metavar="FILE.json",
                   help="where to write the results as JSON (default eval.json), e.g. --out runs/x/eval.json")

    x = sub.add_parser("export", help="write a checkpoint as a verified Hugging Face model directory",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPORT_EXAMPLES)
    x.add_argument("checkpoint", help="a run directory (its final_policy/) or any Hugging Face model "
                                      "directory, e.g. runs/x/final_policy")
    x.add_argument("out", help="output directory, created; must be empty unless --force, e.g. exported/policy")
    x.add_argument("--force", action="store_true", help="replace a non-empty OUT (its old contents are deleted)")
    x.add_argument("--trust-remote-code", action="store_true",
                   help="allow the checkpoint's own modelling code (model.trust_remote_code of a job)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("train-rm", "train-dpo"):  # offline preference training: own configs, no Ray
        from orchestrator.offline import train_dpo, train_rm

        return (train_rm if args.command == "train-rm" else train_dpo).main(args.config, args.overrides)
    if args.command == "eval":  # in-process, no Ray
        from orchestrator import evaluation

        return evaluation.main(args.config, args.checkpoint, args.k, args.samples, args.overrides, args.out)
    if args.command == "export":
        from orchestrator import export

        return export.main(args.checkpoint, args.out, args.force, args.trust_remote_code)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    if args.command == "config":
        print(dump_config(cfg))
        return 0
    return run_train(cfg, args.run_dir, args.resume)


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


def cluster_address(cfg: JobConfig) -> str | None:
    """The Ray cluster to join: `ray.address`, else the `RAY_ADDRESS` environment variable (`ray job submit`
    sets it for the driver it starts on the cluster); None means start an embedded Ray."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise ValueError(
            f"Ray address {address!r} is a dashboard (job submission) URL; `raylhf train` joins a cluster by its "
            "GCS address (host:6379, or 'auto' on a cluster node). Submit from outside with `ray job submit "
            "--address URL ... -- raylhf train CONFIG` (see deploy/README.md), or unset RAY_ADDRESS.")
    return address


def submitted_job_dir() -> Path | None:
    """The job's unpacked `--working-dir` when this driver runs as a `ray job submit` job (its working directory,
    which Ray also unpacks on every node and makes the working directory of every worker); else None."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job supervisor for the driver it starts
    try:
        runtime_env = (json.loads(raw).get("runtime_env") or {}) if raw else {}
    except (ValueError, AttributeError):
        return None
    return Path.cwd().resolve() if runtime_env.get("working_dir") else None


def _spec_in_job_dir(spec: RewardSpec, job_dir: Path) -> RewardSpec | None:
    """`spec` with its reward file named relative to `job_dir` when the file lies inside it: every worker's
    working directory is its node's copy of the job dir, so the relative path resolves on every node."""
    target, _, attr = (spec.name or "").rpartition(":")
    if spec.name is None or not (target.endswith(".py") or "/" in target):
        return None
    try:
        relative = Path(target).resolve().relative_to(job_dir)
    except ValueError:
        return None
    return dataclasses.replace(spec, name=f"{relative.as_posix()}:{attr}")


def connect_ray(cfg: JobConfig, staging: Path) -> tuple[bool, list[RewardSpec]]:
    """Start or join Ray (see `init_ray`); the reward specs the actors of this job must use.

    Joining a cluster (`cluster_address`) ships the reward files (see `ship_reward_files`, copies in
    `staging`, which must live until Ray has started); an embedded Ray reads them where they are. Under
    `ray job submit`, reward files inside the job's working dir need no shipping: they stay named by their
    path relative to it (see `_spec_in_job_dir`).
    """
    import ray

    specs = reward_specs(cfg)
    modules: list[str] = []
    if cluster_address(cfg) and not ray.is_initialized():
        job_dir = submitted_job_dir()
        in_job = [_spec_in_job_dir(x, job_dir) if job_dir else None for x in specs]  # None: ship it
        shipped, modules = ship_reward_files([x for x, y in zip(specs, in_job) if y is None], staging)
        rest = iter(shipped)
        specs = [y if y is not None else next(rest) for y in in_job]
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
    """Connect to `ray.address` or `RAY_ADDRESS` (see `cluster_address`) with the job's `runtime_env`, or start an
    embedded Ray bound to 127.0.0.1; False if already connected."""
    import ray

    from orchestrator.pools import custom_resources_needed, logical_cpus_needed

    if ray.is_initialized():
        return False
    address = cluster_address(cfg)
    if address:
        # Under `ray job submit` Ray merges `runtime_env` into the submitted job's own (its working_dir).
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.logging.worker_logs)
        return True
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(logical_cpus_needed(cfg)))
    # One box plays every node type: it offers the custom resources (rollout_node, ...) the pools ask for.
    # address="local": a new instance even when another Ray runs on this machine (ray.init() would join that one).
    ray.init(address="local", num_cpus=num_cpus, resources=custom_resources_needed(cfg) or None,
             include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=cfg.logging.worker_logs, configure_logging=True, logging_level="WARNING")
    return True


def find_resume(cfg: JobConfig, override: str | None) -> tuple[Path, Path]:
    """(run directory, its newest complete checkpoint) to resume: `--run-dir`, else the newest directory
    that `logging.run_dir` names ({time} matching any time) with a checkpoint. ConfigError if none."""
    from orchestrator.checkpoint import latest

    if override:
        candidates = [Path(override)]
    else:
        pattern = cfg.logging.run_dir.format(name=cfg.logging.name, time="*")
        candidates = sorted(Path().glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    for run_dir in candidates:
        newest = latest(run_dir)
        if newest is not None:
            return run_dir, newest
    where = override or cfg.logging.run_dir.format(name=cfg.logging.name, time="*")
    raise ConfigError(f"--resume: no complete checkpoint under {where!r} (checkpoint.every must be > 0 in the "
                      "run that wrote it)")


def run_train(cfg: JobConfig, run_dir_override: str | None = None, resume: bool = False) -> int:
    import ray

    from orchestrator.checkpoint import truncate_metrics
    from orchestrator.data import DataError
    from orchestrator.loop import ActorDied, NonFiniteLoss, load_data, reward_failure_totals, summarize, train
    from orchestrator.metrics import read_metrics
    from orchestrator.plots import plot_run
    from orchestrator.pools import PlacementError

    checkpoint = None
    if resume:
        try:
            run_dir, checkpoint = find_resume(cfg, run_dir_override)
        except ConfigError as e:
            print(f"raylhf: {e}", file=sys.stderr)
            return 2
        truncate_metrics(run_dir, int(checkpoint.name.split("-")[1]))
        (run_dir / "config.yaml").write_text(dump_config(cfg) + "\n")
    else:
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
            result = train(cfg, run_dir, model_path, rewards, data, resume=checkpoint)
        except (NonFiniteLoss, ActorDied, PlacementError) as e:
            print(f"raylhf: {e}", file=sys.stderr)
            return 1
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
