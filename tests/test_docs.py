"""docs/ cannot drift: every ```python snippet runs, every ```yaml snippet is a valid job config fragment,
every `raylhf ...` command line parses and every relative link resolves (config keys: tests/test_docs_config.py).

Python snippets of one page run in order in one namespace, in a scratch directory that holds a link to the
repository's examples/; a snippet whose first line is `# name.py` is written there as that file instead.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import build_parser
from orchestrator.config import JobConfig
from tests.conftest import base_config

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted((REPO / "docs").glob("*.md"))
EXPECTED = {"algorithms.md", "rewards.md", "cluster.md", "reliability.md", "evaluation.md", "data.md", "performance.md",
            "agents.md"}


def blocks(page: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)


def test_every_concept_has_a_page_with_snippets():
    assert EXPECTED <= {p.name for p in PAGES}
    for page in PAGES:
        assert blocks(page, "python") or blocks(page, "yaml"), f"{page.name} has no runnable snippet"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    snippets = blocks(page, "python")
    if not snippets:
        pytest.skip("no python snippets")
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    for code in snippets:
        first = code.splitlines()[0]
        if re.fullmatch(r"# [\w/]+\.py", first):
            (tmp_path / first[2:]).write_text(code)
            continue
        exec(compile(code, f"{page.name} snippet", "exec"), namespace)
    for name in [m for m in sys.modules if m.startswith(("my_", "flaky"))]:
        del sys.modules[name]  # a later page may write a file of the same name


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_yaml_snippets_are_valid_config_fragments(page):
    for snippet in blocks(page, "yaml"):
        fragment = yaml.safe_load(snippet)
        assert set(fragment) <= set(JobConfig.model_fields), f"{page.name}: unknown section in\n{snippet}"
        JobConfig.model_validate(base_config("/models/policy", **fragment))  # file paths are not checked here


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_parse(page):
    for snippet in blocks(page, "bash"):
        for line in snippet.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] == "raylhf":
                build_parser().parse_args(argv[1:])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#:]+)\)", text):
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_reliability_guarantee_names_tests_that_exist():
    """docs/reliability.md's table: each row's last cell names at least one test, and each named test is defined
    under tests/ (a renamed or deleted test cannot leave a guarantee unbacked)."""
    defined = {m for f in (REPO / "tests").glob("test_*.py")
               for m in re.findall(r"^(?:async )?def (test_\w+)", f.read_text(), flags=re.M)}
    rows = [line for line in (REPO / "docs" / "reliability.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith(("| concern", "|---"))]
    assert len(rows) >= 10
    for row in rows:
        named = re.findall(r"`(?:tests/\w+\.py::)?(test_\w+)`", row.rstrip(" |").rsplit("|", 1)[-1])
        assert named, f"no test named for: {row[:80]}"
        assert set(named) <= defined, f"{set(named) - defined} (named in docs/reliability.md) are not tests"
