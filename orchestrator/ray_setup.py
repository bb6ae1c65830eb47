"""Ray start-up for `raylhf train`: join a cluster (`ray.address`, `RAY_ADDRESS`) or start an embedded Ray that
listens on 127.0.0.1 only and dies with its driver, and make the job's reward entries usable by its actors (paths
absolute; reward files shipped to a remote cluster as `py_modules`, or named inside a `ray job submit` working
directory)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from actors.records import RewardSpec
from orchestrator import ray_watchdog
from orchestrator.config import JobConfig
from orchestrator.references import reward_specs


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


def init_ray(cfg: JobConfig, runtime_env: dict | None = None) -> bool:
    """Connect to `ray.address` or `RAY_ADDRESS` (see `cluster_address`) with the job's `runtime_env`, or start an
    embedded Ray (see `start_embedded_ray`); False if already connected."""
    import ray

    from orchestrator.pool_specs import custom_resources_needed, logical_cpus_needed

    if ray.is_initialized():
        return False
    address = cluster_address(cfg)
    if address:
        # Under `ray job submit` Ray merges `runtime_env` into the submitted job's own (its working_dir).
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.logging.worker_logs)
        return True
    num_cpus = cfg.ray.num_cpus or max(os.cpu_count() or 1, math.ceil(logical_cpus_needed(cfg)))
    # One box plays every node type: it offers the custom resources (rollout_node, ...) the pools ask for.
    start_embedded_ray(num_cpus=num_cpus, resources=custom_resources_needed(cfg) or None,
                       log_to_driver=cfg.logging.worker_logs, configure_logging=True)
    return True


def start_embedded_ray(**init_kwargs) -> None:
    """`ray.init` a new Ray on this machine alone (`init_kwargs`: num_cpus, resources, log_to_driver, ...) that
    listens on 127.0.0.1 only, without a dashboard, and whose processes die with this one.

    address="local": a new instance even when another Ray runs here (ray.init() would join that one).
    Loopback: Ray's servers (GCS, raylet, object manager, workers, agents, metrics) bind to loopback when the node
    IP is a loopback address, else to every interface (the runtime-env agent to the node IP). But on Linux
    `ray.init` replaces a loopback `_node_ip_address` by the host's outward address unless Ray's single-machine
    mode is on (`ray_constants.ENABLE_RAY_CLUSTER` false: the default on macOS and Windows, read from
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when ray is imported, so too late to set as an environment variable here).
    We turn it on for this call only; the node IP then stays 127.0.0.1 for every process of this Ray.
    Fate: see `orchestrator/ray_watchdog.py`; its mark is in the environment the GCS and raylet start with."""
    import ray
    from ray._private import ray_constants

    mark = _start_watchdog()
    saved_mode, saved_mark = ray_constants.ENABLE_RAY_CLUSTER, os.environ.get(ray_watchdog.MARK_VAR)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[ray_watchdog.MARK_VAR] = mark
    try:
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_mode
        if saved_mark is None:
            del os.environ[ray_watchdog.MARK_VAR]
        else:
            os.environ[ray_watchdog.MARK_VAR] = saved_mark


_watchdogs: dict[int, tuple[str, subprocess.Popen | None]] = {}  # driver pid -> (mark, its watchdog)


def _start_watchdog() -> str:
    """The mark of this process's embedded Ray(s), starting their watchdog (one per driver process) the first time.
    Linux only (it reads /proc); elsewhere Ray's own fate sharing is all there is."""
    pid = os.getpid()
    if pid not in _watchdogs:
        mark, watchdog = f"{pid}-{secrets.token_hex(8)}", None
        if sys.platform.startswith("linux"):
            watchdog = subprocess.Popen([sys.executable, ray_watchdog.__file__, mark, str(pid)],
                                        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        _watchdogs[pid] = mark, watchdog
    return _watchdogs[pid][0]
