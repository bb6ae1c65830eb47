"""Checkpoint and resume: a run SIGKILLed after step 3 of 6 and resumed ends exactly where an uninterrupted
run ends (weights and per-step metrics); a half-written checkpoint never counts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from orchestrator import checkpoint
from tests.conftest import base_config

REPO = Path(__file__).resolve().parent.parent
TOY = str(REPO / "tests" / "data" / "toy_rewards.py")
TIMING = ("time/", "tokens_per_s", "generate_tokens_per_s", "critic/time/", "utilization/", "memory/",
          "critic/memory/")  # wall-clock and machine-dependent numbers


def _config(tmp_path: Path, model: str) -> Path:
    cfg = base_config(model, reward={"functions": [{"name": f"{TOY}:char_hash_reward"}]},
                      algorithm={"kl_coef": 0.05}, trainer={"epochs": 2, "num_minibatches": 2, "micro_batch_size": 4},
                      loop={"steps": 6, "prompts_per_step": 4}, checkpoint={"every": 1, "keep": 2})
    del cfg["data"]["eval"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train(config: Path, run_dir: Path, *extra: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(config), "--run-dir", str(run_dir),
                             "--set", "logging.progress=false", *extra], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **popen)


def _finish(proc: subprocess.Popen) -> None:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]


def _records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final_policy" / "model.safetensors"))


def _kill_after_step(proc: subprocess.Popen, run_dir, step: int) -> checkpoint.LoopState:
    """SIGKILL the run `proc` (the driver and the embedded Ray with every actor) once `run_dir` holds the checkpoint of
    `step` or a later one; the state of the newest checkpoint it left."""
    deadline = time.monotonic() + 300
    while (newest := checkpoint.latest(run_dir)) is None or newest.name < f"step-{step:06d}":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return checkpoint.load_state(checkpoint.latest(run_dir))


@pytest.mark.slow
def test_a_run_killed_after_step_3_resumes_to_the_same_weights_and_metrics(tmp_path, tiny_model):
    config = _config(tmp_path, tiny_model)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    uninterrupted = _train(config, straight)  # side by side with the broken run: each leaves the 2 cores idle at times
    died_at = _kill_after_step(_train(config, broken), broken, 3).step
    assert 3 <= died_at < 6
    resumed = _train(config, broken, "--resume")
    _finish(resumed)
    _finish(uninterrupted)

    records = _records(straight)
    assert all(r["grad_norm"] > 0 and r["advantage/abs_mean"] > 0 for r in records[1:])  # the policy really moves
    assert _records(broken) == records  # every step once, with the same numbers
    a, b = _weights(straight), _weights(broken)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
    assert len(list(checkpoint.checkpoints_dir(broken).glob("step-*"))) == 2  # checkpoint.keep


def test_a_half_written_checkpoint_is_ignored_and_cleaned_up(tmp_path):
    state = checkpoint.LoopState(step=2, version=2)
    checkpoint.save(tmp_path, state, lambda d: (d / "policy").mkdir(), keep=3)
    partial = checkpoint.checkpoints_dir(tmp_path) / ".step-000003.tmp-99999"  # killed while writing step 3
    (partial / "policy").mkdir(parents=True)
    unmarked = checkpoint.checkpoints_dir(tmp_path) / "step-000004"  # renamed without its marker: not possible
    unmarked.mkdir()                                                  # through save(), and never trusted
    assert checkpoint.latest(tmp_path).name == "step-000002"
    assert checkpoint.load_state(checkpoint.latest(tmp_path)) == state
    checkpoint.save(tmp_path, checkpoint.LoopState(step=5), lambda d: None, keep=3)
    assert not partial.exists() and checkpoint.latest(tmp_path).name == "step-000005"


def test_resume_without_a_checkpoint_exits_2(tmp_path, tiny_model):
    from orchestrator.cli import main

    assert main(["train", str(_config(tmp_path, tiny_model)), "--run-dir", str(tmp_path / "none"), "--resume"]) == 2
