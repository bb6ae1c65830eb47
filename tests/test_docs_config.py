"""The config keys the docs name are the keys `raylhf config show` prints, and the README's config table names
each key once.

What counts as a config key in README.md, docs/*.md, benchmarks/README.md and deploy/README.md:

* a backticked dotted name whose first segment is a top-level section of the job config (`model`, `data`,
  `rollout`, `reward`, ...), optionally followed by `: value` (`checkpoint.every: N`);
* the key of every `--set KEY=VALUE`, backticked or in a code block;
* `<pool>.field`: the field in each pool the same table row (or, in prose, the same paragraph) names in
  backticks (`rollout`, `reward`, `scoring`, `trainer`, `critic`), or in all five when it names none;
* `section.*`: any field of that section; `reward.functions[].field`: a field of each reward entry.

A dotted name ending in a file extension (`data.py`) is a file, not a key. Below a dict-valued field
(`rollout.resources`, `data.train.kwargs`) any sub-key is allowed: the dict is the user's. A paragraph about
`raylhf train-rm` / `train-dpo` (it names the command or its example config) may also use the keys of those
commands' own configs (orchestrator/offline/config.py).

The printed keys come from `dump_config` of the example job (what `raylhf config show` prints); a test checks
that the example prints every field of the schema, so no key is missed because the example leaves it unset.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from orchestrator.config import JobConfig, dump_config, load_config
from orchestrator.offline.config import DPOConfig, RewardModelConfig

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md",
         REPO / "deploy" / "README.md"]
SECTIONS = set(JobConfig.model_fields)
POOLS = ("rollout", "reward", "scoring", "trainer", "critic")  # the pools with a config section
FILE_SUFFIXES = {"py", "yaml", "yml", "json", "jsonl", "md", "txt", "parquet", "png", "sh", "csv"}
OFFLINE_CONTEXT = re.compile(r"train-rm|train-dpo|arith_rm|arith_dpo")
# a section (or <pool>), then .field, .field[] or .* segments, then optionally `: value`
KEY = re.compile(r"(<pool>|[a-z_]+)((?:\.(?:\*|[a-z_0-9]+(?:\[\])?))+)(?::\s.*)?")


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `X | None` or `list[X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if (model := _model_in(arg)) is not None:
                return model
    return None


def _walk(cls: type[BaseModel], data: dict | None, prefix: str, keys: set[str], open_keys: set[str]) -> None:
    """Dotted keys of `data` (a dumped section of `cls`), or of every field of `cls` when `data` is None;
    list entries as `key[].field`; dict-valued fields (the user's own mapping) go to `open_keys`."""
    for name, field in cls.model_fields.items():
        if data is not None and name not in data:
            continue
        key, value = prefix + name, (data or {}).get(name)
        keys.add(key)
        sub = _model_in(field.annotation)
        if sub is None:
            if typing.get_origin(field.annotation) is dict or field.annotation is dict:
                open_keys.add(key)
        elif typing.get_origin(field.annotation) is list:
            for item in (value if data is not None else [None]):
                _walk(sub, item, key + "[].", keys, open_keys)
        elif data is None or isinstance(value, dict) or value is None:  # a null section: its fields are comments
            _walk(sub, value, key + ".", keys, open_keys)


def printed_keys() -> tuple[set[str], set[str]]:
    """The keys `raylhf config show examples/arith_grpo.yaml` prints, and the dict-valued ones among them."""
    dumped = yaml.safe_load(dump_config(load_config(REPO / "examples" / "arith_grpo.yaml", check_paths=False)))
    keys: set[str] = set()
    open_keys: set[str] = set()
    _walk(JobConfig, dumped, "", keys, open_keys)
    return keys, open_keys


def schema_keys(cls: type[BaseModel]) -> tuple[set[str], set[str]]:
    keys: set[str] = set()
    open_keys: set[str] = set()
    _walk(cls, None, "", keys, open_keys)
    return keys, open_keys


def _context(text: str, start: int) -> str:
    """The table row (a line starting with |) or the paragraph around position `start`."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    line = text[line_start:line_end if line_end >= 0 else None]
    if line.lstrip().startswith("|"):
        return line
    para_start = text.rfind("\n\n", 0, start) + 2 if text.rfind("\n\n", 0, start) >= 0 else 0
    para_end = text.find("\n\n", start)
    return text[para_start:para_end if para_end >= 0 else None]


def doc_keys(text: str) -> list[tuple[str, str]]:
    """(key, context) for every config key the text names; `<pool>.x` comes back expanded."""
    spans = [(m.group(1), m.start()) for m in re.finditer(r"--set\s+([^=\s]+)=", text)]
    spans += [(m.group(1), m.start()) for m in re.finditer(r"`([^`\n]+)`", text) if "--set" not in m.group(1)]
    found: list[tuple[str, int]] = []
    for span, at in spans:
        head = KEY.fullmatch(span)
        if head is None or head.group(1) not in (*SECTIONS, "<pool>"):
            continue  # e.g. `--set KEY=VALUE`, `rewards.final_answer:hash_answer`, `reward/<label>`
        key = head.group(1) + head.group(2)
        if key.rsplit(".", 1)[1] not in FILE_SUFFIXES:
            found.append((key, at))
    found.sort(key=lambda item: item[1])
    out = []
    for key, at in found:
        context = _context(text, at)
        if key.startswith("<pool>."):
            named = [p for p in POOLS if f"`{p}`" in context]
            out += [(p + key[len("<pool>"):], context) for p in named or POOLS]
        else:
            out.append((key, context))
    return out


def known(key: str, keys: set[str], open_keys: set[str]) -> bool:
    if key.endswith(".*"):
        return any(k.startswith(key[:-1]) for k in keys)
    return key in keys or any(key.startswith(k + ".") for k in open_keys)


def test_the_example_prints_every_field_of_the_schema():
    """Otherwise a key the example leaves unset (an optional section) would look unknown to the docs test."""
    printed, printed_open = printed_keys()
    schema, schema_open = schema_keys(JobConfig)
    assert printed == schema, (f"printed but not in the schema: {sorted(printed - schema)}; "
                               f"in the schema but not printed: {sorted(schema - printed)}")
    assert printed_open == schema_open == ({f"{p}.resources" for p in POOLS} | {"data.train.kwargs", "data.eval.kwargs"}
                                           | {"env.resources", "env.kwargs"})


def test_every_config_key_in_the_docs_is_printed_by_config_show():
    keys, open_keys = printed_keys()
    offline = [schema_keys(RewardModelConfig), schema_keys(DPOConfig)]
    unknown = []
    for page in PAGES:
        text = page.read_text()
        for key, context in doc_keys(text):
            if known(key, keys, open_keys):
                continue
            if OFFLINE_CONTEXT.search(context) and any(known(key, k, o) for k, o in offline):
                continue
            unknown.append(f"{page.relative_to(REPO)}: `{key}` in: {context.strip()[:160]!r}")
    assert not unknown, "config keys `raylhf config show` does not print:\n" + "\n".join(unknown)


def test_the_docs_name_enough_keys_for_the_test_to_mean_something():
    keys = {k for page in PAGES for k, _ in doc_keys(page.read_text())}
    assert len(keys) > 80, sorted(keys)
    assert {"reward.num_cpus", "critic.resources", "trainer.lr", "loop.eval_size"} <= keys


def test_the_readme_config_table_names_each_key_once():
    table = (REPO / "README.md").read_text().split("## Config reference", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert len(rows) > 20
    seen: dict[str, str] = {}
    twice = []
    for row in rows:
        first_cell = "| " + row.split("|")[1] + " |"
        for key, _ in doc_keys(first_cell):
            if key in seen:
                twice.append(f"`{key}` in\n  {seen[key]}\n  {row}")
            seen.setdefault(key, row)
    assert not twice, "keys listed twice in the README's config table:\n" + "\n".join(twice)


def test_the_key_finder():
    text = ("| `<pool>.num_gpus` | per worker of `rollout`, `trainer` |\n\nSet `checkpoint.every: N`, "
            "`critic.*`, `data.py`, `rewards.final_answer:hash_answer`, `reward/<label>/failures`,\n"
            "`reward.functions[].num_gpus` and `--set trainer.lr=1e-4 --set rollout.stop=x`.\n\n"
            "raylhf eval C --set loop.eval_size=100\n\n`<pool>.num_cpus`")
    assert [k for k, _ in doc_keys(text)] == [
        "rollout.num_gpus", "trainer.num_gpus", "checkpoint.every", "critic.*", "reward.functions[].num_gpus",
        "trainer.lr", "rollout.stop", "loop.eval_size", *(f"{p}.num_cpus" for p in POOLS)]
    keys, open_keys = printed_keys()
    assert known("rollout.resources.rollout_node", keys, open_keys) and known("critic.*", keys, open_keys)
    assert not known("reward.num_gpus", keys, open_keys) and known("reward.functions[].num_gpus", keys, open_keys)
