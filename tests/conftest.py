"""Shared fixtures: a tiny random-init model built from code, and one embedded Ray per session (per xdist worker);
the lock that lets a `serial` test run alone in a parallel run."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the pools do for their CPU actors (orchestrator.pool_specs.omp_wait): OpenMP threads that wait sleep instead of
# spinning, so tests running side by side (xdist) with a thread per core do not stall each other.
if "GOMP_SPINCOUNT" not in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_collection_modifyitems(config, items):
    """In a parallel run the `slow` tests come first (a stable sort): the workers, handed one test at a time
    (pyproject's addopts), share them out and end together on quick ones, where in file order a long test
    started last would leave the other worker idle."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """In a parallel run (pytest-xdist, pyproject's addopts), a test marked `serial` runs alone: every test, its
    fixtures' set-up and tear-down included, holds the run's lock, a `serial` one exclusively, any other one shared.
    A turnstile taken first makes a waiting `serial` test stop new tests from starting, so it waits only for the tests
    already running. (Not xdist_group and --dist loadgroup: with pytest 9.2 that silently stops grouping,
    pytest-xdist#1386.)"""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return (yield)
    run = Path(item.config.option.basetemp).parent  # the run's temp dir; each worker's basetemp is one below it
    serial = item.get_closest_marker("serial") is not None
    # POSIX record locks (lockf), not flock: a process the test forks does not inherit them.
    with open(run / "serial.turnstile", "a+") as turnstile, open(run / "serial.lock", "a+") as lock:
        fcntl.lockf(turnstile, fcntl.LOCK_EX)
        fcntl.lockf(lock, fcntl.LOCK_EX if serial else fcntl.LOCK_SH)
        if not serial:
            fcntl.lockf(turnstile, fcntl.LOCK_UN)
        return (yield)  # closing the files releases the locks


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """An untrained example policy (tokenizer + Llama config from code), no download."""
    from examples.arith.warmstart import build_random

    return build_random(str(tmp_path_factory.mktemp("models") / "tiny"))


def save_tiny_reward_model(path, num_labels: int = 1, causal: bool = False) -> str:
    """A random-init Llama sequence classifier (or causal LM) with the example tokenizer, saved at `path`."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from examples.arith.model import tiny_config
    from examples.arith.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    config = tiny_config(tok, num_labels=num_labels, hidden_size=64, intermediate_size=128, initializer_range=0.5)
    model = LlamaForCausalLM(config) if causal else LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory) -> str:
    """A one-label reward model (sequence classifier) sharing the example's tokenizer, no download."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started as `raylhf train` starts one (on 127.0.0.1 only, dying with this process), with enough
    logical CPUs for the pools the tests start."""
    import ray

    from orchestrator.ray_setup import start_embedded_ray

    start_embedded_ray(num_cpus=8, log_to_driver=False)
    yield ray
    ray.shutdown()


def base_config(model_path: str, **sections) -> dict:
    """A small valid job config as a dict; `sections` replace or extend top-level sections."""
    cfg = {
        "model": {"path": model_path},
        "data": {
            "train": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "train", "n": 200}},
            "eval": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "eval", "n": 16}},
        },
        "rollout": {"group_size": 4, "max_new_tokens": 8, "prompts_per_call": 2},
        "reward": {"functions": [{"name": "rewards.final_answer:hash_answer"}]},
        "trainer": {"lr": 1e-3, "micro_batch_size": 8},
        "loop": {"steps": 2, "prompts_per_step": 4, "eval_size": 8},
        "logging": {"progress": False, "tensorboard": True},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


class RecordingActor:
    """A stand-in actor for wiring tests: `x.method.remote(*args)` appends (name, method, args) to `calls` and
    answers "name.method" as its 'object ref'."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getattr__(self, method):
        actor = self

        class _Method:
            def remote(self, *args, **kwargs):
                actor.calls.append((actor.name, method, args))
                return f"{actor.name}.{method}"

        return _Method()


def as_batch(collated: dict):
    """`actors.batch.collate`'s tensors as a `TrainBatch`, rollout log-probs 0 (tests that need none)."""
    import torch

    from actors.records import TrainBatch

    return TrainBatch(**collated, rollout_logp=torch.zeros_like(collated["response_mask"]))


def forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's cached process groups: after another test module removed the process group, a new one
    must not meet DeepSpeed's handles to the old one ("Group ... is not registered")."""
    import deepspeed.utils.groups as groups

    groups._WORLD_GROUP = groups._DATA_PARALLEL_GROUP = groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None


@contextlib.contextmanager
def in_process_ranks():
    """A scope for DeepSpeed trainer ranks built in the test process: their process group (made inside, or another
    module's reused) is removed after, and the torch threads, environment (setup sets MASTER_ADDR, RANK, ...) and
    garbage collector (setup freezes it) are as before."""
    import gc

    import torch

    threads, env = torch.get_num_threads(), dict(os.environ)
    if not torch.distributed.is_initialized():
        forget_deepspeed_groups()
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    forget_deepspeed_groups()
    gc.unfreeze()
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)
