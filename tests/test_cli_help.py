"""`raylhf --help` and every subcommand's `--help`: each option explained, with an example that parses."""

from __future__ import annotations

import argparse
import shlex

import pytest

from orchestrator.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) for the top level and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    return [line.strip() for line in (parser.epilog or "").splitlines() if line.strip().startswith("raylhf ")]


def test_every_subcommand_is_covered():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"", "train", "config", "config show", "eval", "export"} <= names


@pytest.mark.parametrize("path, parser", COMMANDS, ids=[" ".join(p) or "raylhf" for p, _ in COMMANDS])
def test_help_explains_each_option_with_an_example(path, parser, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    examples = _examples(parser)
    for example in examples:  # every example is a command line the parser accepts
        assert example in text
        build_parser().parse_args(shlex.split(example)[1:])
    own = [e for e in examples if e.startswith(f"raylhf {' '.join(path)}".strip())]
    assert own, f"no example of raylhf {' '.join(path)} in its --help"
    shown = " ".join(own)
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        name = action.option_strings[-1] if action.option_strings else action.dest
        assert action.help, f"{' '.join(path)} {name}: no help text"
        if action.option_strings:
            assert "e.g." in action.help or name in shown, f"{' '.join(path)} {name}: no example"
        else:
            assert "e.g." in action.help, f"{' '.join(path)} {name}: no example of the argument"
