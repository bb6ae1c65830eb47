"""GSM8K-style verifier: the completion's last `#### N` line must equal the reference answer."""

from __future__ import annotations

import re
from fractions import Fraction

# After the marker: spaces, markdown bold and a currency sign may precede the number; any text may follow it.
_ANSWER = re.compile(r"####[\s*$]*([-+]?[\d,]*\.?\d+)")


def extract_final_answer(completion: str) -> str | None:
    """The number after the last `####` marker, commas removed; None when there is none."""
    matches = _ANSWER.findall(completion)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def _as_number(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def hash_answer(prompt: str, completion: str, answer: str | int | float = "", **_: object) -> float:
    """1.0 when the last `#### N` in `completion` equals `answer` numerically, else 0.0."""
    got = extract_final_answer(completion)
    if got is None:
        return 0.0
    want, have = _as_number(str(answer)), _as_number(got)
    return float(want is not None and have is not None and want == have)
