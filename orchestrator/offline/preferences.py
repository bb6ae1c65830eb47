"""Preference data for offline training: load, validate, and turn into padded token tensors.

Two row forms, one per line of a JSONL file (or returned by a "module:function" source):

* pairs  — `{"prompt": str, "chosen": str, "rejected": str}`: one comparison y_w ≻ y_l of x, the data of
  the Bradley-Terry reward-model loss (survey 3.2.1, eq. 3.1) and of DPO (3.4, eq. 3.8);
* ranked — `{"prompt": str, "responses": [best, ..., worst]}`: K ≥ 2 responses ranked best first, the
  data of InstructGPT's K-wise reward-model loss (survey 3.3.1); its K(K−1)/2 comparisons come from one
  prompt and stay in one batch, as InstructGPT does.

A bad row is a `PreferenceError` naming the file and line (or the function and row index), raised while
loading, before any model is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from orchestrator.data import DataError, read_jsonl, row_places
from rewards.loader import RewardLoadError, load_function

Form = Literal["pairs", "ranked"]
FORM_KEYS: dict[str, tuple[str, ...]] = {"pairs": ("prompt", "chosen", "rejected"), "ranked": ("prompt", "responses")}


class PreferenceError(Exception):
    """Preference data that cannot be used; the message names the file and line (or the source and row)."""


def load_preferences(source: str, kwargs: dict[str, Any] | None = None, form: Form = "pairs") -> list[dict]:
    """Validated rows of `form` from a `.jsonl` file or a "module:function" returning a list of dicts."""
    if form not in FORM_KEYS:
        raise ValueError(f"form must be one of {tuple(FORM_KEYS)}, got {form!r}")
    if source.endswith(".jsonl"):
        rows, lines = _read_jsonl(source)
        places = [f"{source}: line {n}" for n in lines]
    else:
        rows = _call_source(source, kwargs or {})
        places = [f"{source}: {place}" for place in row_places(len(rows))]
    if not rows:
        raise PreferenceError(f"{source}: no preference rows")
    for row, place in zip(rows, places):
        problem = row_problem(row, form)
        if problem:
            raise PreferenceError(f"{place}: {problem}")
    return rows


def _call_source(source: str, kwargs: dict[str, Any]) -> list:
    """The rows a "module:function" source returns."""
    try:
        fn = load_function(source)
    except RewardLoadError as e:
        raise PreferenceError(f"{source}: {e}") from None
    rows = fn(**kwargs)
    if not isinstance(rows, (list, tuple)):
        raise PreferenceError(f"{source}: returned a {type(rows).__name__}, expected a list of row dicts")
    return list(rows)


def _read_jsonl(path: str) -> tuple[list, list[int]]:
    """(rows, 1-based line numbers) by `orchestrator.data.read_jsonl`, its errors as PreferenceError."""
    if not Path(path).is_file():
        raise PreferenceError(f"{path}: file not found")
    try:
        return read_jsonl(path)
    except DataError as e:
        raise PreferenceError(str(e)) from None


def row_problem(row: Any, form: Form) -> str | None:
    """Why `row` is not a valid row of `form`, or None when it is."""
    keys = FORM_KEYS[form]
    if not isinstance(row, dict):
        return f"expected a JSON object with keys {list(keys)}, got {type(row).__name__}"
    missing = [k for k in keys if k not in row]
    if missing:
        return f"missing key {missing[0]!r} ({form} rows have keys {list(keys)})"
    if not isinstance(row["prompt"], str) or not row["prompt"]:
        return f"'prompt' must be a non-empty string, got {row['prompt']!r}"
    if form == "pairs":
        for key in ("chosen", "rejected"):  # an empty response is a response: the policy stopped at once
            if not isinstance(row[key], str):
                return f"{key!r} must be a string, got {row[key]!r}"
        if row["chosen"] == row["rejected"]:
            return "'chosen' and 'rejected' are the same text: the pair says nothing"
        return None
    responses = row["responses"]
    if not isinstance(responses, list):
        return f"'responses' must be a list of strings ranked best first, got {type(responses).__name__}"
    if len(responses) < 2:
        return f"'responses' needs at least 2 responses to rank, got {len(responses)}"
    for j, text in enumerate(responses):
        if not isinstance(text, str):
            return f"'responses'[{j}] must be a string, got {text!r}"
    if len(set(responses)) < len(responses):
        return "'responses' repeats a text: a ranking needs distinct responses"
    return None


def response_texts(rows: list[dict], form: Form) -> list[tuple[str, str]]:
    """Every (prompt, response) of the rows, in row order: chosen then rejected, or the ranking."""
    if form == "pairs":
        return [(r["prompt"], t) for r in rows for t in (r["chosen"], r["rejected"])]
    return [(r["prompt"], t) for r in rows for t in r["responses"]]


# ----------------------------------------------------------------------------- tensors


@dataclass
class ResponseBatch:
    """prompt + response token ids, right-padded, with the attention mask and the response-token mask."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L] 1 on real tokens
    response_mask: torch.Tensor  # [N, L] 1 on the response's own tokens (and the appended EOS)


def encode_responses(tokenizer, pairs: list[tuple[str, str]], max_length: int, append_eos: bool) -> ResponseBatch:
    """Tokenize each (prompt, response): the prompt with the tokenizer's special tokens, the response without,
    then EOS when `append_eos` (the policy must also choose to stop). Too long is an error, not a silent cut:
    a truncated response would be scored as a different text."""
    seqs, starts = [], []
    for prompt, response in pairs:
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if append_eos:
            r = r + [tokenizer.eos_token_id]
        if len(p) + len(r) > max_length:
            raise PreferenceError(f"prompt + response is {len(p) + len(r)} tokens, above max_length={max_length}: "
                                  f"{(prompt + response)[:80]!r}")
        seqs.append(p + r)
        starts.append(len(p))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])  # [N, L]
    positions = torch.arange(width)  # [L]
    lengths = torch.tensor([len(s) for s in seqs])  # [N]
    starts_t = torch.tensor(starts)  # [N]
    attention = (positions[None, :] < lengths[:, None]).long()  # [N, L]
    response = attention * (positions[None, :] >= starts_t[:, None]).long()  # [N, L]
    return ResponseBatch(ids, attention, response)
