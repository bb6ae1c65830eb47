"""The pure parts of benchmarks/async_modes.py: each mode is a valid job that differs from the base as named, the
numbers it reports from metrics.jsonl (worked by hand), and the commands the docs show parse."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator.config import JobConfig

REPO = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("bench_async_modes", REPO / "benchmarks" / "async_modes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


bench = _load()


def test_every_mode_is_a_valid_job_on_the_compute_bound_config_and_differs_as_named(tmp_path):
    job = bench.base_job(bench.DEFAULT_CONFIG, tmp_path, steps=6, eval_every=3, eval_size=64, lr=None)
    assert job["model"]["path"] == "checkpoints/arith-scratch-20m" and job["trainer"]["lr"] == 3e-5
    cfgs = {m: JobConfig.model_validate(bench.merge(job, over)) for m, over in bench.MODES.items()}
    for name, c in cfgs.items():
        assert (c.loop.steps, c.loop.eval_every, c.loop.eval_size, c.checkpoint.every) == (6, 3, 64, 0)
        assert c.loop.max_staleness == (0 if name.startswith("on_policy") else int(name[5]))
        assert c.rollout.partial == ("partial" in name) and c.algorithm.decoupled == ("decoupled" in name)
        threads = bench.CORES if name == "on_policy_cores" else 1
        assert (c.rollout.threads, c.trainer.threads) == (threads, threads)
        assert c.rollout.num_workers == (2 if name == "async2_2rollout" else 1) and c.trainer.num_workers == 1
        assert c.data.train.source == "examples.scratch.task:make_rows"  # the compute-bound job, not the toy
    assert set(bench.DEFAULT_MODES) <= set(bench.MODES) and bench.DEFAULT_MODES[0] == "on_policy"


def test_the_summary_by_hand():
    """Three steps of 64 samples; evaluations at steps 0 and 2 (eval/reward 0.1 then 0.15): with threshold 0.12 the
    time to it is steps 1 and 2 plus step 2's evaluation."""
    records = [
        {"step": 0, "eval/accuracy": 0.0, "eval/reward": 0.1, "time/eval": 9.0},
        {"step": 1, "tokens/generated": 3000, "time/step": 20.0, "async/lag_mean": 0.0, "utilization/trainer": 0.5},
        {"step": 2, "tokens/generated": 3200, "time/step": 10.0, "async/lag_mean": 1.0, "utilization/trainer": 0.9,
         "eval/accuracy": 0.0, "eval/reward": 0.15, "time/eval": 5.0},
        {"step": 3, "tokens/generated": 2800, "time/step": 15.0, "async/lag_mean": 2.0, "utilization/trainer": 1.0},
    ]
    s = bench.summarize(records, "eval/reward", 0.12, samples_per_step=64)
    assert s["tokens_per_s"] == pytest.approx(9000 / 45)
    assert s["seconds_to_threshold"] == pytest.approx(20 + 10 + 5)
    assert s["mean_completion_tokens"] == pytest.approx(3000 / 64)
    assert s["lag_mean"] == pytest.approx(1.0) and s["trainer_utilization"] == pytest.approx(2.4 / 3)
    assert s["eval_reward"] == [0.1, 0.15] and s["eval_seconds"] == 14.0
    assert bench.summarize(records, "eval/reward", 0.2, 64)["seconds_to_threshold"] is None  # never reached
    assert bench.summarize(records, "eval/accuracy", 0.0, 64)["seconds_to_threshold"] == pytest.approx(35)


def test_the_commands_the_docs_show_parse():
    pages = [REPO / "docs" / "performance.md", REPO / "benchmarks" / "README.md",
             REPO / "benchmarks" / "async_modes.py"]
    commands = [c for p in pages for c in re.findall(r"python benchmarks/async_modes\.py([^\n`]*)", p.read_text())]
    assert len(commands) >= 3
    for args in commands:
        bench.parser().parse_args(shlex.split(args))  # argparse exits (SystemExit) on an unknown flag or mode
