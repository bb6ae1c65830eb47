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
    from actors.records import Group, RewardSpec, Sample

    code = next(b for b in blocks("python") if b.startswith("# my_forms.py"))
    (tmp_path / "my_forms.py").write_text(code)
    specs = [RewardSpec("correct", f"{tmp_path / 'my_forms.py'}:correct_batch"),
             RewardSpec("judge", f"{tmp_path / 'my_forms.py'}:judge")]
    samples = [Sample([1], text, [0.0], "stop") for text in ("#### 3", "#### 4", "3")]
    worker = RewardWorker(specs, num_processes=1)
    try:
        (g,) = worker.reward([Group("u", "1+2=", {"answer": "3"}, [1], samples, 0)])
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


REPO = Path(__file__).resolve().parent.parent
# the package folders: pyproject's [tool.setuptools.packages.find] include list, e.g. "actors*"
PACKAGES = re.findall(r'"(\w+)\*"', re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*?)\]",
                                               (REPO / "pyproject.toml").read_text()).group(1))


def layout_lines() -> list[tuple[str, str]]:
    """(path, what it is for) for each line of the fenced block under ## Layout."""
    section = README.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```\n(.*?)```", section, flags=re.S).group(1)
    return [(line.split(maxsplit=1) + [""])[:2] for line in block.splitlines() if line.strip()]


def test_layout_names_every_module_of_the_package_folders():
    assert {"actors", "algorithms", "orchestrator", "rewards", "examples"} <= set(PACKAGES)
    named = {path for path, _ in layout_lines()}
    modules = sorted(str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")
                     if p.name != "__init__.py" and "__pycache__" not in p.parts)
    missing = [m for m in modules if m not in named]
    assert not missing, ("the README's Layout section does not name these modules; add a line `path   what it is "
                         "for` for each to the block under ## Layout:\n  " + "\n  ".join(missing))


def test_every_path_in_the_layout_exists_and_says_what_it_is_for():
    stale, silent = [], []
    for path, what in layout_lines():
        if not (REPO / path).exists() or path.endswith("/") != (REPO / path).is_dir():
            stale.append(path)
        if not what:
            silent.append(path)
        if path.endswith("/"):  # a folder line may name files in it: they must exist too
            stale += [path + name for name in re.findall(r"(?<![\w/.-])([\w-]+\.(?:py|yaml|sh|md))\b", what)
                      if not (REPO / path / name).exists()]
    assert not stale, ("the README's Layout section names paths that do not exist (moved or deleted? update or "
                       "remove their lines):\n  " + "\n  ".join(stale))
    assert not silent, f"Layout lines without a description: {silent}"
