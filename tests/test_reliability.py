"""Reliability: a NaN/inf loss is skipped on every rank and counted, too many in a row stop the run; a worker that dies
in any call is replaced without losing a group, a dead trainer rank stops the run naming itself and the resume."""

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


KILL_AT = ("generate", "handoff", "reward", "sync", "eval")  # the calls a worker is killed in


class Killer:
    """SIGKILLs one worker's process at the call `schedule[step]` names (step 0: the evaluation before RL; none
    past the schedule's end): "generate" the rollout worker a chunk was just submitted to, "handoff" that worker
    once the chunk's generation is done (its reward is due), "reward" the reward worker a chunk was just
    submitted to, "sync" a rollout worker as the weight sync starts, "eval" one as an evaluation starts. In the
    first `exact` steps the kill is made before the call goes on (so it lands in that call); later ones come from
    a thread after a random delay of up to 50 ms, to land at different points of it."""

    def __init__(self, schedule: list[str], exact: int, seed: int = 0):
        import random

        self.schedule, self.exact, self.rng = schedule, exact, random.Random(seed)
        self.step, self.pids, self.fired, self.chosen, self.thread = -1, {}, [], {}, None

    def new_step(self, step: int, pools) -> None:
        """Note the step and the pid of every rollout and reward worker (idle between steps: they answer at once),
        once the last step's kill has landed (else it could land after its target's pid is read as alive)."""
        import ray

        if self.thread is not None:
            self.thread.join(timeout=60)
        self.step, self.pids = step, {}
        for pool in ("rollout", "reward"):
            self.pids[pool] = []
            for w in getattr(pools, pool):
                try:
                    self.pids[pool].append(ray.get(w.pid.remote(), timeout=30))
                except ray.exceptions.RayActorError:
                    self.pids[pool].append(None)  # killed during the last evaluation, not replaced yet

    def maybe(self, kind: str, index: int = 0, after=None) -> None:
        """Kill worker `index` of the pool (another one if that one is already dead) if `kind` is due now."""
        import os
        import signal
        import threading

        import ray

        due = 0 <= self.step < len(self.schedule) and self.schedule[self.step] == kind
        if not due or any(s == self.step for s, _ in self.fired):
            return
        pids = self.pids["reward" if kind == "reward" else "rollout"]
        pid = pids[index] or next(p for p in pids if p)
        self.fired.append((self.step, kind))
        exact, delay = self.step < self.exact, self.rng.uniform(0, 0.05)

        def kill():
            if after is not None:
                ray.wait([after], fetch_local=False)
            if not exact:
                time.sleep(delay)
            os.kill(pid, signal.SIGKILL)

        if exact and after is None:
            kill()
        else:
            self.thread = threading.Thread(target=kill, daemon=True)
            self.thread.start()


@pytest.mark.slow
def test_workers_killed_at_every_kind_of_call_never_stop_the_run(ray_local, tiny_model, tmp_path, monkeypatch):
    """SIGKILL a rollout worker's process in the evaluation before RL, then in each step: while it generates,
    when its output goes to the reward worker, as the weight sync loads it, as it evaluates; a reward worker while
    it scores; twice round. The run finishes; every step trains exactly the prompts the stream gave it, each group
    whole (none lost, none trained twice); every death is counted in `restarts/<pool>`, and each kill made in a
    call is recovered inside that call (the step, the sync, the evaluation)."""
    import json

    from orchestrator import loop
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.pools import Pools
    from orchestrator.references import reward_specs
    from orchestrator.weight_sync import WeightSync
    from tests.conftest import base_config

    schedule = ["eval"] + list(KILL_AT) * 2
    steps = len(schedule)  # the last step kills nothing: every death has been found and replaced by its end
    cfg = JobConfig.model_validate(base_config(
        tiny_model, rollout={"num_workers": 2, "prompts_per_call": 2}, reward={"num_workers": 2},
        loop={"steps": steps, "prompts_per_step": 4, "eval_size": 8, "eval_every": len(KILL_AT)},  # at the "eval" kills
        logging={"progress": False, "tensorboard": False}))
    killer = Killer(schedule, exact=1 + len(KILL_AT))
    trained: list[list[tuple[str, int]]] = []
    recovered: list[tuple[int, str]] = []  # (step, call) where a replacement happened inside the call

    def watched(call: str, fn, pools, *a, **kw):
        before = sum(pools.restarts.values())
        out = fn(*a, **kw)
        if sum(pools.restarts.values()) > before:
            recovered.append((killer.step, call))
        return out

    def train_step(run, version, **kw):
        killer.new_step(killer.step + 1, run.pools)
        return watched("step", real_train_step, run.pools, run, version, **kw)

    def build_batch(groups, *a):
        trained.append([(g.uid, len(g.samples)) for g in groups])
        return real_build_batch(groups, *a)

    def _next(self, name):
        worker = real_next(self, name)
        killer.chosen[name] = next(i for i, w in enumerate(self.workers[name]) if w is worker)
        return worker

    def submit_groups(self, requests, sampling, per_call, score=True, generated=None):
        generated = [] if generated is None else generated
        refs = real_submit(self, requests, sampling, per_call, score, generated)
        killer.maybe("generate", killer.chosen["rollout"])
        killer.maybe("reward", killer.chosen["reward"])
        killer.maybe("handoff", killer.chosen["rollout"], after=generated[-1])
        return refs

    def sync(self, version, *a, **kw):
        killer.maybe("sync")
        return watched("sync", real_sync, self.pools, self, version, *a, **kw)

    def evaluate(pools, *a):
        if killer.step == -1:
            killer.new_step(0, pools)
        killer.maybe("eval")
        return watched("eval", real_evaluate, pools, pools, *a)

    real_train_step, real_build_batch, real_evaluate = loop.train_step, loop.build_batch, loop.evaluate
    real_next, real_submit, real_sync = Pools._next, Pools.submit_groups, WeightSync.sync
    for module, name, fn in ((loop, "train_step", train_step), (loop, "build_batch", build_batch),
                             (loop, "evaluate", evaluate), (Pools, "_next", _next),
                             (Pools, "submit_groups", submit_groups), (WeightSync, "sync", sync)):
        monkeypatch.setattr(module, name, fn)

    loop.train(cfg, tmp_path, tiny_model, reward_specs(cfg), load_data(cfg, tiny_model))

    stream = load_data(cfg, tiny_model).stream
    assert [[uid for uid, _ in step] for step in trained] == [[r.uid for r in stream.next(4)] for _ in range(steps)]
    assert all(n == 4 for step in trained for _, n in step)
    assert killer.fired == list(enumerate(schedule))
    exact = [(0, "eval")] + [(i, "sync" if k == "sync" else "eval" if k == "eval" else "step")
                             for i, k in enumerate(KILL_AT, start=1)]
    assert set(exact) <= set(recovered), recovered
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == steps
    assert last["restarts/reward"] == schedule.count("reward")
    assert last["restarts/rollout"] == len(schedule) - schedule.count("reward")


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
    assert "trainer rank 0 died" in message, message
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
