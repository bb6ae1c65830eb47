"""Preference data: the arithmetic generator (labels, ranking, splits, cache) and the JSONL loader's errors."""

from __future__ import annotations

import json

import pytest

from examples.arith import preferences as arith_prefs
from examples.arith.task import verify
from orchestrator.offline.preferences import PreferenceError, encode_responses, load_preferences

ROWS = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "5+5=", "answer": "10"}, {"prompt": "7+1=", "answer": "8"}]
SAMPLES = [
    ["#### 3", "#### 4", "#### 3", "#### 13", "oops", "#### 4", "#### 2", ""],  # correct and wrong
    ["#### 10", "#### 10", "#### 10", "#### 10", "#### 10", "#### 10", "#### 10", "#### 10"],  # all correct
    ["#### 9", "#### 7", "x", "#### 6", "#### 9", "#### 9", "#### 7", "#### 6"],  # all wrong
]


def test_correct_answers_beat_wrong_ones_and_rankings_go_best_first():
    pairs, ranked = arith_prefs.rows_from_samples(ROWS, SAMPLES, pairs_per_prompt=3)
    assert {p["prompt"] for p in pairs} == {"1+2="} and [r["prompt"] for r in ranked] == ["1+2="]
    for p in pairs:
        assert verify(p["chosen"], p["answer"]) == 1.0 and verify(p["rejected"], p["answer"]) == 0.0
    # the most frequent wrong answer first; at most 3 pairs
    assert [p["rejected"] for p in pairs] == ["#### 4", "#### 13", "#### 2"]
    # correct, then wrong numbers by distance to 3 (4 and 2 tie at 1: the more frequent one is kept), then no answer
    assert ranked[0]["responses"] == ["#### 3", "#### 4", "#### 13", "oops"]


def test_synthetic_pairs_follow_the_quality_order_and_cover_the_answers_a_policy_can_hack_with():
    """Every synthetic pair is ordered as `quality` orders it, checked here by the verifier and a parse of the
    answer; stopping at once (an empty completion) appears among the rejected; prompts stay in their split."""
    from examples.arith.task import _split_of

    rows = arith_prefs.synthetic_pairs(3000, seed=5)
    assert rows == arith_prefs.synthetic_pairs(3000, seed=5)  # seeded
    for r in rows:
        good, bad = (verify(r[k], r["answer"]) for k in ("chosen", "rejected"))
        marked = [r[k].startswith("#### ") and r[k][5:].isdigit() for k in ("chosen", "rejected")]
        assert good > bad or (good == bad == 0 and marked == [True, False]), r  # right > wrong > no answer
        a, b = r["prompt"][:-1].split("+")
        assert _split_of(int(a), int(b)) == "train"
    rejected = {r["rejected"] for r in rows}
    assert {"", "####", "#### "} <= rejected
    assert sum(verify(r["chosen"], r["answer"]) == 0 for r in rows) / len(rows) == pytest.approx(0.05, abs=0.02)
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in arith_prefs.synthetic_pairs(3000, split="eval")}


def test_generated_splits_are_disjoint_seeded_and_cached(tmp_path, monkeypatch, tiny_model):
    calls = []

    def fake_samples(policy, prompts, n, temperature, seed, prompts_per_call=128):
        calls.append(seed)
        answers = [str(eval(p.rstrip("="))) for p in prompts]
        return [[f"#### {a}", f"#### {int(a) + 1}", f"#### {int(a) + 10}", "no"][:n] for a in answers]

    monkeypatch.setattr(arith_prefs, "sample_completions", fake_samples)
    # policy_prepare=None: the default would rebuild tiny_model as a warm start (minutes, and a changed fixture)
    kw = dict(n_prompts=30, samples_per_prompt=4, policy=tiny_model, policy_prepare=None, cache_dir=str(tmp_path))
    train = arith_prefs.pairs(split="train", **kw)
    held_out = arith_prefs.ranked(split="eval", **kw)
    assert len(train) == 30 * 3 and len(held_out) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert held_out[0]["responses"][0].startswith("#### ") and held_out[0]["responses"][-1] == "no"
    assert len(calls) == 2
    assert arith_prefs.pairs(split="train", **kw) == train  # read back from the JSONL cache: no new sampling
    assert len(calls) == 2
    assert arith_prefs.pairs(split="train", **{**kw, "seed": 1}) != train  # another seed, other prompts
    assert load_preferences(str(arith_prefs.generate(split="train", **kw)["pairs"]), form="pairs") == train


def test_sampling_from_the_policy_is_deterministic(tiny_model):
    prompts = ["12+34=", "500+500="]
    a = arith_prefs.sample_completions(tiny_model, prompts, n=3, temperature=1.0, seed=7)
    b = arith_prefs.sample_completions(tiny_model, prompts, n=3, temperature=1.0, seed=7)
    c = arith_prefs.sample_completions(tiny_model, prompts, n=3, temperature=1.0, seed=8)
    assert a == b and a != c and [len(x) for x in a] == [3, 3]


def _write(path, lines: list) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


GOOD = {"prompt": "1+2=", "chosen": "#### 3", "rejected": "#### 4"}


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "1+2=", "chosen": "#### 3"}, "missing key 'rejected'"),
    ({**GOOD, "chosen": None}, "'chosen' must be a string, got None"),
    ({**GOOD, "rejected": 4}, "'rejected' must be a string, got 4"),
    ({**GOOD, "prompt": None}, "'prompt' must be a non-empty string"),
    ({**GOOD, "rejected": "#### 3"}, "the same text"),
    (["not", "an", "object"], "expected a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_a_bad_pair_row_names_the_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "p.jsonl", [GOOD, "", GOOD, bad, GOOD])  # line 2 is blank: the bad row is line 4
    with pytest.raises(PreferenceError, match=rf"p\.jsonl: line 4: .*{message}"):
        load_preferences(path, form="pairs")


def test_an_empty_response_is_a_response(tmp_path):
    """A policy may stop at once; preferences may say that any answer beats that."""
    pairs = _write(tmp_path / "p.jsonl", [{**GOOD, "rejected": ""}])
    ranked = _write(tmp_path / "r.jsonl", [{"prompt": "1+2=", "responses": ["#### 3", "#### 4", ""]}])
    assert load_preferences(pairs, form="pairs")[0]["rejected"] == ""
    assert load_preferences(ranked, form="ranked")[0]["responses"][-1] == ""


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "1+2=", "responses": ["#### 3"]}, "at least 2 responses"),
    ({"prompt": "1+2=", "responses": "#### 3"}, "must be a list"),
    ({"prompt": "1+2=", "responses": ["#### 3", 7]}, r"'responses'\[1\] must be a string"),
    ({"prompt": "1+2=", "responses": ["#### 3", "#### 3"]}, "repeats a text"),
    ({"prompt": "1+2=", "chosen": "a", "rejected": "b"}, "missing key 'responses'"),
])
def test_a_bad_ranked_row_names_the_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "r.jsonl", [{"prompt": "1+2=", "responses": ["#### 3", "#### 4", "x"]}, bad])
    with pytest.raises(PreferenceError, match=rf"r\.jsonl: line 2: .*{message}"):
        load_preferences(path, form="ranked")


def test_function_sources_name_the_row_and_empty_or_missing_sources_fail(tmp_path):
    with pytest.raises(PreferenceError, match=r"examples.arith.task:make_rows: row 1: missing key 'chosen'"):
        load_preferences("examples.arith.task:make_rows", {"split": "train", "n": 3}, form="pairs")
    with pytest.raises(PreferenceError, match="no preference rows"):
        load_preferences(_write(tmp_path / "empty.jsonl", []), form="pairs")
    with pytest.raises(PreferenceError, match="file not found"):
        load_preferences(str(tmp_path / "nowhere.jsonl"), form="pairs")
    with pytest.raises(PreferenceError, match="has no attribute"):
        load_preferences("examples.arith.task:nothing_here", form="pairs")


def test_response_tokens_are_masked_after_the_prompt_and_end_in_eos():
    from examples.arith.tokenizer import build_tokenizer

    tok = build_tokenizer()
    b = encode_responses(tok, [("1+2=", "#### 3"), ("100+200=", "#### 300")], max_length=64, append_eos=True)
    assert b.input_ids.shape == (2, 1 + 8 + 8 + 1)  # <bos> + prompt + response + <eos>, the longer row
    assert b.response_mask[0].tolist() == [0] * 5 + [1] * 7 + [0] * 6  # 6 response chars + <eos>, then padding
    assert b.attention_mask[0].sum() == 12 and b.input_ids[0, 11] == tok.eos_token_id
    with pytest.raises(PreferenceError, match="above max_length=10"):
        encode_responses(tok, [("100+200=", "#### 300")], max_length=10, append_eos=True)


def test_cli_exits_2_on_a_bad_row_before_loading_any_model(tmp_path, capsys):
    from orchestrator.cli import main

    train = _write(tmp_path / "train.jsonl", [GOOD, GOOD, {"prompt": "1+2=", "chosen": "#### 3", "rejected": None}])
    for command in ("train-rm", "train-dpo"):
        cfg = tmp_path / f"{command}.yaml"
        cfg.write_text(json.dumps({"model": {"path": str(tmp_path / "no-model-needed"), "prepare": "json:loads"},
                                   "data": {"train": {"source": train}}, "output_dir": str(tmp_path / "out")}))
        assert main([command, str(cfg)]) == 2
        assert "train.jsonl: line 3: 'rejected' must be a string, got None" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_exits_2_on_a_bad_config_value_naming_the_field(tmp_path, capsys):
    from orchestrator.cli import main

    train = _write(tmp_path / "train.jsonl", [GOOD])
    cfg = tmp_path / "rm.yaml"
    cfg.write_text(json.dumps({"model": {"path": "m", "prepare": "json:loads"}, "data": {"train": {"source": train}},
                               "output_dir": "out"}))
    assert main(["train-rm", str(cfg), "--set", "trainer.lr=-1"]) == 2
    assert "trainer.lr: Input should be greater than 0" in capsys.readouterr().err
    assert main(["train-rm", str(cfg), "--set", "loss=listwise"]) == 2
    assert "loss: Input should be 'pairwise' or 'kwise'" in capsys.readouterr().err
    assert main(["train-dpo", str(cfg), "--set", "beta=0"]) == 2
    assert "beta: Input should be greater than 0" in capsys.readouterr().err
    assert main(["train-dpo", str(cfg), "--set", "data.eval.source=missing.jsonl"]) == 2
    assert "data.eval.source: file 'missing.jsonl' not found" in capsys.readouterr().err


def test_example_configs_are_valid():
    from orchestrator.offline.config import DPOConfig, RewardModelConfig, load_preference_config

    rm = load_preference_config(RewardModelConfig, "examples/arith_rm.yaml")
    dpo = load_preference_config(DPOConfig, "examples/arith_dpo.yaml")
    assert rm.output_dir == "checkpoints/arith-rm" and rm.loss == "pairwise"
    assert dpo.eval is not None and dpo.eval.size == 500
    kwise = load_preference_config(RewardModelConfig, "examples/arith_rm.yaml",
                                   ["loss=kwise", "data.train.source=examples.arith.preferences:ranked"])
    assert kwise.form == "ranked"
