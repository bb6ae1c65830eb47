"""Offline DPO: sequence log-probs, the log 2 start, a falling loss, and `raylhf train-dpo` end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from orchestrator.offline.train_dpo import sequence_logprobs


def _model_and_tokenizer(path):
    from actors.modeling import load_causal_lm, load_tokenizer

    torch.set_num_threads(1)
    return load_causal_lm(path).eval(), load_tokenizer(path)


def test_sequence_logprobs_sum_the_response_tokens_and_eos_of_each_unpadded_text(tiny_model):
    model, tok = _model_and_tokenizer(tiny_model)
    pairs = [("1+2=", "#### 3"), ("100+200=", "#### 300"), ("5+5=", "#### 10")]
    with torch.no_grad():
        got = sequence_logprobs(model, tok, pairs, max_length=64, append_eos=True)
        for (prompt, response), value in zip(pairs, got):
            p = tok(prompt)["input_ids"]
            r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            logp = torch.log_softmax(model(torch.tensor([p + r])).logits[0].double(), -1)  # [L, V]
            want = sum(logp[len(p) - 1 + t, r[t]].item() for t in range(len(r)))
            assert value.item() == pytest.approx(want, abs=1e-4)
        no_eos = sequence_logprobs(model, tok, pairs, max_length=64, append_eos=False)
    assert (no_eos > got).all()  # one fewer (negative) log-prob in each sum


def _easy_pairs(n: int, seed: int) -> list[dict]:
    """Prompts whose preferred completion ends in 1 and dispreferred one in 9 (a random policy has no idea)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = str(rng.randint(10, 999))
        out.append({"prompt": f"{rng.randint(10, 999)}+{rng.randint(10, 999)}=", "chosen": f"#### {body}1",
                    "rejected": f"#### {body}9"})
    return out


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_dpo_cli_end_to_end(tmp_path, tiny_model, capsys):
    from actors.modeling import load_causal_lm
    from orchestrator.cli import main

    train = _write_jsonl(tmp_path / "train.jsonl", _easy_pairs(64, seed=0))
    held_out = _write_jsonl(tmp_path / "eval.jsonl", _easy_pairs(32, seed=1))
    cfg = {"model": {"path": tiny_model}, "data": {"train": {"source": train}, "eval": {"source": held_out}},
           "beta": 0.5, "trainer": {"lr": 2e-3, "batch_size": 16, "epochs": 3, "warmup_steps": 1, "threads": 1},
           "eval": {"prompts": {"source": "examples.arith.task:make_rows", "kwargs": {"split": "eval", "n": 16}},
                    "size": 16, "max_new_tokens": 6},
           "output_dir": str(tmp_path / "policy"), "logging": {"progress": False}}
    (tmp_path / "dpo.yaml").write_text(json.dumps(cfg))
    assert main(["train-dpo", str(tmp_path / "dpo.yaml")]) == 0
    out = capsys.readouterr().out
    assert "held-out greedy accuracy:" in out and "held-out preference accuracy" in out
    info = json.loads((tmp_path / "policy" / "training.json").read_text())
    assert info["first_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 1
    assert info["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert info["eval_before"]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert info["train_loss"] < 0.6 and info["eval_after"]["loss"] < 0.6
    assert info["eval_after"]["reward_accuracy"] >= 0.9 and info["eval_after"]["reward_margin"] > 0.2
    assert 0.0 <= info["greedy_accuracy_after"] <= 1.0 and info["steps"] == 12
    trained, start = load_causal_lm(str(tmp_path / "policy")), load_causal_lm(tiny_model)
    assert not torch.equal(trained.model.embed_tokens.weight, start.model.embed_tokens.weight)


def test_greedy_accuracy_uses_the_rule_verifier(tiny_model, monkeypatch):
    from orchestrator.offline import train_dpo
    from orchestrator.offline.config import GreedyEvalConfig

    model, tok = _model_and_tokenizer(tiny_model)
    rows = [{"prompt": "1+2=", "answer": "3"}, {"prompt": "2+2=", "answer": "4"}, {"prompt": "5+5=", "answer": "10"}]
    from actors.records import Completion
    from actors.engines.hf import HFEngine

    texts = iter(["#### 3", "#### 5", "x #### 10"])
    monkeypatch.setattr(HFEngine, "generate", lambda self, prompts, sampling, seed: [
        [Completion([1], next(texts), [0.0], "stop")] for _ in prompts])
    cfg = GreedyEvalConfig(prompts={"source": "unused.jsonl"})
    assert train_dpo.greedy_accuracy(model, tok, rows, cfg) == pytest.approx(2 / 3)
