"""The hf engine: G samples per prompt, seeded, EOS and stop strings, log-probs that match a separate
teacher-forced forward pass (what the trainer and scoring workers compute), and our sampling loop against
Hugging Face `generate` and the model's own distribution."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from actors.batch import collate
from actors.records import SamplingParams
from actors.engines.hf import HFEngine
from actors.modeling import encode_prompts, response_logprobs


def ids(engine: HFEngine, prompts: list[str]) -> list[list[int]]:
    """The prompts' token ids, as the driver hands them to the engine."""
    return encode_prompts(engine.tokenizer, prompts)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine(tiny_model)


@pytest.fixture(scope="module")
def hf_engine(tiny_model):
    return HFEngine(tiny_model, sampler="generate")


PROMPTS = ["12+34=", "5+678="]
MIXED = ["1+2=", "12+345=", "9999+99999=", "7="]  # different lengths: left padding


def test_n_samples_per_prompt_seeded(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)
    a = engine.generate(ids(engine, PROMPTS), sp, seed=1)
    assert [len(g) for g in a] == [3, 3]
    assert all(1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) for g in a for c in g)
    b = engine.generate(ids(engine, PROMPTS), sp, seed=1)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    c = engine.generate(ids(engine, PROMPTS), sp, seed=2)
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]


@pytest.mark.parametrize("prompts", [PROMPTS, MIXED])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)])
def test_rollout_logprobs_match_teacher_forcing(engine, temperature, top_p, prompts):
    sp = SamplingParams(n=4, temperature=temperature, top_p=top_p, max_new_tokens=8)
    groups = engine.generate(ids(engine, prompts), sp, seed=3)
    prompt_ids = ids(engine, prompts)
    comps = [c for g in groups for c in g]
    batch = SimpleNamespace(**collate([prompt_ids[i] for i, g in enumerate(groups) for _ in g], [c.token_ids for c in comps],
                    engine.tokenizer.pad_token_id))
    with torch.no_grad():
        logp, _ = response_logprobs(engine.model, batch, temperature)
    for i, c in enumerate(comps):
        torch.testing.assert_close(logp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_across_seeds(engine):
    sp = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    a, b = engine.generate(ids(engine, PROMPTS), sp, seed=1), engine.generate(ids(engine, PROMPTS), sp, seed=9)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert all(g[0].token_ids == g[1].token_ids for g in a)


def test_eos_and_length_finish(engine):
    sp = SamplingParams(n=16, temperature=1.0, max_new_tokens=6)
    comps = [c for g in engine.generate(ids(engine, PROMPTS), sp, seed=4) for c in g]
    eos = engine.tokenizer.eos_token_id
    for c in comps:
        if c.finish_reason == "length":
            assert len(c.token_ids) == 6 and eos not in c.token_ids
        else:
            assert c.token_ids[-1] in (eos,) or eos not in c.token_ids
            assert eos not in c.token_ids[:-1]
    assert {c.finish_reason for c in comps} <= {"stop", "length"}


def test_stop_strings_cut_after_the_first_stop(engine):
    stops = tuple("0123456789")
    sp = SamplingParams(n=8, temperature=1.0, max_new_tokens=10, stop=stops)
    comps = [c for g in engine.generate(ids(engine, PROMPTS), sp, seed=5) for c in g]
    stopped = [c for c in comps if any(s in c.text for s in stops)]
    assert stopped, "seeded sampling should hit a digit"
    for c in stopped:
        assert c.finish_reason == "stop"
        assert c.text[-1] in stops and not any(s in c.text[:-1] for s in stops)
        assert len(c.logprobs) == len(c.token_ids)


@pytest.mark.parametrize("stop", [(), ("3", "7")])
def test_loop_greedy_matches_hf_generate(engine, hf_engine, stop):
    sp = SamplingParams(n=2, temperature=0.0, max_new_tokens=10, stop=stop)
    ours, theirs = engine.generate(ids(engine, MIXED), sp, seed=1), hf_engine.generate(ids(hf_engine, MIXED), sp, seed=1)
    assert [[(c.token_ids, c.text, c.finish_reason) for c in g] for g in ours] == \
        [[(c.token_ids, c.text, c.finish_reason) for c in g] for g in theirs]
    for a, b in zip([c for g in ours for c in g], [c for g in theirs for c in g]):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.8)])
def test_first_token_frequencies_match_the_model(engine, temperature, top_p):
    """Monte Carlo: the first token of N samples is distributed as top-p filtered softmax(logits / T)."""
    n = 2000
    comps = engine.generate(ids(engine, ["12+34="]), SamplingParams(n=n, temperature=temperature, top_p=top_p, max_new_tokens=1),
                            seed=7)[0]
    with torch.no_grad():
        logits = engine.model(torch.tensor(ids(engine, ["12+34="]))).logits[0, -1]
    p = torch.softmax(logits.double() / temperature, dim=-1)
    order = p.argsort(descending=True)
    outside = (p[order].cumsum(0) - p[order]) >= top_p  # mass of the more likely tokens already reaches top_p
    q = p.clone()
    q[order[outside]] = 0.0
    q /= q.sum()
    freq = torch.bincount(torch.tensor([c.token_ids[0] for c in comps]), minlength=len(p)).double() / n
    assert freq[q == 0].sum() == 0, "a token outside the nucleus was sampled"
    tol = 4.5 * (q * (1 - q) / n).sqrt() + 1e-3
    assert ((freq - q).abs() <= tol).all(), (freq - q).abs().max()
    if top_p < 1:
        assert (q == 0).any(), "top_p should drop some tokens of this model, or the check is vacuous"
    assert all(c.logprobs[0] == pytest.approx(p[c.token_ids[0]].log().item(), abs=1e-4) for c in comps[:50])


def test_finished_rows_are_dropped_from_the_batch(engine):
    """Each prompt is prefilled once; each later forward sees only the rows that have not finished."""
    seen: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        sp = SamplingParams(n=8, temperature=1.0, max_new_tokens=10, stop=tuple("0123456789"))
        comps = [c for g in engine.generate(ids(engine, PROMPTS), sp, seed=5) for c in g]
    finally:
        hook.remove()
    live = [sum(len(c.token_ids) > k for c in comps) for k in range(1, sp.max_new_tokens)]
    assert seen == [len(PROMPTS)] + [r for r in live if r > 0]
    assert seen[1] < len(comps), "some rows should stop at their first token"


def test_the_gpu_batch_policy_keeps_power_of_two_batches_and_each_row_its_own_tokens(engine, monkeypatch):
    """On a GPU finished rows stay in the batch until the running ones fit half of it (`batch_rows`): the decoding
    batch shapes are powers of two, a finished row writes nothing more (each completion ends at its first stop) and
    every kept token's log-prob is the teacher-forced one of its own row."""
    import actors.engines.hf as hf

    assert [hf.batch_rows(r, 512, "cuda") for r in (512, 300, 256, 255, 3, 1)] == [512, 512, 256, 256, 4, 1]
    assert hf.batch_rows(300, 512, "cpu") == 300 and hf.batch_rows(5, 520, "cuda:0") == 8
    seen: list[int] = []
    hook = engine.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    gpu_rule = hf.batch_rows
    monkeypatch.setattr(hf, "batch_rows", lambda running, current, device: gpu_rule(running, current, "cuda"))
    sp = SamplingParams(n=5, temperature=1.0, max_new_tokens=10, stop=tuple("0123456789"))
    try:
        groups = engine.generate(ids(engine, MIXED), sp, seed=5)
    finally:
        hook.remove()
    comps = [c for g in groups for c in g]
    decode = seen[1:]  # after the prefill of the distinct prompts
    running = [sum(len(c.token_ids) > j + 1 for c in comps) for j in range(len(decode))]  # rows each forward needs
    assert all(b & (b - 1) == 0 for b in decode) and decode == sorted(decode, reverse=True), decode
    assert all(r <= b < 2 * r for b, r in zip(decode, running)), (decode, running)
    assert any(b > r for b, r in zip(decode, running)), "some finished rows should have stayed in the batch"
    assert len(set(decode)) > 2, "rows should finish at many lengths, or the batch never shrinks"
    for c in comps:
        first = min((i for i, ch in enumerate(c.text) if ch in sp.stop), default=None)
        assert first in (None, len(c.text) - 1), c.text  # nothing written after a row's first stop
        assert c.finish_reason == "stop" or (first is None and len(c.token_ids) == sp.max_new_tokens), c
    prompt_ids = ids(engine, MIXED)
    batch = SimpleNamespace(**collate([prompt_ids[i] for i, g in enumerate(groups) for _ in g],
                                      [c.token_ids for c in comps], engine.tokenizer.pad_token_id))
    with torch.no_grad():
        logp, _ = response_logprobs(engine.model, batch, 1.0)
    for i, c in enumerate(comps):
        torch.testing.assert_close(logp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4, rtol=1e-4)


def test_falls_back_to_generate_without_cache_reshaping(engine, hf_engine, monkeypatch):
    from transformers.cache_utils import Cache

    monkeypatch.delattr(Cache, "batch_select_indices")  # as on a remote-code model's own cache class
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)
    a, b = engine.generate(ids(engine, PROMPTS), sp, seed=2), hf_engine.generate(ids(hf_engine, PROMPTS), sp, seed=2)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]


@pytest.mark.parametrize("prompts", [PROMPTS, MIXED])
def test_prompt_ids_are_padded_as_the_tokenizer_pads_the_text(engine, prompts):
    """The driver tokenizes once and the engine pads the ids: the model sees what tokenizing the text gave."""
    text = engine.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=True)  # left padding
    padded = engine._pad(ids(engine, prompts))
    assert torch.equal(padded["input_ids"], text["input_ids"])
    assert torch.equal(padded["attention_mask"], text["attention_mask"])
    if prompts is MIXED:
        assert (padded["attention_mask"] == 0).any(), "MIXED should need padding, or the check is vacuous"
