"""The hf engine: G samples per prompt, seeded, EOS and stop strings, and log-probs that match a
separate teacher-forced forward pass (what the trainer and scoring workers compute)."""

from __future__ import annotations

import pytest
import torch

from actors.batch import collate
from actors.engines import SamplingParams
from actors.engines.hf import HFEngine
from actors.modeling import response_logprobs


@pytest.fixture(scope="module")
def engine(tiny_model):
    return HFEngine(tiny_model)


PROMPTS = ["12+34=", "5+678="]


def test_n_samples_per_prompt_seeded(engine):
    sp = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)
    a = engine.generate(PROMPTS, sp, seed=1)
    assert [len(g) for g in a] == [3, 3]
    assert all(1 <= len(c.token_ids) <= 6 and len(c.logprobs) == len(c.token_ids) for g in a for c in g)
    b = engine.generate(PROMPTS, sp, seed=1)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    c = engine.generate(PROMPTS, sp, seed=2)
    assert [[x.token_ids for x in g] for g in a] != [[x.token_ids for x in g] for g in c]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_teacher_forcing(engine, temperature):
    sp = SamplingParams(n=4, temperature=temperature, max_new_tokens=8)
    groups = engine.generate(PROMPTS, sp, seed=3)
    prompt_ids = engine.encode(PROMPTS)
    comps = [c for g in groups for c in g]
    batch = collate([prompt_ids[i] for i, g in enumerate(groups) for _ in g], [c.token_ids for c in comps],
                    engine.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = response_logprobs(engine.model, batch, temperature)
    for i, c in enumerate(comps):
        torch.testing.assert_close(logp[i, : len(c.token_ids)], torch.tensor(c.logprobs), atol=1e-4, rtol=1e-4)


def test_greedy_is_deterministic_across_seeds(engine):
    sp = SamplingParams(n=2, temperature=0.0, max_new_tokens=6)
    a, b = engine.generate(PROMPTS, sp, seed=1), engine.generate(PROMPTS, sp, seed=9)
    assert [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]
    assert all(g[0].token_ids == g[1].token_ids for g in a)


def test_eos_and_length_finish(engine):
    sp = SamplingParams(n=16, temperature=1.0, max_new_tokens=6)
    comps = [c for g in engine.generate(PROMPTS, sp, seed=4) for c in g]
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
    comps = [c for g in engine.generate(PROMPTS, sp, seed=5) for c in g]
    stopped = [c for c in comps if any(s in c.text for s in stops)]
    assert stopped, "seeded sampling should hit a digit"
    for c in stopped:
        assert c.finish_reason == "stop"
        assert c.text[-1] in stops and not any(s in c.text[:-1] for s in stops)
        assert len(c.logprobs) == len(c.token_ids)
