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
    assert "data.eval: row 0 is a chat row" in capsys.readouterr().err
