"""The arithmetic example: tokenizer round trip, disjoint splits, verifier, cached atomic warm start."""

from __future__ import annotations

import json
import os

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.arith import task, warmstart
from examples.arith.evaluate import greedy_accuracy
from examples.arith.tokenizer import CHARS, build_tokenizer


def test_tokenizer_is_one_token_per_char_and_round_trips():
    tok = build_tokenizer()
    text = "123+456=#### 579\n"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok) == 4 + len(CHARS)


def test_tokenizer_saves_and_loads(tmp_path):
    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.decode(tok("77+8=")["input_ids"], skip_special_tokens=True) == "77+8="
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<pad>", "<eos>", "<bos>")


def test_rows_are_correct_seeded_distinct_and_splits_disjoint():
    train = task.make_rows("train", 3000)
    held_out = task.make_rows("eval", 300)
    for row in train[:50] + held_out[:50]:
        a, b = row["prompt"].rstrip("=").split("+")
        assert int(a) + int(b) == int(row["answer"])
        assert task.LOW <= int(a) <= task.HIGH and task.LOW <= int(b) <= task.HIGH
    assert task.make_rows("train", 3000) == train
    assert task.make_rows("train", 50, seed=1) != train[:50]
    assert len({r["prompt"] for r in train}) == len(train)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    # the split is a stable ~1-in-EVAL_EVERY hash of the operands, not of the seed
    assert not {r["prompt"] for r in task.make_rows("eval", 300, seed=7)} & {r["prompt"] for r in train}
    with pytest.raises(ValueError, match="split"):
        task.make_rows("test", 1)


@pytest.mark.parametrize(
    "completion,reward",
    [("#### 579", 1.0), ("#### 57", 0.0), ("#### 0579", 1.0), ("#### 12\n#### 579", 1.0),
     ("579", 0.0), ("#### 579\n#### 1", 0.0), ("", 0.0)],
)
def test_verify_reads_the_last_final_answer(completion, reward):
    assert task.verify(completion, "579") == reward


def test_sft_target_verifies():
    row = task.make_rows("train", 1)[0]
    assert task.verify(task.sft_completion(row), row["answer"]) == 1.0


def test_warmstart_is_cached_atomic_and_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt")
    monkeypatch.setattr(warmstart, "EVAL_ROWS", 16)
    monkeypatch.setattr(warmstart, "VALIDATION_ROWS", 8)
    assert warmstart.prepare(path, max_steps=3, target=None) == path
    info = json.load(open(os.path.join(path, warmstart.MARKER)))
    assert info["steps_run"] == 3 and 0.0 <= info["eval_accuracy"] <= 1.0
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    warmstart.prepare(path, max_steps=3, target=None)  # complete: reused, not rebuilt
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp dirs left

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    acc = greedy_accuracy(model, tok, task.make_rows("eval", 16), warmstart.MAX_NEW_TOKENS)
    assert acc == pytest.approx(info["eval_accuracy"])


def test_unfinished_build_is_replaced(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "config.json").write_text("{ truncated")  # a crash mid-save, marker never written
    assert not warmstart.is_complete(str(path))
    warmstart.build_random(str(path))
    assert warmstart.is_complete(str(path))
    AutoModelForCausalLM.from_pretrained(str(path))


def test_warmstart_stops_at_the_target_accuracy(tmp_path, monkeypatch):
    monkeypatch.setattr(warmstart, "VALIDATION_ROWS", 8)
    monkeypatch.setattr(warmstart, "EVAL_ROWS", 8)
    monkeypatch.setattr(warmstart, "CHECK_EVERY", 2)
    warmstart.prepare(str(tmp_path / "a"), max_steps=6, target=0.0)  # any accuracy meets 0%
    assert json.load(open(tmp_path / "a" / warmstart.MARKER))["steps_run"] == 2
    warmstart.prepare(str(tmp_path / "b"), max_steps=6, target=1.01)  # unreachable: all steps
    assert json.load(open(tmp_path / "b" / warmstart.MARKER))["steps_run"] == 6


def test_validation_problems_are_never_trained_on(monkeypatch):
    seen: list[str] = []
    checked: list[str] = []
    real_encode = warmstart._encode
    monkeypatch.setattr(warmstart, "_encode", lambda tok, rows: (seen.extend(r["prompt"] for r in rows),
                                                                 real_encode(tok, rows))[1])
    monkeypatch.setattr(warmstart, "greedy_accuracy",
                        lambda model, tok, rows, n: (checked.extend(r["prompt"] for r in rows), 0.0)[1])
    monkeypatch.setattr(warmstart, "VALIDATION_SEED", 0)  # same draw as the training rows: must be skipped
    monkeypatch.setattr(warmstart, "CHECK_EVERY", 4)
    from examples.arith.model import tiny_config
    from transformers import LlamaForCausalLM

    tok = build_tokenizer()
    warmstart._train(LlamaForCausalLM(tiny_config(tok)), tok, max_steps=8, target=None, seed=0)
    assert len(seen) == 8 * warmstart.BATCH and seen == [r["prompt"] for r in task.make_rows("train", len(seen))]
    assert len(set(checked)) == warmstart.VALIDATION_ROWS and not set(checked) & set(seen)


def test_a_checkpoint_built_with_another_recipe_is_rebuilt(tmp_path, monkeypatch):
    """A cached warm start from older settings (here: another learning rate) is not reused silently."""
    path = str(tmp_path / "ckpt")
    warmstart.build_random(path)
    assert warmstart.is_complete(path, warmstart.recipe(max_steps=0))
    monkeypatch.setattr(warmstart, "LR", warmstart.LR * 3)
    assert warmstart.is_complete(path) and not warmstart.is_complete(path, warmstart.recipe(max_steps=0))
    before = (tmp_path / "ckpt" / "warmstart.json").stat().st_mtime_ns
    warmstart.build_random(path)
    info = json.loads((tmp_path / "ckpt" / "warmstart.json").read_text())
    assert info["lr"] == warmstart.LR and (tmp_path / "ckpt" / "warmstart.json").stat().st_mtime_ns != before
