"""Reliability: a NaN/inf loss is skipped on every rank and counted; too many in a row stop the run."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch

from orchestrator.failures import NonFiniteLoss, nonfinite_streak


def test_a_streak_of_nonfinite_steps_stops_the_run_with_advice():
    streak = 0
    for metrics in ({"nonfinite_microbatches": 1.0}, {"nonfinite_microbatches": 0.0}, {"nonfinite_microbatches": 2.0}):
        streak = nonfinite_streak(streak, metrics, 3, 1, Path("run"))
    assert streak == 1  # a clean step resets it
    streak = nonfinite_streak(streak, {"nonfinite_microbatches": 1.0}, 3, 2, Path("run"))
    with pytest.raises(NonFiniteLoss, match="3 steps in a row.*trainer.max_nonfinite_steps"):
        nonfinite_streak(streak, {"nonfinite_microbatches": 1.0}, 3, 3, Path("run"))


@pytest.mark.slow
def test_a_nan_micro_batch_is_skipped_and_moves_nothing(ray_local, tiny_model):
    """Two ranks, one NaN micro-batch on rank 1: it is skipped there, rank 0's data still count, and the
    update equals the one where that micro-batch's advantages are 0 (zero policy gradient); both ranks
    end with identical, finite weights (checked in run_ranks)."""
    from tests.test_trainer_dp import run_ranks, synthetic_batch

    from transformers import AutoModelForCausalLM

    vocab = AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    batch = synthetic_batch(24, vocab=vocab, seed=5)
    rows = slice(18, 24)  # rank 1's first micro-batch of the second mini-batch
    poisoned = dataclasses.replace(batch, advantages=batch.advantages.clone())
    poisoned.advantages[rows] = float("nan")
    zeroed = dataclasses.replace(batch, advantages=batch.advantages.clone())
    zeroed.advantages[rows] = 0.0
    got, stats = run_ranks(2, poisoned, tiny_model, "seq-mean-token-mean")
    want, clean = run_ranks(2, zeroed, tiny_model, "seq-mean-token-mean")
    assert [s["nonfinite_microbatches"] for s in stats] == [0.0, 2.0]  # once per epoch, on the rank that had it
    assert [s["nonfinite_microbatches"] for s in clean] == [0.0, 0.0]
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
        assert torch.isfinite(got[k]).all()


TOY = str(Path(__file__).parent / "data" / "toy_rewards.py")


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["rollout", "reward"])
def test_a_worker_killed_mid_step_is_replaced_and_no_group_is_lost_or_doubled(ray_local, tiny_model, victim):
    """SIGKILL a rollout (or reward) worker's process while a step's chunks are in flight: a fresh worker
    takes its place with the current weights, unfinished chunks run again, every prompt comes back once."""
    import os
    import signal
    import threading

    from actors.records import SamplingParams
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.pools import Pools
    from tests.conftest import base_config

    cfg = JobConfig.model_validate(base_config(tiny_model, rollout={"num_workers": 2, "prompts_per_call": 2},
                                               reward={"num_workers": 2}))
    stream = load_data(cfg, tiny_model).stream
    pools = Pools(cfg, tiny_model, [("length", f"{TOY}:length_reward", 1.0)])
    try:
        pools.sync_weights(1)  # a replacement must be brought to version 1, not the checkpoint it starts from
        sampling = SamplingParams(n=4, max_new_tokens=32)
        steps = [stream.next(48), stream.next(48)]
        results = []
        target = getattr(pools, victim)[0]
        pid = ray_local.get(target.pid.remote())
        worker = threading.Thread(target=lambda: results.append(pools.run_groups(steps[0], sampling, 2)))
        worker.start()
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)
        worker.join(timeout=300)
        results.append(pools.run_groups(steps[1], sampling, 2))  # the kill may have landed after step 1's end
        for requests, groups in zip(steps, results):
            assert [g.uid for g in groups] == [r.uid for r in requests]  # each once, in order
            assert all(len(g.samples) == 4 and g.policy_version == 1 for g in groups)
            assert all(s.reward_parts == {"length": s.reward} for g in groups for s in g.samples)
        assert pools.restarts[victim] == 1 and sum(pools.restarts.values()) == 1
        assert ray_local.get(getattr(pools, victim)[0].pid.remote()) != pid
        if victim == "rollout":
            assert {v for v, _ in pools.served_versions()} == {1}
    finally:
        pools.shutdown()


@pytest.mark.slow
def test_a_dead_trainer_rank_stops_the_run_and_says_how_to_resume(ray_local, tiny_model, tmp_path):
    import os
    import signal
    import threading

    from orchestrator import checkpoint
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.failures import ActorDied
    from orchestrator.loop import train
    from orchestrator.pools import Pools
    from orchestrator.references import reward_specs
    from tests.conftest import base_config

    cfg = JobConfig.model_validate(base_config(
        tiny_model, reward={"functions": [{"name": f"{TOY}:length_reward"}]}, loop={"steps": 200},
        checkpoint={"every": 1}, logging={"progress": False, "tensorboard": False}))
    started = []
    real_init = Pools.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        started.append(self)

    errors = []
    Pools.__init__ = spy
    try:
        run = threading.Thread(target=lambda: _catch(errors, train, cfg, tmp_path, tiny_model, reward_specs(cfg),
                                                     load_data(cfg, tiny_model)))
        run.start()
        deadline = time.monotonic() + 120
        while checkpoint.latest(tmp_path) is None:
            assert time.monotonic() < deadline and run.is_alive()
            time.sleep(0.05)
        os.kill(ray_local.get(started[0].trainers[0].pid.remote()), signal.SIGKILL)
        run.join(timeout=120)
    finally:
        Pools.__init__ = real_init
    assert len(errors) == 1 and isinstance(errors[0], ActorDied), errors
    message = str(errors[0])
    assert "--resume" in message and str(checkpoint.latest(tmp_path)) in message


def _catch(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as e:  # handed to the test thread
        errors.append(e)


def test_bad_rows_are_skipped_and_counted_when_the_config_says_so(tmp_path, tiny_model, capsys):
    import json

    from orchestrator.config import JobConfig
    from orchestrator.data import DataError, load_data
    from tests.conftest import base_config

    rows = [{"prompt": "1+2=", "answer": "3"}, {"question": "no prompt"}, {"prompt": "", "answer": "1"},
            {"prompt": 12, "answer": "3"}, "not a row", {"prompt": "1+2=" * 100, "answer": "3"},
            {"messages": "not a list"}, {"prompt": "4+5=", "answer": "9"}]
    source = tmp_path / "train.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = base_config(tiny_model, data={"train": {"source": str(source)}, "max_prompt_tokens": 64,
                                        "bad_rows": "skip"})
    del cfg["data"]["eval"]
    data = load_data(JobConfig.model_validate(cfg), tiny_model)
    assert sorted(r.prompt for r in data.stream.prompts) == ["1+2=", "4+5="]
    assert data.skipped == {"data/skipped_train_rows": 6.0, "data/skipped_eval_rows": 0.0}
    err = capsys.readouterr().err
    assert "skipped 6 bad rows (1 bad chat messages, 3 no prompt, 1 not a dict, 1 too long)" in err, err
    cfg["data"]["bad_rows"] = "error"
    with pytest.raises(DataError, match="line 2 has no"):
        load_data(JobConfig.model_validate(cfg), tiny_model)


@pytest.mark.slow
def test_pools_the_cluster_cannot_hold_fail_fast_or_after_a_bounded_wait_naming_the_pool(ray_local, tiny_model):
    from orchestrator.config import JobConfig
    from orchestrator.pools import PlacementError, Pools
    from tests.conftest import base_config

    rewards = [("length", f"{TOY}:length_reward", 1.0)]
    too_big = JobConfig.model_validate(base_config(tiny_model, rollout={"num_cpus": 16}))
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"CPU 17.5 of 8 \(rollout: 1 x \{'CPU': 16.0\}"):
        Pools(too_big, tiny_model, rewards)
    assert time.monotonic() - start < 30

    @ray_local.remote(num_cpus=4)
    class Hog:
        def ready(self) -> bool:
            return True

    hog = Hog.remote()
    ray_local.get(hog.ready.remote())  # 4 of the 8 CPUs taken: the job's 8 fit the cluster, not what is free
    try:
        busy = JobConfig.model_validate(base_config(tiny_model, rollout={"num_cpus": 6}, ray={"startup_timeout_s": 5}))
        start = time.monotonic()
        with pytest.raises(PlacementError, match=r"after 5 s .*rollout \(1 actor\(s\), each \{'CPU': 6.0\}\)"):
            Pools(busy, tiny_model, rewards)
        assert time.monotonic() - start < 60
    finally:
        ray_local.kill(hog)
    deadline = time.monotonic() + 30  # the failed pools gave back everything they held
    while ray_local.available_resources().get("CPU", 0) < 8 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_local.available_resources().get("CPU", 0) == 8
