"""Asynchronous mode (`loop.max_staleness: N`, `orchestrator.pipeline`): the version lag per token, stale groups
generated again, and the exactly-once prompt accounting across a SIGKILL and `--resume`."""

from __future__ import annotations

import dataclasses
from collections import deque

import pytest

from actors.records import Group, PromptRequest, Sample
from orchestrator.pipeline import Pipeline, Round, lag_metrics, regenerate_stale, split_stale


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
    pools.finish_groups = lambda flight: flight  # a round "in flight" is its groups here
    for drop, want in ((True, ([5, 9, 9, 3], 2)), (False, ([5, 2, 4, 3], 0))):  # loop.stale_groups: drop | train
        pipe = Pipeline(2, deque([Round([], groups)]))
        out, dropped = pipe.collect(pools, 5, 2, drop, None, 2)
        assert ([g.policy_version for g in out], dropped) == want and not pipe.rounds
    assert Pipeline(2).collect(pools, 5, 2, True, None, 2) == (None, 0)  # nothing ahead: the step draws its own


# ----------------------------------------------------------------------------- exact resume


def _async_config(tmp_path, model: str, **loop):
    import yaml

    from tests.conftest import base_config
    from tests.test_resume import TOY

    cfg = base_config(model, reward={"functions": [{"name": f"{TOY}:slow_char_hash_reward"}]},
                      data={"train": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "train", "n": 24}}},
                      rollout={"partial": True}, loop={"steps": 6, "prompts_per_step": 4, "max_staleness": 2, **loop},
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
    """max_staleness 2 with partial rollouts: SIGKILL after the checkpoint of step 3 (two rounds of prompts in flight
    then), `--resume`: over both runs each of the epoch's 24 prompts is trained once, like in an uninterrupted run."""
    from tests.test_resume import _finish, _kill_after_step, _train

    config = _async_config(tmp_path, tiny_model)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    uninterrupted = _train(config, straight)
    saved = _kill_after_step(_train(config, broken), broken, 3)
    assert 3 <= saved.step < 6 and saved.pending  # rounds in flight when it was saved
    assert len(saved.pending) == min(2, 6 - saved.step) and all(len(r) == 4 for r in saved.pending)
    _finish(_train(config, broken, "--resume"))
    _finish(uninterrupted)

    epoch = {f"0:{i}" for i in range(24)}
    for run_dir in (straight, broken):
        assert _trained_uids(run_dir) == {uid: 4 for uid in epoch}  # every group once: none missing, none twice


# ----------------------------------------------------------------------------- partial rollouts (hf engine)


def _logprobs_by_hand(model, prompt: list[int], completion: list[int]) -> list[float]:
    """log softmax of one full forward (no cache, no padding) at each completion token: the reference."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0]  # [P+T, V]
    logp = torch.log_softmax(logits.float(), -1)
    return [float(logp[len(prompt) - 1 + j, tok]) for j, tok in enumerate(completion)]


def test_a_partial_rollout_takes_new_weights_at_a_token_boundary_and_continues_the_same_sequences(tiny_model):
    """Weights of version 1 arrive before token 3: tokens 0-2 are version 0's, log-probs by the old model; tokens 3..
    version 1's, log-probs by the new model over the whole sequence (its KV cache recomputed), prompts of two lengths
    (left padding); and a refresh that never loads samples exactly what plain generation does."""
    import torch

    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts, load_causal_lm
    from actors.records import SamplingParams

    engine = HFEngine(tiny_model)
    old, new = load_causal_lm(tiny_model).eval(), load_causal_lm(tiny_model).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = encode_prompts(engine.tokenizer, ["12+345=", "7+8="])
    sampling = SamplingParams(n=3, temperature=1.0, max_new_tokens=8)
    plain = engine.generate(prompts, sampling, seed=5)
    assert engine.generate(prompts, sampling, seed=5, refresh=lambda: None, version=4) == [
        [dataclasses.replace(c, versions=[4] * len(c.token_ids)) for c in group] for group in plain]

    calls = []

    def refresh():
        calls.append(1)
        if len(calls) == 3:  # asked before tokens 1, 2, 3: load before token 3
            engine.model.load_state_dict(new.state_dict())
            return 1
        return None

    out = engine.generate(prompts, sampling, seed=5, refresh=refresh, version=0)
    switched = 0
    for prompt, group in zip(prompts, out):
        for c in group:
            k = len(c.token_ids)
            assert c.versions == [0] * min(k, 3) + [1] * max(k - 3, 0)
            want = _logprobs_by_hand(old, prompt, c.token_ids)[:3] + _logprobs_by_hand(new, prompt, c.token_ids)[3:]
            torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(want), atol=2e-4, rtol=0)
            switched += k > 3
    assert switched  # some sequences went on past the update


# ----------------------------------------------------------------------------- decoupled PPO


def test_decoupled_ppo_clips_against_the_proximal_policy_and_weights_by_prox_over_behaviour():
    """The loss by hand (AReaL, Fu et al. 2025): −token-mean of (π_prox/π_behav) · min(r A, clip(r, 0.8, 1.2) A),
    r = π/π_prox; with rollout_correction tis the weight is truncated at its cap instead."""
    import torch

    from actors.objectives import policy_objective
    from tests.test_objectives import _alg, _micro

    micro, logp, logits = _micro()
    mask, prox, behav, adv = micro.response_mask, micro.old_logp, micro.rollout_logp, micro.advantages

    def by_hand(cap: float) -> float:
        r = torch.exp(logp.detach() - prox)
        w = torch.exp(prox - behav).clamp(max=cap)
        per_token = -w * torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)
        return float((per_token * mask).sum() / mask.sum())

    loss, stats = policy_objective(_alg(decoupled=True), logp, logits, micro, 0.0, 1.0, 4)
    assert loss.item() == pytest.approx(by_hand(float("inf")), rel=1e-5)
    assert by_hand(float("inf")) != pytest.approx(by_hand(1.0))  # the weight matters on this batch
    loss, _ = policy_objective(_alg(decoupled=True, rollout_correction={"kind": "tis", "high": 1.0}), logp, logits,
                               micro, 0.0, 1.0, 4)
    assert loss.item() == pytest.approx(by_hand(1.0), rel=1e-5)


def test_decoupled_ppo_recomputes_pi_old_with_the_trainers_current_weights(tiny_model):
    """`PolicyTrainer.prepare` replaces each row's old_logp by a full forward of the current weights (computed here
    row by row, without padding), keeping the rollout's log-probs as the behaviour policy."""
    import torch

    from actors.batch import collate
    from actors.modeling import load_causal_lm
    from actors.records import Shard, TrainBatch
    from actors.trainer import PolicyTrainer
    from orchestrator.config import JobConfig
    from tests.conftest import base_config
    from tests.test_objectives import PlainEngine

    cfg = JobConfig.model_validate(base_config(tiny_model, algorithm={"decoupled": True}))
    trainer = PolicyTrainer(0, 1, cfg.model.model_dump(), cfg.trainer.model_dump(), cfg.algorithm.model_dump(),
                            1.0, 8, grad_accum=2, total_steps=1)
    model = load_causal_lm(tiny_model)
    trainer.engine = PlainEngine(model, 1e-3, 1.0)
    prompts, responses = [[1, 5, 6], [1, 7], [1, 8, 9, 10]], [[11, 12, 13], [14], [15, 16]]
    batch = collate(prompts, responses, pad_id=0)
    rollout = -torch.ones_like(batch["response_mask"]) * batch["response_mask"]
    rows = TrainBatch(**batch, rollout_logp=rollout, old_logp=rollout.clone(),
                      advantages=torch.ones_like(rollout))
    (out,) = trainer.prepare([Shard(rows, 6.0)])
    for i, (p, r) in enumerate(zip(prompts, responses)):
        torch.testing.assert_close(out.rows.old_logp[i, : len(r)], torch.tensor(_logprobs_by_hand(model, p, r)),
                                   atol=1e-5, rtol=0)
        assert (out.rows.old_logp[i, len(r):] == 0).all()
    torch.testing.assert_close(out.rows.rollout_logp, rollout)


def test_a_rollout_worker_takes_weights_posted_on_the_board_and_skips_the_older_load_queued_after(ray_local,
                                                                                                  tiny_model):
    """The Ray wiring of partial rollouts: weights posted on a `WeightBoard` reach a generate call (its group and
    every token carry the posted version, the samples are the new weights'), and the ordinary load of an older
    version queued behind the call changes nothing."""
    import torch

    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts, load_causal_lm
    from actors.records import SamplingParams
    from actors.rollout import RolloutWorker
    from actors.weights import WeightBoard, pack_state_dict, weights_checksum

    worker = RolloutWorker.serving(HFEngine(tiny_model), seed=0)
    old, new = load_causal_lm(tiny_model), load_causal_lm(tiny_model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.3)
    board = ray_local.remote(WeightBoard).options(num_cpus=0).remote()
    ray_local.get(board.post.remote(3, [ray_local.put(pack_state_dict(new))]))
    prompts = encode_prompts(worker.engine.tokenizer, ["12+34="])
    requests = [PromptRequest("u", "12+34=", prompts[0], {})]
    (group,) = worker.generate(requests, SamplingParams(n=2, max_new_tokens=6), board=board)
    assert group.policy_version == 3 and worker.version == 3
    assert all(s.versions == [3] * len(s.response_ids) for s in group.samples)
    assert worker.engine.checksum() == weights_checksum(new)
    assert worker.load_weights(pack_state_dict(old), 2) == 3  # version 2's load, queued before the post: skipped
    assert worker.engine.checksum() == weights_checksum(new)
