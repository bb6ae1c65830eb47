"""The README cannot drift: its snippets run, its error example is real, its Layout section names every module
(its config keys and config table: tests/test_docs_config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from orchestrator.cli import main
from orchestrator.config import RewardConfig
from rewards.loader import load_function

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_reward_function_snippet_runs(tmp_path):
    code = next(b for b in blocks("python") if b.startswith("# my_rewards.py"))
    (tmp_path / "my_rewards.py").write_text(code)
    fn = load_function(f"{tmp_path / 'my_rewards.py'}:brevity")
    assert fn("1+2=", "#### 3", answer="3") > fn("1+2=", "#### 4", answer="3")


def test_reward_config_snippet_validates(tmp_path, monkeypatch):
    snippet = next(b for b in blocks("yaml") if "my_rewards.py:brevity" in b)
    cfg = RewardConfig.model_validate(yaml.safe_load(snippet)["reward"])
    assert [f.weight for f in cfg.functions] == [1.0, 0.5]


def test_error_example_is_what_the_cli_prints(tiny_model, tmp_path, capsys):
    example = README.split("$ raylhf train examples/arith_grpo.yaml --set rollout.group_size=1\n", 1)[1]
    expected = example.split("```", 1)[0].strip()
    main(["train", "examples/arith_grpo.yaml", "--set", "rollout.group_size=1", "--set", f"model.path={tiny_model}"])
    assert capsys.readouterr().err.strip() == expected


def test_reward_forms_snippet_runs(tmp_path):
    """The batched and async examples, run by a RewardWorker as in a job."""
    from actors.reward import RewardWorker
    from actors.types import Group, RewardSpec, Sample

    code = next(b for b in blocks("python") if b.startswith("# my_forms.py"))
    (tmp_path / "my_forms.py").write_text(code)
    specs = [RewardSpec("correct", f"{tmp_path / 'my_forms.py'}:correct_batch"),
             RewardSpec("judge", f"{tmp_path / 'my_forms.py'}:judge")]
    samples = [Sample([1], text, [0.0], "stop") for text in ("#### 3", "#### 4", "3")]
    worker = RewardWorker(specs, num_processes=1)
    try:
        (g,) = worker.score([Group("u", "1+2=", {"answer": "3"}, [1], samples, 0)])
    finally:
        worker.close()
    assert [s.reward_parts for s in g.samples] == [{"correct": 1.0, "judge": 1.0}, {"correct": 0.0, "judge": 1.0},
                                                   {"correct": 0.0, "judge": 0.0}]
    assert g.samples[0].reward_extras == {"judge/chars": 6.0} and not g.reward_failures


def test_reward_model_snippet_validates():
    snippet = next(b for b in blocks("yaml") if "model:" in b)
    cfg = RewardConfig.model_validate(yaml.safe_load(snippet)["reward"])
    assert [(f.label, f.weight, f.batch_size) for f in cfg.functions] == [
        ("math_equiv", 1.0, None), ("my-reward-model", 0.1, 16)]
