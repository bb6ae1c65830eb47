"""RewardWorker: every reward form works, a bad reward is harmless, calls run in parallel, nothing outlives it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from actors.reward import RewardWorker
from actors.reward_pool import RewardLoadFailed
from actors.records import Group, RewardSpec, Sample
from orchestrator.metrics import reward_part_metrics, rollout_metrics
from tests.conftest import RecordingActor

REWARDS = Path(__file__).resolve().parent / "data" / "worker_rewards.py"


def spec(fn: str, **kw) -> RewardSpec:
    return RewardSpec(label=kw.pop("label", fn), name=f"{REWARDS}:{fn}", **kw)


def group(texts: list[str], uid: str = "g", **row) -> Group:
    """One prompt "2+2=" with a sample per text; each sample has len(text) + 1 response tokens."""
    samples = [Sample(list(range(len(t) + 1)), t, [0.0] * (len(t) + 1), "stop") for t in texts]
    return Group(uid, "2+2=", {"answer": "4", **row}, [1, 2], samples, 0)


@contextlib.contextmanager
def running(*specs: RewardSpec, **kw):
    w = RewardWorker(list(specs), **kw)
    try:
        yield w
    finally:
        w.close()


def alive(pid: int) -> bool:
    """A live process (a zombie waiting to be reaped by its new parent counts as dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_until(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


# ----------------------------------------------------------------------------- forms


def test_plain_and_dict_rewards_get_row_fields_and_token_count_and_sum_with_weights():
    """fields = the row's other columns + completion_tokens; a dict's extra numbers become metrics."""
    with running(spec("exact", weight=2.0), spec("detailed", weight=0.5), spec("fields_seen")) as w:
        groups = w.reward([group(["4", "5"], topic="arith"), group(["44"], uid="h", answer="44", topic="arith")])
    first, second = groups[0].samples
    assert first.reward_parts == {"exact": 1.0, "detailed": 1.0, "fields_seen": 1.0}
    assert first.reward == pytest.approx(2.0 * 1 + 0.5 * 1 + 1.0)
    assert second.reward == pytest.approx(1.0)  # only fields_seen
    assert first.reward_extras == {"detailed/tokens": 2.0, "detailed/prompt_chars": 4.0}
    assert not any(g.reward_failures for g in groups)
    m = reward_part_metrics(groups)
    assert m["reward/exact"] == pytest.approx(2 / 3) and m["reward/fields_seen"] == 1.0
    assert m["reward/detailed/tokens"] == pytest.approx((2 + 2 + 3) / 3)
    assert m["reward/exact/failures"] == 0.0 and m["reward/detailed/failures"] == 0.0


def test_batched_rewards_take_lists_declared_by_config_flag_or_attribute():
    """`batched` in the spec or `fn.batched = True`: one call per batch of `batch_size`, columns aligned."""
    groups = [group(["4", "55", "666"]), group(["77", "8", "44", "9"], uid="h", answer="44")]
    with running(spec("lengths", batched=True), spec("batch_sizes", batch_size=3)) as w:
        w.reward(groups)
    samples = [s for g in groups for s in g.samples]
    assert [s.reward_parts["lengths"] for s in samples] == [1.5, 2, 3, 2, 1, 2.5, 1]
    assert [s.reward_parts["batch_sizes"] for s in samples] == [3, 3, 3, 3, 3, 3, 1]


@pytest.mark.serial
def test_async_rewards_are_awaited_concurrently():
    """16 calls that each wait 0.3 s finish in about one wait, not sixteen."""
    with running(spec("slow_async")) as w:
        start = time.perf_counter()
        groups = w.reward([group(["4"] * 16)])
        elapsed = time.perf_counter() - start
    assert [s.reward for s in groups[0].samples] == [2.0] * 16
    assert elapsed < 2.0, elapsed  # 4.8 s one after another


@pytest.mark.serial
def test_calls_of_a_group_run_in_parallel_processes():
    """Two processes overlap four 0.4 s calls: about 0.8 s instead of 1.6 s."""
    with running(spec("sleepy"), num_processes=2) as w:
        start = time.perf_counter()
        w.reward([group(["4"] * 4)])
        elapsed = time.perf_counter() - start
    assert elapsed < 1.4, elapsed


# ----------------------------------------------------------------------------- failures


@pytest.fixture(scope="module")
def misbehaving():
    with running(spec("misbehave"), spec("exact"), failure_score=-2.0, timeout_s=60) as w:
        yield w


@pytest.mark.parametrize("mode, kind", [
    ("raise", "RuntimeError"), ("nan", "ValueError"), ("inf", "ValueError"), ("-inf", "ValueError"),
    ("text", "TypeError"), ("none", "TypeError"), ("bool", "TypeError"), ("nodict", "TypeError"),
    ("dictnan", "ValueError"), ("huge", "ValueError"), ("-huge", "ValueError"), ("big", "ValueError"),
    ("bigint", "ValueError"), ("dicthuge", "ValueError"), ("dictnanextra", "ValueError"),
    ("dicttext", "TypeError"), ("dictbool", "TypeError"),
])
def test_a_failing_call_scores_failure_score_and_is_counted(misbehaving, mode, kind):
    """Raising, NaN/inf, numbers beyond reward.max_abs_score and non-numbers (a dict's extras too): that sample
    only scores failure_score; others are untouched; the metrics stay finite."""
    g = misbehaving.reward([group(["4", mode, "4"])])[0]
    assert [s.reward_parts["misbehave"] for s in g.samples] == [1.0, -2.0, 1.0]
    assert [s.reward_parts["exact"] for s in g.samples] == [1.0, 0.0, 1.0]  # the other reward is unaffected
    assert g.samples[1].reward == -2.0
    assert g.reward_failures == {"misbehave": 1}
    assert set(g.reward_errors) <= {f"misbehave: {kind}"}  # reported once per job: maybe by an earlier case
    assert reward_part_metrics([g])["reward/misbehave/failures"] == 1.0
    assert all(math.isfinite(v) for v in rollout_metrics([g], 1.0).values())


@pytest.mark.parametrize("mode, message", [
    ("big", "reward returned 2e+06, beyond reward.max_abs_score = 1e+06"),
    ("dicttext", "reward returned str 'x' under key 'note', expected a number"),
    ("dictbool", "reward returned bool 'True' under key 'ok', expected a number"),
    ("dicthuge", "reward returned 1e+308 under key 'n'"),
])
def test_a_bad_value_is_named_in_the_failure_message(mode, message):
    """The traceback shown once says what was wrong: the limit crossed, or the key of a dict holding a non-number."""
    with running(spec("misbehave")) as w:
        g = w.reward([group([mode])])[0]
    assert message in "".join(g.reward_errors.values()), g.reward_errors


def test_scores_within_max_abs_score_pass_and_its_bound_is_configurable():
    """max_abs_score bounds |score|: 2e6 passes a bound of 1e7 and fails the default 1e6."""
    with running(spec("misbehave"), max_abs_score=1e7, failure_score=-1.0) as w:
        assert [s.reward for s in w.reward([group(["big", "huge"])])[0].samples] == [2e6, -1.0]


def test_a_reward_past_its_memory_limit_fails_alone_and_the_run_goes_on():
    """A reward allocating 2 GiB under reward.memory_mb = 256 (a child uses ~30 MB): MemoryError (or its process
    dies), that sample scores failure_score and is counted; the next calls score as usual."""
    with running(spec("misbehave"), failure_score=-1.0, memory_mb=256) as w:
        g = w.reward([group(["4", "hog", "4"])])[0]
        assert [s.reward for s in g.samples] == [1.0, -1.0, 1.0]
        assert g.reward_failures == {"misbehave": 1}
        assert set(g.reward_errors) <= {"misbehave: MemoryError", "misbehave: ProcessDied"}, g.reward_errors
        assert "reward.memory_mb" in "".join(g.reward_errors.values())
        assert [s.reward for s in w.reward([group(["4", "4"])])[0].samples] == [1.0, 1.0]


def test_reward_processes_get_the_configured_or_default_address_space_limit():
    """RLIMIT_AS of each child: reward.memory_mb, or a quarter of the machine's memory when it is null."""
    from actors.reward_limits import default_memory_mb

    assert 0 < default_memory_mb() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4 / 2**20 + 1
    for memory_mb, expected in ((300, 300), (None, default_memory_mb())):
        with running(spec("exact"), memory_mb=memory_mb, num_processes=1) as w:
            (pid,) = w.process_ids()
            limits = Path(f"/proc/{pid}/limits").read_text()
            line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
            assert line.split()[3] == str(expected << 20), line


def test_the_largest_scores_the_config_allows_keep_metrics_and_advantages_finite():
    """Every sample at +-(sum of |weight|) x max_abs_score at the config's limit: reward/mean, reward/std, the
    per-label means and every estimator's advantages (float32) are finite, no OverflowError."""
    import torch

    from orchestrator.batching import sequence_advantages
    from orchestrator.config import MAX_TOTAL_REWARD, AlgorithmConfig
    from orchestrator.metrics import rollout_metrics

    groups = [group(["4", "5", "6", "7"], uid=str(k)) for k in range(64)]
    for g in groups:
        for j, s in enumerate(g.samples):
            sign = 1 if j % 2 else -1
            s.add_reward("a", 0.5, sign * MAX_TOTAL_REWARD)  # two rewards with weights 0.5 and 0.5, each at the bound
            s.add_reward("b", 0.5, sign * MAX_TOTAL_REWARD)
            s.reward_extras["a/x"] = sign * MAX_TOTAL_REWARD
    m = rollout_metrics(groups, 1.0)
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["reward/std"] == pytest.approx(MAX_TOTAL_REWARD)
    rewards = torch.tensor([s.reward for g in groups for s in g.samples], dtype=torch.float32)
    for estimator in ("grpo", "dr_grpo", "rloo", "reinforce_pp"):
        adv = sequence_advantages(rewards, 4, AlgorithmConfig(estimator=estimator))
        assert torch.isfinite(adv).all() and adv.abs().max() > 0, estimator


def test_first_traceback_of_each_kind_is_logged_once(capsys):
    """Printed by the worker and handed to the driver once per (reward, error type), however often it recurs."""
    with running(spec("misbehave")) as w:
        first = w.reward([group(["raise", "raise", "nan"])])[0]
        second = w.reward([group(["raise", "nan", "text"])])[0]
    out = capsys.readouterr().out
    assert out.count("reward misbehave failed (RuntimeError)") == 1
    assert out.count("reward misbehave failed (ValueError)") == 1
    assert out.count("reward misbehave failed (TypeError)") == 1
    assert "RuntimeError: verifier bug" in out  # the reward's own traceback
    assert set(first.reward_errors) == {"misbehave: RuntimeError", "misbehave: ValueError"}
    assert set(second.reward_errors) == {"misbehave: TypeError"}
    assert second.reward_failures == {"misbehave": 3}


@pytest.mark.serial
@pytest.mark.parametrize("mode", ["hang", "spin"])
def test_a_hung_call_is_killed_at_its_timeout_and_the_rest_are_scored(tmp_path, mode):
    """Sleeping or spinning with the GIL held: the process is killed and replaced; other calls all score."""
    texts = ["4"] * 20
    texts[4] = mode  # chunks of 3: the hung call has a finished call before it and one after it
    with running(spec("misbehave"), failure_score=-1.0, timeout_s=1.0) as w:
        before = set(w.process_ids())
        start = time.perf_counter()
        g = w.reward([group(texts, pid_dir=str(tmp_path))])[0]
        elapsed = time.perf_counter() - start
        assert [s.reward_parts["misbehave"] for s in g.samples] == [1.0] * 4 + [-1.0] + [1.0] * 15
        assert g.reward_failures == {"misbehave": 1} and "misbehave: TimeoutError" in g.reward_errors
        assert 1.0 <= elapsed < 6.0, elapsed
        assert w.restarts() == 1
        after = set(w.process_ids())
        assert len(before - after) == 1 and len(after) == 2
        assert wait_until(lambda: not any(alive(p) for p in before - after), 5)
        if mode == "hang":
            assert [int(p.name) for p in tmp_path.iterdir()] == list(before - after)
        assert w.reward([group(["4", "4"])])[0].samples[1].reward == 1.0  # the replacement works


def test_a_zeroed_or_stale_progress_page_never_times_a_call_out_early():
    """The page may hold zeros or the previous item's last call: a call cannot have started before its item was
    sent, so the deadline is at least send time + timeout (a start read as 0 once timed out busy workers)."""
    from actors.reward_pool import Job, RewardProcessPool, _Work

    pool = RewardProcessPool({"exact": f"{REWARDS}:exact"}, num_processes=1, timeout_s=5.0)
    try:
        c = pool._children[0]
        jobs = [Job("exact", [("2+2=", "4", {"answer": "4"})])]
        before = time.monotonic()
        assert pool._dispatch(c, _Work(0, [0]), jobs)
        time.sleep(0.2)  # the child has run the call and written its page
        c.progress[0] = c.progress[1] = 0
        assert pool._deadline(c, jobs) >= before + 5.0
    finally:
        pool.close()


@pytest.mark.serial
def test_async_timeouts_and_an_event_loop_that_blocks(tmp_path):
    """An await past timeout_s fails alone (no restart); a blocking call in async code gets its process killed."""
    with running(spec("misbehave_async"), failure_score=-1.0, timeout_s=0.5) as w:
        g = w.reward([group(["4", "hang", "raise", "4"])])[0]
        assert [s.reward_parts["misbehave_async"] for s in g.samples] == [1.0, -1.0, -1.0, 1.0]
        assert set(g.reward_errors) == {"misbehave_async: TimeoutError", "misbehave_async: ValueError"}
        assert w.restarts() == 0
        g = w.reward([group(["4", "block", "4"], pid_dir=str(tmp_path))])[0]
        assert g.samples[1].reward_parts["misbehave_async"] == -1.0
        assert w.restarts() == 1
        (pid,) = [int(p.name) for p in tmp_path.iterdir()]
        assert wait_until(lambda: not alive(pid), 5)


@pytest.mark.serial
def test_batched_failures():
    """A NaN fails its sample; a wrong-length result or a hang fails the whole batch."""
    with running(spec("misbehave_batched"), failure_score=-1.0, timeout_s=1.0) as w:
        parts = lambda g: [s.reward_parts["misbehave_batched"] for s in g.samples]  # noqa: E731
        assert parts(w.reward([group(["4", "nan", "4"])])[0]) == [1.0, -1.0, 1.0]
        g = w.reward([group(["4", "short"])])[0]
        assert parts(g) == [-1.0, -1.0] and "misbehave_batched: TypeError" in g.reward_errors
        g = w.reward([group(["4", "hang"])])[0]
        assert parts(g) == [-1.0, -1.0] and "misbehave_batched: TimeoutError" in g.reward_errors
        assert w.restarts() == 1


def test_a_call_that_kills_its_process_fails_alone():
    """os._exit inside a reward: that sample fails (ProcessDied); the process is replaced; the rest score."""
    with running(spec("misbehave"), failure_score=-1.0) as w:
        g = w.reward([group(["4", "exit", "4", "4"])])[0]
        assert [s.reward_parts["misbehave"] for s in g.samples] == [1.0, -1.0, 1.0, 1.0]
        assert "misbehave: ProcessDied" in g.reward_errors
        assert w.restarts() == 1


def _our_live_children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] != "Z":
                out.add(int(stat.parent.name))
    return out


def test_a_reward_that_cannot_be_imported_fails_at_start_and_leaves_no_process():
    before = _our_live_children()
    with pytest.raises(RewardLoadFailed, match="has no attribute 'missing'"):
        RewardWorker([spec("exact"), spec("missing")], num_processes=3)
    assert wait_until(lambda: _our_live_children() <= before, 5), _our_live_children() - before


OWNER = """
import json, sys
from actors.reward import RewardWorker
from actors.records import Group, RewardSpec, Sample
worker = RewardWorker([RewardSpec("misbehave", sys.argv[1])], timeout_s=600)
print(json.dumps(worker.process_ids()), flush=True)
worker.reward([Group("u", "p", {"pid_dir": sys.argv[2]}, [1], [Sample([1], "hang", [0.0], "stop")], 0)])
"""


def test_reward_processes_die_with_their_owner_even_mid_call(tmp_path):
    """SIGKILL of the owning process (no cleanup code runs) while a call hangs: every reward process dies."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER, f"{REWARDS}:misbehave", str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        pids = json.loads(owner.stdout.readline())
        assert wait_until(lambda: any(tmp_path.iterdir()), 30)
        assert [int(p.name) for p in tmp_path.iterdir()][0] in pids
        assert all(alive(p) for p in pids)
    finally:
        owner.kill()
        owner.wait()
    try:
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), [p for p in pids if alive(p)]
    finally:
        _kill_survivors(pids)


def _kill_survivors(pids: list[int]) -> None:
    """After a failed check: end the reward processes this test started, so none lingers."""
    for p in pids:
        if alive(p):
            os.kill(p, signal.SIGKILL)


def test_no_reward_process_outlives_a_killed_actor(ray_local, tmp_path):
    """ray.kill of a RewardWorker in the middle of a hung call: its processes, the hung one too, die."""
    actor = ray_local.remote(RewardWorker).options(num_cpus=0.5).remote([spec("misbehave")], timeout_s=600)
    pids = ray_local.get(actor.process_ids.remote())
    assert all(alive(p) for p in pids)
    actor.reward.remote([group(["hang"], pid_dir=str(tmp_path))])
    assert wait_until(lambda: any(tmp_path.iterdir()), 30)
    (hung,) = [int(p.name) for p in tmp_path.iterdir()]
    assert hung in pids
    ray_local.kill(actor)
    try:
        assert wait_until(lambda: not any(alive(p) for p in pids), 10), [p for p in pids if alive(p)]
    finally:
        _kill_survivors(pids)


# ----------------------------------------------------------------------------- wiring


def test_pools_spread_chunks_over_reward_workers_and_chain_reward_models():
    """Consecutive chunks of prompts go to the next RewardWorker; every chunk passes each reward model."""
    from orchestrator.pools import Pools

    calls: list = []
    pools = Pools.__new__(Pools)
    pools.workers = {"rollout": [RecordingActor("rollout", calls)],
                     "reward": [RecordingActor("reward0", calls), RecordingActor("reward1", calls)],
                     "reward_model": [RecordingActor("rm", calls)], "scoring": [RecordingActor("scoring", calls)]}
    pools._cycle = {name: __import__("itertools").count() for name in ("rollout", "reward", "scoring")}
    pools.submit_groups(list(range(8)), sampling=None, prompts_per_call=2)
    rewarders = [name for name, _, _ in calls if name.startswith("reward")]
    assert rewarders == ["reward0", "reward1", "reward0", "reward1"]
    assert [name for name, _, _ in calls[:4]] == ["rollout", "reward0", "rm", "scoring"]
    assert sum(name == "rm" for name, _, _ in calls) == 4


def test_each_reward_error_kind_is_shown_once_per_job():
    """Two workers each report their first RuntimeError: the driver shows one."""
    from orchestrator.pools import Pools

    pools = Pools.__new__(Pools)
    pools._errors_shown = set()
    a, b = group(["x"]), group(["y"])
    a.reward_errors["f: RuntimeError"] = "Traceback A"
    b.reward_errors["f: RuntimeError"] = "Traceback B"
    b.reward_errors["f: TimeoutError"] = "took too long"
    messages = pools.new_reward_errors([a, b])
    assert len(messages) == 2 and "Traceback A" in messages[0] and "took too long" in messages[1]
    assert pools.new_reward_errors([a, b]) == []


def test_config_reward_entries_are_validated(tmp_path):
    """Clear errors: a function or a model, distinct labels, batch_size only where it means something."""
    from orchestrator.config import ConfigError, load_config
    from tests.conftest import base_config

    def load(functions, **reward):
        cfg_path = tmp_path / "job.yaml"
        model = tmp_path / "policy"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text("{}")
        cfg = base_config(str(model), reward={"functions": functions, **reward})
        cfg["data"].pop("eval")
        cfg_path.write_text(json.dumps(cfg))
        return load_config(cfg_path)

    cfg = load([{"name": f"{REWARDS}:exact"}, {"name": f"{REWARDS}:lengths", "batched": True, "batch_size": 4}])
    assert [f.label for f in cfg.reward.functions] == ["exact", "lengths"]
    assert cfg.reward.timeout_s > 0 and cfg.reward.num_processes >= 1
    for functions, message in [
        ([{"weight": 1.0}], "reward.functions.0: give exactly one of name"),
        ([{"name": f"{REWARDS}:exact", "model": str(tmp_path)}], "give exactly one of name"),
        ([{"name": f"{REWARDS}:exact"}, {"name": "other.module:exact"}], "label 'exact' names two entries"),
        ([{"name": f"{REWARDS}:exact", "label": "mean"}], "reward/mean and reward/std are the totals"),
        ([{"name": f"{REWARDS}:exact", "batch_size": 8}], "reward.functions.0.batch_size: applies to batched"),
        ([{"name": f"{REWARDS}:exact", "num_gpus": 1}], "num_gpus: applies to reward models"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load(functions)
    load([{"name": f"{REWARDS}:batch_sizes", "batch_size": 8}])  # batched by its attribute
    with pytest.raises(ConfigError, match="reward.timeout_s"):
        load([{"name": f"{REWARDS}:exact"}], timeout_s=0)
    assert load([{"name": f"{REWARDS}:exact"}]).reward.max_abs_score == 1e6
    for reward, message in [
        ({"max_abs_score": 0}, "reward.max_abs_score"), ({"max_abs_score": float("inf")}, "reward.max_abs_score"),
        ({"failure_score": -2e6}, r"reward.failure_score: -2e\+06 lies beyond reward.max_abs_score"),
        ({"max_abs_score": 1e15, "failure_score": 0}, None),
        ({"max_abs_score": 1e15, "functions": [{"name": f"{REWARDS}:exact", "weight": 2}]}, "sum of |weight|"),
        ({"memory_mb": 0}, "reward.memory_mb"), ({"memory_mb": 512}, None),
    ]:
        functions = reward.pop("functions", [{"name": f"{REWARDS}:exact"}])
        if message is None:
            load(functions, **reward)
            continue
        with pytest.raises(ConfigError, match=message):
            load(functions, **reward)


# ----------------------------------------------------------------------------- remote cluster


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLIENT = """
import json, os, shutil, sys
from pathlib import Path
import ray
from actors.reward import RewardWorker
from actors.records import Group, Sample
from orchestrator.ray_setup import connect_ray
from orchestrator.config import load_config

cfg = load_config(sys.argv[1], check_paths=False)
staging = Path(sys.argv[2])
staging.mkdir()
started, specs = connect_ray(cfg, staging)
assert started and ray.is_initialized()
# Prove the workers import the shipped copy: the user's file and the staged copy are gone now.
shutil.rmtree(sys.argv[3])
shutil.rmtree(staging)
worker = ray.remote(RewardWorker).options(num_cpus=0.5).remote(specs, timeout_s=30, num_processes=1)
g = Group("u", "2+2=", {"answer": "4"}, [1], [Sample([1, 2], t, [0.0, 0.0], "stop") for t in ("#### 4", "#### 5")], 0)
(g,) = ray.get(worker.reward.remote([g]))
print(json.dumps({"names": [s.name for s in specs], "parts": [s.reward_parts for s in g.samples],
                  "failures": g.reward_failures}))
ray.shutdown()
"""


@contextlib.contextmanager
def separate_ray_head(cwd: Path, env: dict):
    """`ray start --head --block` on loopback in `cwd`; its address. Teardown ends exactly the processes it
    started: SIGTERM to `ray start` (which stops its cluster), then SIGKILL to its process group.
    (`ray stop` would also stop every other Ray on this machine, this test session's included.)"""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="rlc", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    log = open(cwd / "ray-start.log", "w+")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats",
         f"--temp-dir={temp}", f"--ray-client-server-port={_free_port()}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-port={_free_port()}"],
        cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_until(lambda: "block forever" in Path(log.name).read_text() or proc.poll() is not None, 120)
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_reward_file_is_shipped_to_a_separate_ray_cluster(tmp_path):
    """`ray.address` set: a reward file outside the repo and the cluster's directory is importable by its workers."""
    user_dir, cluster_dir, client_dir = tmp_path / "user", tmp_path / "cluster", tmp_path / "client"
    for d in (user_dir, cluster_dir, client_dir, tmp_path / "home"):
        d.mkdir()
    (user_dir / "rewards.py").write_text(textwrap.dedent("""
        def shipped(prompt, completion, answer="", **fields):
            return 10.0 if completion.endswith(answer) else -10.0
    """))  # named like the project's own `rewards` package, which it must not shadow
    token = subprocess.run([str(Path(sys.executable).with_name("ray")), "get-auth-token", "--generate"],
                           capture_output=True, text=True, check=True, timeout=60,
                           env={**os.environ, "HOME": str(tmp_path / "home")}).stdout.strip()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    env.pop("RAY_ADDRESS", None)
    with separate_ray_head(cluster_dir, env) as address:
        cfg = {"model": {"path": str(tmp_path)}, "data": {"train": {"source": "examples.arith.task:make_rows"}},
               "reward": {"functions": [{"name": str(user_dir / "rewards.py") + ":shipped"},
                                        {"name": "rewards.final_answer:hash_answer"}]},
               "ray": {"address": address}}
        (client_dir / "job.yaml").write_text(json.dumps(cfg))
        proc = subprocess.run([sys.executable, "-c", CLIENT, "job.yaml", str(client_dir / "staging"), str(user_dir)],
                              cwd=client_dir, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["names"][0].startswith("raylhf_user_rewards_")
    assert result["names"][1] == "rewards.final_answer:hash_answer"
    assert result["parts"] == [{"shipped": 10.0, "hash_answer": 1.0}, {"shipped": -10.0, "hash_answer": 0.0}]
    assert result["failures"] == {}


def test_max_abs_score_and_memory_mb_reach_the_reward_workers():
    """The job's reward workers get reward.max_abs_score and reward.memory_mb; reward models the bound too."""
    from orchestrator.config import JobConfig
    from orchestrator.pool_specs import config_rewards, pool_specs
    from tests.conftest import base_config

    cfg = JobConfig.model_validate(base_config("m", reward={
        "functions": [{"name": "a:b"}, {"model": "rm"}], "max_abs_score": 50, "memory_mb": 700, "failure_score": -3}))
    pools = {p.name: p for p in pool_specs(cfg, "m", config_rewards(cfg))}
    (reward,) = pools["reward"].kwargs
    assert (reward["max_abs_score"], reward["memory_mb"], reward["failure_score"]) == (50, 700, -3)
    (model,) = pools["reward_model"].kwargs
    assert (model["max_abs_score"], model["failure_score"]) == (50, -3)


def test_a_reward_model_score_beyond_max_abs_score_fails(monkeypatch):
    """A reward model's score past the bound (or NaN) scores failure_score and is counted, like a function's."""
    from actors.reward_model import RewardModelWorker

    monkeypatch.setattr(RewardModelWorker, "__init__", lambda self: None)
    w = RewardModelWorker()
    w.label, w.weight, w.failure_score, w.max_abs_score, w._reported = "rm", 1.0, -1.0, 100.0, set()
    w.score_texts = lambda texts: [5.0, 1e30, math.nan]
    g = w.reward([group(["a", "b", "c"])])[0]
    assert [s.reward for s in g.samples] == [5.0, -1.0, -1.0]
    assert g.reward_failures == {"rm": 2}
    assert "beyond reward.max_abs_score" in g.reward_errors["rm: ValueError"]
