"""Datasets → prompt groups: rows from a JSONL file or a "module:function", served in seeded epochs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from actors.types import GroupRequest
from orchestrator.config import DataSource
from rewards.loader import load_function


class DataError(Exception):
    """A dataset that cannot be used; the message names the source and the row."""


def load_rows(src: DataSource) -> list[dict[str, Any]]:
    """All rows of a source, as dicts."""
    if src.source.endswith(".jsonl"):
        rows = []
        with open(src.source, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{src.source}:{i}: not valid JSON ({e})") from None
        return rows
    rows = load_function(src.source)(**src.kwargs)
    return list(rows)


def check_rows(rows: list[dict], prompt_key: str, where: str, tokenizer=None, max_prompt_tokens: int = 0) -> None:
    """Every row must be a dict with a non-empty string prompt of at most `max_prompt_tokens` tokens."""
    if not rows:
        raise DataError(f"{where}: no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(prompt_key), str) or not row[prompt_key]:
            raise DataError(f"{where}: row {i} has no non-empty string field {prompt_key!r}: {str(row)[:200]}")
    if tokenizer is not None and max_prompt_tokens:
        lengths = [len(ids) for ids in tokenizer([r[prompt_key] for r in rows])["input_ids"]]
        for i, n in enumerate(lengths):
            if n > max_prompt_tokens:
                raise DataError(f"{where}: row {i} has a {n}-token prompt, above data.max_prompt_tokens="
                                f"{max_prompt_tokens}")


def to_request(uid: str, row: dict, prompt_key: str) -> GroupRequest:
    fields = {k: v for k, v in row.items() if k != prompt_key}
    return GroupRequest(uid=uid, prompt=row[prompt_key], row=fields)


class PromptStream:
    """Endless seeded epochs over the training rows; each request's uid is `epoch:index`."""

    def __init__(self, rows: list[dict], prompt_key: str, seed: int, shuffle: bool = True):
        self.rows, self.prompt_key, self.seed, self.shuffle = rows, prompt_key, seed, shuffle
        self.epoch, self.pos = 0, 0
        self.order = self._order()

    def _order(self) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        return order

    def next(self, n: int) -> list[GroupRequest]:
        out = []
        while len(out) < n:
            if self.pos == len(self.order):
                self.epoch, self.pos = self.epoch + 1, 0
                self.order = self._order()
            idx = self.order[self.pos]
            out.append(to_request(f"{self.epoch}:{idx}", self.rows[idx], self.prompt_key))
            self.pos += 1
        return out
