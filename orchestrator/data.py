"""Datasets → prompt groups: rows from a file (JSONL, Parquet), `datasets.load_dataset` or a
"module:function", chat rows rendered with the tokenizer's template, served in seeded epochs.

A row is a dict: the prompt under `data.prompt_key` (a string), or a conversation under `messages`
(a list of `{"role", "content"}`, rendered with `tokenizer.apply_chat_template(...,
add_generation_prompt=True)` into the prompt); its other fields go to the reward functions.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from dataclasses import dataclass, field
from typing import Any

from actors.modeling import encode_prompts, load_tokenizer
from actors.records import PromptRequest
from orchestrator.config import DataSource, JobConfig
from rewards.loader import load_function

DATASETS_PREFIX = "datasets:"  # source "datasets:json" → datasets.load_dataset("json", **kwargs)
MESSAGES_KEY = "messages"  # the row field holding a chat conversation


class DataError(Exception):
    """A dataset that cannot be used; the message names the source and the row ("line N" of a JSONL file,
    else "row N", both counted from 1), `reason` the kind of fault."""

    def __init__(self, message: str, reason: str = "bad row"):
        super().__init__(message)
        self.reason = reason


def load_rows(src: DataSource) -> list[dict[str, Any]]:
    """All rows of a source, as dicts: a `.jsonl` or `.parquet` file, `datasets:<builder or path>`, or a
    "module:function" called with `src.kwargs`."""
    return load_rows_at(src)[0]


def load_rows_at(src: DataSource) -> tuple[list[dict[str, Any]], list[str]]:
    """(`load_rows`, where each row is for messages): "line N" of a JSONL file (blank lines counted), else
    "row N"; both from 1."""
    if src.source.endswith(".jsonl"):
        rows, lines = read_jsonl(src.source)
        return rows, [f"line {n}" for n in lines]
    if src.source.endswith(".parquet"):
        rows = _read_parquet(src.source)
    elif src.source.startswith(DATASETS_PREFIX):
        rows = _load_dataset(src.source[len(DATASETS_PREFIX):], src.kwargs)
    else:
        rows = list(load_function(src.source)(**src.kwargs))
    return rows, row_places(len(rows))


def row_places(n: int) -> list[str]:
    """"row 1" ... "row n": how messages name the rows of a source that has no lines."""
    return [f"row {k}" for k in range(1, n + 1)]


def read_jsonl(path: str) -> tuple[list[Any], list[int]]:
    """(parsed non-blank lines, their 1-based line numbers) of a JSONL file; a line that is not JSON is a
    DataError naming its number."""
    rows, lines = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {i}: not valid JSON ({e})") from None
                lines.append(i)
    return rows, lines


def _read_parquet(path: str) -> list[dict[str, Any]]:
    """Rows of a Parquet file, read with pyarrow (or pandas with a Parquet engine)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        pq = None
    try:
        if pq is not None:
            return pq.read_table(path).to_pylist()
        import pandas

        return [_plain(r) for r in pandas.read_parquet(path).to_dict("records")]
    except ImportError:
        raise DataError(f"{path}: reading a .parquet file needs pyarrow: pip install pyarrow") from None
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError, its IO errors OSErrors
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (as pandas returns them) → lists and Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return _plain(value.tolist())
    return value


def _load_dataset(path: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """`datasets.load_dataset(path, split="train", **kwargs)` as a list of row dicts."""
    where = f"{DATASETS_PREFIX}{path}"
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: this source needs the datasets package: pip install datasets") from None
    kwargs = {"split": "train", **kwargs}
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except Exception as e:  # noqa: BLE001 - missing files, unknown builders, bad kwargs: all a data error here
        raise DataError(f"{where}: datasets.load_dataset failed: {type(e).__name__}: {e}") from None
    if isinstance(ds, dict):  # a DatasetDict: split=None was passed
        raise DataError(f"{where}: got splits {sorted(ds)}; name one with kwargs: {{split: train}}")
    return [dict(row) for row in ds]


def _chat_messages(row: dict, prompt_key: str, where: str, place: str) -> list | None:
    """The conversation of a chat row (`messages`, or a list under the prompt key), None for a plain row."""
    if isinstance(row.get(prompt_key), list):
        messages = row[prompt_key]
    elif MESSAGES_KEY in row:
        if prompt_key in row:
            raise DataError(f"{where}: {place} has both {prompt_key!r} and {MESSAGES_KEY!r}; give one "
                            "(a prompt string, or a conversation to render with the chat template)")
        messages = row[MESSAGES_KEY]
    else:
        return None
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages)
    if not ok:
        raise DataError(f"{where}: {place}: messages must be a non-empty list of {{role: str, content: str}}, "
                        f"got {str(messages)[:200]}")
    return messages


def render_chat(messages: list[dict], tokenizer, where: str, place: str) -> str:
    """The prompt text of a conversation: the tokenizer's chat template with the assistant turn opened.

    The engines tokenize prompts with special tokens, so a BOS the template writes itself is dropped
    when the tokenizer adds one anyway (no double BOS)."""
    if tokenizer is None:
        raise DataError(f"{where}: {place} is a chat row and needs the model's tokenizer to be rendered")
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{where}: {place} is a chat row ({MESSAGES_KEY}) but the model's tokenizer has no chat template; give "
            "plain prompt rows, or a checkpoint whose tokenizer_config.json (or chat_template.jinja) sets one")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as e:  # noqa: BLE001 - a template may reject roles or orders with any exception
        raise DataError(f"{where}: {place}: the chat template failed: {type(e).__name__}: {e}") from None
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and tokenizer.bos_token_id in ids


def prepare_rows(rows: list[dict], prompt_key: str, where: str, tokenizer=None,
                 max_prompt_tokens: int = 0, skipped: dict[str, int] | None = None,
                 places: list[str] | None = None) -> list[dict]:
    """Rows ready to serve (new dicts): chat rows rendered into `prompt_key`, every prompt a non-empty string
    of at most `max_prompt_tokens` tokens. A bad row raises a `DataError` naming it by its place (`load_rows_at`;
    default "row N", from 1), or, when a `skipped` dict is given (config `data.bad_rows: skip`), is left out and
    counted there under its reason."""
    return _prepare(rows, prompt_key, where, tokenizer, max_prompt_tokens, skipped, places)[0]


def prepare_prompts(rows: list[dict], prompt_key: str, where: str, tokenizer, max_prompt_tokens: int = 0,
                    skipped: dict[str, int] | None = None, uid_prefix: str = "",
                    places: list[str] | None = None) -> list[PromptRequest]:
    """`prepare_rows`, as requests: each prompt tokenized here, once (`actors.modeling.encode_prompts`), its ids
    carried to the engine; uids `<uid_prefix><index>`."""
    out, ids = _prepare(rows, prompt_key, where, tokenizer, max_prompt_tokens, skipped, places)
    return [PromptRequest(f"{uid_prefix}{i}", row[prompt_key], x, {k: v for k, v in row.items() if k != prompt_key})
            for i, (row, x) in enumerate(zip(out, ids))]


def _prepare(rows: list[dict], prompt_key: str, where: str, tokenizer, max_prompt_tokens: int,
             skipped: dict[str, int] | None, places: list[str] | None) -> tuple[list[dict], list[list[int]]]:
    """(prepared rows, their prompts' token ids: empty without a tokenizer); see `prepare_rows`."""
    if not rows:
        raise DataError(f"{where}: no rows")
    places = places or row_places(len(rows))
    out, out_places = [], []
    for row, place in zip(rows, places, strict=True):
        try:
            out.append(_prepare_row(row, prompt_key, where, place, tokenizer))
            out_places.append(place)
        except DataError as e:
            if skipped is None:
                raise
            skipped[e.reason] = skipped.get(e.reason, 0) + 1
    ids = encode_prompts(tokenizer, [r[prompt_key] for r in out]) if tokenizer is not None else []
    if ids and max_prompt_tokens:
        kept = []
        for row, x, place in zip(out, ids, out_places):
            if len(x) <= max_prompt_tokens:
                kept.append((row, x))
            elif skipped is None:
                raise DataError(f"{where}: {place} has a {len(x)}-token prompt, above data.max_prompt_tokens="
                                f"{max_prompt_tokens}")
            else:
                skipped["too long"] = skipped.get("too long", 0) + 1
        out, ids = [row for row, _ in kept], [x for _, x in kept]
    if not out:
        raise DataError(f"{where}: every one of its {len(rows)} rows is bad ({skipped})")
    return out, ids


def _prepare_row(row, prompt_key: str, where: str, place: str, tokenizer) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: {place} is a {type(row).__name__}, not a dict: {str(row)[:200]}", "not a dict")
    try:
        messages = _chat_messages(row, prompt_key, where, place)
        if messages is not None:
            row = {**row, prompt_key: render_chat(messages, tokenizer, where, place)}
    except DataError as e:
        raise DataError(str(e), "bad chat messages") from None
    if not isinstance(row.get(prompt_key), str) or not row[prompt_key]:
        raise DataError(f"{where}: {place} has no non-empty string field {prompt_key!r} (nor a "
                        f"{MESSAGES_KEY!r} conversation): {str(row)[:200]}", "no prompt")
    return row


def check_rows(rows: list[dict], prompt_key: str, where: str, tokenizer=None, max_prompt_tokens: int = 0) -> None:
    """`prepare_rows`, in place: `rows` afterwards holds the prepared rows (chat rows rendered)."""
    rows[:] = prepare_rows(rows, prompt_key, where, tokenizer, max_prompt_tokens)


class PromptStream:
    """Endless seeded epochs over the training prompts (`prepare_prompts`); each request's uid is `epoch:index`."""

    def __init__(self, prompts: list[PromptRequest], seed: int, shuffle: bool = True):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.pos = 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def state(self) -> dict:
        """Where the stream is: enough to continue it exactly (the order is rebuilt from seed and epoch)."""
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self.order = self._order()

    def requests(self, uids: list[str]) -> list[PromptRequest]:
        """The requests of `uids` ("epoch:index", as `next` names them): prompts drawn before, drawn again (a
        checkpoint's prompts in flight, `orchestrator.pipeline`)."""
        return [dataclasses.replace(self.prompts[int(uid.partition(":")[2])], uid=uid) for uid in uids]

    def next(self, n: int) -> list[PromptRequest]:
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            idx = self.order[self.pos]
            out.append(dataclasses.replace(self.prompts[idx], uid=f"{self.epoch}:{idx}"))
            self.pos += 1
        return out


@dataclass
class Data:
    """A job's checked training stream and held-out prompts, loaded before any actor starts."""

    pad_id: int
    stream: PromptStream
    eval_prompts: list[PromptRequest]
    skipped: dict[str, float] = field(default_factory=dict)  # data/skipped_<split>_rows


def load_data(cfg: JobConfig, model_path: str) -> Data:
    """Load, check and tokenize every row now: a bad dataset fails before Ray starts (DataError); with
    `data.bad_rows: skip` bad rows are left out and counted instead (`Data.skipped`)."""
    tokenizer = load_tokenizer(model_path, cfg.model.trust_remote_code)
    d = cfg.data
    skipped: dict[str, dict[str, int]] = {"train": {}, "eval": {}}
    rows, places = load_rows_at(d.train)
    prompts = prepare_prompts(rows, d.prompt_key, "data.train", tokenizer, d.max_prompt_tokens,
                              skipped["train"] if d.bad_rows == "skip" else None, places=places)
    eval_rows, eval_places = load_rows_at(d.eval) if d.eval else ([], [])
    size = cfg.loop.eval_size
    eval_prompts = prepare_prompts(eval_rows[:size], d.prompt_key, "data.eval", tokenizer, d.max_prompt_tokens,
                                   skipped["eval"] if d.bad_rows == "skip" else None, "eval:",
                                   eval_places[:size]) if eval_rows else []
    for split, counts in skipped.items():
        if counts:
            detail = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            print(f"raylhf: data.{split}: skipped {sum(counts.values())} bad rows ({detail})", file=sys.stderr)
    return Data(tokenizer.pad_token_id, PromptStream(prompts, cfg.loop.seed, d.shuffle), eval_prompts,
                {f"data/skipped_{split}_rows": float(sum(c.values())) for split, c in skipped.items()})
