"""`raylhf eval`: the pass@k estimator against brute force, and the command end to end on the tiny model."""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.evaluation import mean_pass_at_k, pass_at_k
from tests.conftest import base_config

REWARDS = '''
def coin(prompt, completion, **fields):
    """Correct for some completions and not others: a spread of correct counts per problem."""
    return float(sum(map(ord, completion)) % 2)


def broken(prompt, completion, **fields):
    raise ValueError("this verifier always fails")
'''


def brute_force_pass_at_k(outcomes: list[bool], k: int) -> Fraction:
    """The share of all k-subsets of the samples that hold at least one correct sample."""
    subsets = list(itertools.combinations(outcomes, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_enumeration_of_k_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_force_pass_at_k(outcomes, k)), abs=1e-15)


def test_pass_at_k_edge_cases_and_mean():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    assert pass_at_k(10, 6, 5) == 1.0  # every 5-subset holds one of the 6 correct samples
    assert mean_pass_at_k([0, 2, 4], 4, 2) == pytest.approx((0 + 5 / 6 + 1) / 3)
    for bad in ((4, 5, 1), (4, 2, 0), (4, 2, 5)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def _job(tmp_path, tiny_model, **sections) -> str:
    (tmp_path / "eval_rewards.py").write_text(REWARDS)
    functions = [{"name": f"{tmp_path / 'eval_rewards.py'}:coin"},
                 {"name": f"{tmp_path / 'eval_rewards.py'}:broken", "weight": 0.0}]
    cfg = base_config(tiny_model, reward={"functions": functions, "num_processes": 1, "accuracy_label": "coin",
                                          "failure_score": -1.0},
                      rollout={"max_new_tokens": 4}, loop={"eval_size": 3}, **sections)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_eval_cli_end_to_end(tmp_path, tiny_model, capsys):
    out = tmp_path / "results" / "eval.json"
    rc = main(["eval", _job(tmp_path, tiny_model), "--checkpoint", tiny_model, "--k", "1", "3", "--samples", "4",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    result = json.loads(out.read_text())
    assert result["problems"] == 3 and result["sampling"]["n"] == 4
    counts = [p["correct_samples"] for p in result["per_problem"]]
    assert len(counts) == 3 and all(0 <= c <= 4 for c in counts)
    for k in (1, 3):
        assert result["pass_at_k"][str(k)] == pytest.approx(mean_pass_at_k(counts, 4, k))
    assert result["pass_at_k"]["1"] == pytest.approx(result["sampling"]["accuracy"])
    assert result["greedy"]["accuracy"] == pytest.approx(sum(p["greedy_correct"] for p in result["per_problem"]) / 3)
    # The failing verifier went through RewardWorker: every sample failed, was counted, and the run went on.
    assert result["reward_failures"] == {"coin": 0, "broken": 3 * (1 + 4)}
    assert "greedy accuracy" in printed and "pass@3 (n=4, T=1)" in printed and "broken 15" in printed


def test_eval_cli_takes_a_run_directory(tmp_path, tiny_model):
    import shutil

    shutil.copytree(tiny_model, tmp_path / "run" / "final_policy")
    out = tmp_path / "eval.json"
    assert main(["eval", _job(tmp_path, tiny_model), "--checkpoint", str(tmp_path / "run"), "--samples", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["checkpoint"] == str((tmp_path / "run" / "final_policy").resolve()) and "1" in result["pass_at_k"]


@pytest.mark.parametrize("args, sections, message", [
    (["--k", "4", "--samples", "2"], {}, "every k must be >= 1 and <= the samples per problem"),
    (["--k", "0"], {}, "every k must be >= 1"),
    ([], {"data": {"eval": None}}, "data.eval: required by `raylhf eval`"),
    (["--set", "rollout.top_p=2"], {}, "rollout.top_p"),
])
def test_eval_cli_bad_input_exits_2(tmp_path, tiny_model, capsys, args, sections, message):
    rc = main(["eval", _job(tmp_path, tiny_model, **sections), "--checkpoint", tiny_model, *args])
    assert rc == 2 and message in capsys.readouterr().err


def test_eval_cli_bad_checkpoint_and_chat_rows_exit_2(tmp_path, tiny_model, capsys):
    job = _job(tmp_path, tiny_model)
    assert main(["eval", job, "--checkpoint", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "1+2"}]}) + "\n")
    assert main(["eval", job, "--checkpoint", tiny_model, "--set", f"data.eval.source={tmp_path / 'chat.jsonl'}",
                 "--set", "data.eval.kwargs={}"]) == 2
    assert "data.eval: line 1 is a chat row" in capsys.readouterr().err


def _spread(prompt, completion, **fields):
    """0, 1 or 2 by the completion's length: a spread of rewards from a random policy."""
    return float(len(completion) % 3)


def _digits(prompt, completion, answer, **fields):
    return float(sum(ch.isdigit() for ch in completion) + len(answer) % 2)


def test_the_greedy_evaluator_equals_rollout_metrics_and_a_brute_force_count(tiny_model):
    """Every greedy evaluator (loop, `raylhf eval`, DPO, the examples, the TRL benchmark) goes through
    actors.evaluation; its numbers must equal rollout_metrics' bit for bit and a plain `generate` recount."""
    import torch

    from actors.evaluation import evaluate_greedy, greedy_eval, greedy_sampling, in_process, requests_from_rows
    from actors.modeling import load_causal_lm, load_tokenizer
    from orchestrator.metrics import rollout_metrics

    torch.set_num_threads(1)
    model, tok = load_causal_lm(tiny_model).train(), load_tokenizer(tiny_model)
    tok.padding_side = "right"
    rows = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in ((1, 2), (35, 7), (400, 99), (8, 88), (5, 5))]
    rewards = [("spread", _spread, 0.5), ("digits", _digits, 2.0)]
    requests, sampling = requests_from_rows(rows, tok), greedy_sampling(6)
    rng = torch.random.get_rng_state()
    for label, threshold in ((None, 1.0), ("spread", 1.0), ("digits", 2.0)):
        result = evaluate_greedy(in_process(model, tok, rewards, batch_size=2), requests, sampling, threshold, label)
        m = rollout_metrics(result.groups, threshold, label)
        numbers = greedy_eval(in_process(model, tok, rewards, batch_size=2), requests, sampling, threshold, label)
        assert numbers == {"accuracy": m["accuracy"], "reward": m["reward/mean"],
                           "response_length": m["response_length/mean"]}
        # Brute force: one left-padded HF generate over all prompts, cut after EOS, rewards summed by hand.
        side, tok.padding_side = tok.padding_side, "left"
        enc = tok([r["prompt"] for r in rows], return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.eval().generate(**enc, do_sample=False, max_new_tokens=6, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id)[:, enc["input_ids"].shape[1]:].tolist()
        model.train()
        tok.padding_side = side
        ids = [o[: o.index(tok.eos_token_id) + 1] if tok.eos_token_id in o else o for o in out]
        texts = [tok.decode(i, skip_special_tokens=True) for i in ids]
        assert [g.samples[0].text for g in result.groups] == texts
        parts = [{name: fn(r["prompt"], t, **{"answer": r["answer"]}) for name, fn, _ in rewards}
                 for r, t in zip(rows, texts)]
        totals = [sum(w * p[name] for name, _, w in rewards) for p in parts]
        judged = [p[label] for p in parts] if label else totals
        assert numbers["accuracy"] == sum(j >= threshold for j in judged) / len(rows)
        assert numbers["reward"] == pytest.approx(sum(totals) / len(rows), abs=1e-12)
        assert numbers["response_length"] == sum(map(len, ids)) / len(rows)
    # The caller's training state is untouched: RNG stream, padding side, train mode.
    assert torch.equal(rng, torch.random.get_rng_state()) and tok.padding_side == "right" and model.training


def test_eval_generates_with_the_configs_rollout_engine_options(tmp_path, tiny_model):
    """`raylhf eval`'s in-process rollout worker takes `rollout.dtype` and `rollout.autocast` as the training pool
    does (`orchestrator.pool_specs.engine_options`): here weights held in bf16."""
    import torch

    from orchestrator.config import load_config
    from orchestrator.evaluation import Scorer

    cfg = load_config(_job(tmp_path, tiny_model), ["rollout.dtype=bfloat16"])
    engine = Scorer(cfg, tiny_model).rollout.engine
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
    assert not engine.bf16  # rollout.autocast off
