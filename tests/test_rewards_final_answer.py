"""GSM8K `#### N` verifier: numeric match tolerant of commas, markup and trailing text."""

from __future__ import annotations

import pytest

from rewards.final_answer import extract_final_answer, hash_answer


@pytest.mark.parametrize("completion, answer", [
    ("#### 1,234 dollars", "1234"),
    ("so she pays #### $1,234.", "1234"),
    ("#### **42**", "42"),
    ("####72", 72),
    ("#### 3.50", "3.5"),
    ("#### -7 degrees", "-7"),
    ("#### 1234", "1,234"),
    ("#### 0.5", "1/2"),
    ("#### 5\nwait, recount\n#### 6", "6"),
    ("#### 12 apples and 5 oranges", "12"),
])
def test_matches(completion, answer):
    assert hash_answer("q", completion, answer=answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("the answer is 42", "42"),            # no marker
    ("#### 41", "42"),
    ("#### 6\nno, actually\n#### 5", "6"),  # the last marker counts
    ("#### 1,234", "123"),
    ("#### -7", "7"),
    ("#### seven", "7"),
    ("#### 7", ""),                         # no reference
    ("#### 7", "seven"),
])
def test_mismatches(completion, answer):
    assert hash_answer("q", completion, answer=answer) == 0.0


def test_extract_and_unknown_fields_ignored():
    assert extract_final_answer("x #### 1,000,000 y") == "1000000"
    assert extract_final_answer("nothing") is None
    assert hash_answer("q", "#### 3", answer="3", question="?", split="train") == 1.0
