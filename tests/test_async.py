"""Asynchronous mode (`loop.max_staleness: N`, `orchestrator.pipeline`): the version lag per token, stale groups
generated again, and the exactly-once prompt accounting across a SIGKILL and `--resume`."""

from __future__ import annotations

import pytest

from actors.records import Group, PromptRequest, Sample
from orchestrator.pipeline import lag_metrics, regenerate_stale, split_stale


def _group(uid: str, version: int, lengths: list[int], versions: list[list[int]] | None = None) -> Group:
    samples = [Sample([7] * n, "x", [-1.0] * n, "stop", versions=versions[i] if versions else None)
               for i, n in enumerate(lengths)]
    return Group(uid, f"p{uid}", {"k": uid}, [1, 2], samples, version)


def test_lag_per_token_counts_every_sampled_token_at_its_own_version():
    groups = [_group("a", 3, [2, 1]),  # 3 tokens at version 3
              _group("b", 1, [3], versions=[[1, 2, 4]])]  # partial rollout: one token per version
    m = lag_metrics(groups, trained_version=4)
    lags = [1, 1, 1] + [3, 2, 0]  # 4 - version, token by token, written out by hand
    assert m["async/lag_mean"] == pytest.approx(sum(lags) / 6) and m["async/lag_max"] == 3.0
    assert {k: v for k, v in m.items() if "share" in k} == pytest.approx(
        {"async/lag_share/0": 1 / 6, "async/lag_share/1": 3 / 6, "async/lag_share/2": 1 / 6,
         "async/lag_share/3": 1 / 6})


def test_a_group_staler_than_the_bound_is_generated_again_in_its_place():
    class Pools:
        asked: list = []

        def run_groups(self, requests, sampling, per_call):
            self.asked += requests
            return [Group(r.uid, r.prompt, r.row, r.prompt_ids, [], 9) for r in requests]

    groups = [_group("a", 5, [2]), _group("b", 2, [2]), _group("c", 4, [2], versions=[[2, 4]]), _group("d", 3, [1])]
    fresh, stale = split_stale(groups, trained_version=5, max_staleness=2)
    assert [g.uid for g in stale] == ["b", "c"]  # c's oldest token is 3 versions behind, though the group says 4
    pools = Pools()
    out, dropped = regenerate_stale(pools, groups, 5, 2, None, 2)
    assert dropped == 2 and [g.uid for g in out] == ["a", "b", "c", "d"]
    assert [g.policy_version for g in out] == [5, 9, 9, 3]
    assert pools.asked == [PromptRequest("b", "pb", [1, 2], {"k": "b"}), PromptRequest("c", "pc", [1, 2], {"k": "c"})]
    assert regenerate_stale(pools, groups, 5, 3, None, 2) == (groups, 0)


# ----------------------------------------------------------------------------- exact resume


def _async_config(tmp_path, model: str, **loop):
    import yaml

    from tests.conftest import base_config
    from tests.test_resume import TOY

    cfg = base_config(model, reward={"functions": [{"name": f"{TOY}:slow_char_hash_reward"}]},
                      data={"train": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "train", "n": 24}}},
                      loop={"steps": 6, "prompts_per_step": 4, "max_staleness": 2, **loop},
                      checkpoint={"every": 1, "keep": 2}, logging={"sample_groups": 4})
    del cfg["data"]["eval"]
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _trained_uids(run_dir) -> dict[str, int]:
    """How many completions of each prompt uid were trained, from samples.jsonl (every group of every step is
    written there; a group is rollout.group_size = 4 completions)."""
    import json
    from collections import Counter

    return Counter(json.loads(line)["uid"] for line in (run_dir / "samples.jsonl").read_text().splitlines())


@pytest.mark.slow
def test_a_run_killed_with_rounds_in_flight_trains_every_prompt_of_the_epoch_exactly_once(tmp_path, tiny_model):
    """max_staleness 2: SIGKILL after the checkpoint of step 3 (two rounds of prompts in flight then), `--resume`:
    over both runs each of the epoch's 24 prompts is trained once, like in an uninterrupted run."""
    import os
    import signal
    import time

    from orchestrator import checkpoint
    from tests.test_resume import _finish, _train

    config = _async_config(tmp_path, tiny_model)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    uninterrupted = _train(config, straight)
    proc = _train(config, broken)
    deadline = time.monotonic() + 300
    while (newest := checkpoint.latest(broken)) is None or newest.name < "step-000003":
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the embedded Ray with every actor
    proc.wait()
    saved = checkpoint.load_state(checkpoint.latest(broken))
    assert 3 <= saved.step < 6 and saved.pending  # rounds in flight when it was saved
    assert len(saved.pending) == min(2, 6 - saved.step) and all(len(r) == 4 for r in saved.pending)
    _finish(_train(config, broken, "--resume"))
    _finish(uninterrupted)

    epoch = {f"0:{i}" for i in range(24)}
    for run_dir in (straight, broken):
        assert _trained_uids(run_dir) == {uid: 4 for uid in epoch}  # every group once: none missing, none twice
