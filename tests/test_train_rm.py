"""Reward-model training: the losses it feeds, the new score head, and `raylhf train-rm` end to end into
RewardModelWorker (held-out accuracy rises, scores have mean 0 over the training responses)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from algorithms.losses import kwise_reward_model_loss, reward_model_loss
from orchestrator.offline.train_rm import load_reward_model, preference_loss, ranking_accuracy


def test_preference_loss_is_bradley_terry_for_pairs_and_the_per_prompt_kwise_mean_otherwise():
    torch.manual_seed(0)
    pairs = torch.randn(6, dtype=torch.float64)  # 3 rows of (chosen, rejected)
    assert preference_loss(pairs, [2, 2, 2]) == pytest.approx(reward_model_loss(pairs[0::2], pairs[1::2]).item())
    mixed = torch.randn(2 + 3 + 4 + 3, dtype=torch.float64)  # rows with K = 2, 3, 4, 3
    rows = [mixed[:2], mixed[2:5], mixed[5:9], mixed[9:]]
    want = sum(kwise_reward_model_loss(r[None]).item() for r in rows) / 4  # every prompt weighs the same
    assert preference_loss(mixed, [2, 3, 4, 3]).item() == pytest.approx(want)
    # by hand for one ranking of 3: mean over its pairs of −log σ(s_i − s_j), i better than j
    s = [0.5, 0.2, -1.0]
    by_hand = sum(-math.log(1 / (1 + math.exp(-(s[i] - s[j])))) for i, j in ((0, 1), (0, 2), (1, 2))) / 3
    assert preference_loss(torch.tensor(s, dtype=torch.float64), [3]).item() == pytest.approx(by_hand)


def test_ranking_accuracy_counts_ordered_pairs_and_ties_as_wrong():
    scores = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.5])  # pair right, pair wrong, ranking 2 of 3 right
    assert ranking_accuracy(scores, [2, 2, 3]) == pytest.approx(3 / 5)
    assert ranking_accuracy(torch.tensor([1.0, 1.0]), [2]) == 0.0


def test_score_head_is_seeded_and_the_backbone_is_the_policy(tiny_model):
    from transformers import AutoModelForCausalLM

    a, b = load_reward_model(tiny_model, seed=3), load_reward_model(tiny_model, seed=3)
    c = load_reward_model(tiny_model, seed=4)
    assert torch.equal(a.score.weight, b.score.weight) and not torch.equal(a.score.weight, c.score.weight)
    hidden = a.config.hidden_size
    assert a.score.weight.std().item() == pytest.approx(1 / math.sqrt(hidden + 1), rel=0.25)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert torch.equal(a.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight)


def test_head_layers_start_as_the_identity_and_are_saved_as_one_classifier(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from actors.reward_model import RewardModelWorker

    tok = AutoTokenizer.from_pretrained(tiny_model)
    enc = tok(["1+2=#### 3", "37+485=#### 522"], padding=True, return_tensors="pt")
    bare, stacked = load_reward_model(tiny_model, seed=0), load_reward_model(tiny_model, seed=0, head_layers=2)
    assert stacked.config.num_hidden_layers == bare.config.num_hidden_layers + 2
    with torch.no_grad():
        assert torch.allclose(stacked(**enc).logits, bare(**enc).logits, atol=1e-5)  # new layers pass through
    assert stacked.model.layers[-1].mlp.up_proj.weight.abs().sum() > 0  # only the output projections are zero
    stacked.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    assert RewardModelWorker("rm", str(tmp_path / "rm")).score_texts(["1+2=#### 3"])[0] == pytest.approx(
        bare(**tok(["1+2=#### 3"], return_tensors="pt")).logits[0, 0].item(), abs=1e-5)


def _easy_rows(n: int, seed: int, ranked: bool = False) -> list[dict]:
    """Addition prompts where the preferred response ends in 1 and the dispreferred one in 9: learnable in a few
    steps by a tiny model, and unknown to a random score head."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        body = str(rng.randint(10, 999))
        good, bad, mid = f"#### {body}1", f"#### {body}9", f"#### {body}5"
        rows.append({"prompt": f"{a}+{b}=", "responses": [good, mid, bad]} if ranked
                    else {"prompt": f"{a}+{b}=", "chosen": good, "rejected": bad})
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _config(tmp_path, model: str, train: str, held_out: str, **extra) -> str:
    cfg = {"model": {"path": model}, "data": {"train": {"source": train}, "eval": {"source": held_out}},
           "trainer": {"lr": 3e-3, "batch_size": 16, "epochs": 2, "warmup_steps": 2, "threads": 1},
           "output_dir": str(tmp_path / "rm"), "logging": {"progress": False}, **extra}
    path = tmp_path / "rm.yaml"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_train_rm_cli_end_to_end_into_reward_model_worker(tmp_path, tiny_model, capsys):
    from actors.reward_model import RewardModelWorker
    from orchestrator.cli import main

    train_rows, held_out = _easy_rows(96, seed=0), _easy_rows(64, seed=1)
    cfg = _config(tmp_path, tiny_model, _write_jsonl(tmp_path / "train.jsonl", train_rows),
                  _write_jsonl(tmp_path / "eval.jsonl", held_out))
    assert main(["train-rm", cfg]) == 0
    assert "held-out pairwise accuracy:" in capsys.readouterr().out
    info = json.loads((tmp_path / "rm" / "training.json").read_text())
    # The pairs differ only in the last digit, so an untrained random head ranks nearly all of them one way
    # (right or wrong, by float detail); what training must show is accuracy near 1 and a loss far below log 2.
    assert info["eval_accuracy_after"] >= 0.95 and info["train_loss"] < 0.5  # log 2 = 0.69 untrained
    assert info["steps"] == 12  # 96 rows / 16 per step * 2 epochs

    worker = RewardModelWorker("rm", str(tmp_path / "rm"), batch_size=7)
    texts = list(dict.fromkeys(r["prompt"] + t for r in train_rows for t in (r["chosen"], r["rejected"])))
    scores = worker.score_texts(texts)
    assert abs(sum(scores) / len(scores)) < 1e-4  # normalised: mean 0 over the training responses
    assert worker.offset == pytest.approx(info["reward_offset"]) and abs(info["reward_offset"]) > 1e-3
    held = worker.score_texts([r["prompt"] + t for r in held_out for t in (r["chosen"], r["rejected"])])
    assert sum(c > r for c, r in zip(held[0::2], held[1::2])) / len(held_out) == pytest.approx(
        info["eval_accuracy_after"])  # the worker scores exactly as training measured


def test_kwise_loss_trains_on_rankings(tmp_path, tiny_model):
    from orchestrator.offline.config import RewardModelConfig, load_preference_config
    from orchestrator.offline.preferences import load_preferences
    from orchestrator.offline.train_rm import train_reward_model

    train = _write_jsonl(tmp_path / "train.jsonl", _easy_rows(64, seed=0, ranked=True))
    held_out = _write_jsonl(tmp_path / "eval.jsonl", _easy_rows(32, seed=1, ranked=True))
    cfg = load_preference_config(RewardModelConfig, _config(tmp_path, tiny_model, train, held_out, loss="kwise",
                                                            normalize=False))
    summary = train_reward_model(cfg, load_preferences(train, form="ranked"), load_preferences(held_out, form="ranked"))
    assert summary["eval_accuracy_after"] >= 0.9 > summary["eval_accuracy_before"]
    assert summary["reward_offset"] == 0.0


def test_reward_model_worker_subtracts_the_stored_offset(tmp_path, tiny_reward_model):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from actors.reward_model import RewardModelWorker

    texts = ["1+2=#### 3", "37+485=#### 522"]
    plain = RewardModelWorker("rm", tiny_reward_model).score_texts(texts)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    model.config.reward_offset = 1.25
    model.save_pretrained(tmp_path / "shifted")
    AutoTokenizer.from_pretrained(tiny_reward_model).save_pretrained(tmp_path / "shifted")
    shifted = RewardModelWorker("rm", str(tmp_path / "shifted")).score_texts(texts)
    assert shifted == pytest.approx([s - 1.25 for s in plain], abs=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_lm_loss_is_the_causal_lms_next_token_loss_on_the_response_and_scores_are_the_classifiers(tmp_path, tied):
    """`forward_with_lm` against Hugging Face's own causal-LM loss (labels on the response tokens only) and the
    sequence classifier's pooled score; with untied embeddings the LM head comes from the causal LM."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from examples.arith.model import tiny_config
    from examples.arith.tokenizer import build_tokenizer
    from orchestrator.offline.train_rm import LMHead, TextScorer, _pad

    torch.manual_seed(0)
    tok = build_tokenizer()
    path = str(tmp_path / "lm")
    LlamaForCausalLM(tiny_config(tok, tie_word_embeddings=tied, initializer_range=0.2)).save_pretrained(path)
    tok.save_pretrained(path)
    rm = load_reward_model(path, seed=0)
    scorer = TextScorer(tok, 64)
    pairs = [("1+2=", "#### 3"), ("37+485=", "#### 522"), ("5+5=", "#### 10")]
    ids = scorer.encode([p + r for p, r in pairs])
    lengths = scorer.response_lengths(pairs, ids)
    assert lengths == [6, 8, 7]  # one token per character; <bos> belongs to the prompt
    scores, nll = scorer.forward_with_lm(rm, LMHead(rm, path), ids, lengths)
    with torch.no_grad():
        assert torch.allclose(scores, scorer.forward(rm, ids), atol=1e-5)
        input_ids, mask = _pad(ids, tok.pad_token_id)  # [3, L]
        labels = input_ids.masked_fill(mask == 0, -100)
        for i, n in enumerate(lengths):
            labels[i, : int(mask[i].sum()) - n] = -100  # the prompt is not predicted
        want = AutoModelForCausalLM.from_pretrained(path)(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    assert nll.item() == pytest.approx(want.item(), rel=1e-5)
    # a row with no response tokens adds nothing
    _, only_first = scorer.forward_with_lm(rm, LMHead(rm, path), ids, [lengths[0], 0, 0])
    _, alone = scorer.forward_with_lm(rm, LMHead(rm, path), ids[:1], lengths[:1])
    assert only_first.item() == pytest.approx(alone.item(), rel=1e-5)


def test_train_rm_with_the_lm_loss_still_learns_the_preferences(tmp_path, tiny_model):
    from orchestrator.offline.config import RewardModelConfig, load_preference_config
    from orchestrator.offline.preferences import load_preferences
    from orchestrator.offline.train_rm import train_reward_model

    train = _write_jsonl(tmp_path / "train.jsonl", _easy_rows(96, seed=0))
    held_out = _write_jsonl(tmp_path / "eval.jsonl", _easy_rows(64, seed=1))
    cfg = load_preference_config(RewardModelConfig, _config(tmp_path, tiny_model, train, held_out, lm_coef=0.5,
                                                            head_layers=1))
    summary = train_reward_model(cfg, load_preferences(train), load_preferences(held_out))
    assert summary["eval_accuracy_after"] >= 0.95 and summary["train_loss"] < 0.5
    assert summary["lm_nll"] < summary["lm_nll_first"]  # the preferred responses became likelier
