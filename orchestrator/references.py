"""Resolve and check what a config names: "module:function" callables, data files, model directories, and the
reward entries as the actors take them.

The job config and the offline configs check their references with these same rules; a name that does not
resolve is an `UnresolvedReference`, which the config layer turns into a ConfigError naming the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rewards.loader import RewardLoadError, load_function

from actors.records import RewardSpec

if TYPE_CHECKING:
    from orchestrator.config import JobConfig, ModelConfig


class UnresolvedReference(Exception):
    """A name in a config that does not resolve; the message says why, the caller adds the field."""


def resolve_callable(spec: str) -> Callable:
    """The function a "module:function" or "path/file.py:function" names."""
    try:
        return load_function(spec)
    except RewardLoadError as e:
        raise UnresolvedReference(str(e)) from None


def check_source(source: str, files: tuple[str, ...]) -> None:
    """A data source is a file ending in one of `files` that exists, or a "module:function" that resolves."""
    if ":" in source and not source.endswith(files):
        resolve_callable(source)
    elif not Path(source).is_file():
        raise UnresolvedReference(f"file {source!r} not found")


def check_model_dir(path: str) -> None:
    """A Hugging Face checkpoint directory (it has a config.json)."""
    if not (Path(path) / "config.json").is_file():
        raise UnresolvedReference(f"{path!r} is not a model directory (no config.json); give a Hugging Face "
                                  "checkpoint directory or a model.prepare function that builds one")


def prepare_model(model: ModelConfig) -> str:
    """The absolute model directory, built first by `model.prepare` when the config names one."""
    path = str(Path(model.path).expanduser().resolve())
    if model.prepare:
        resolve_callable(model.prepare)(path)
    return path


def check_same_tokenizer(model_path: str, teacher: str, trust_remote_code: bool = False) -> None:
    """A distillation teacher shares the policy's vocabulary: it scores the policy's token ids."""
    from actors.modeling import check_same_vocabulary, load_tokenizer

    try:
        check_same_vocabulary(load_tokenizer(model_path, trust_remote_code),
                              load_tokenizer(teacher, trust_remote_code), teacher)
    except ValueError as e:
        raise UnresolvedReference(str(e)) from None


def absolute_file_spec(spec: str) -> str:
    """'rel/file.py:fn' → '/abs/rel/file.py:fn' so actors find it whatever their working directory."""
    target, _, attr = spec.partition(":")
    if (target.endswith(".py") or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{attr}"
    return spec


def reward_specs(cfg: JobConfig) -> list[RewardSpec]:
    """The config's rewards as the actors take them: file and model paths absolute, labels resolved."""
    return [RewardSpec(label=f.label, name=f.name and absolute_file_spec(f.name), weight=f.weight,
                       model=f.model and str(Path(f.model).expanduser().resolve()), batched=f.batched,
                       batch_size=f.batch_size, num_gpus=f.num_gpus)
            for f in cfg.reward.functions]
