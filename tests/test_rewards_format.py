"""Format rewards: regex match and the <think>…</think><answer>…</answer> structure."""

from __future__ import annotations

import time

import pytest

from rewards.format import regex_format, tag_format, think_answer_format


@pytest.mark.parametrize("completion", [
    "<think>a</think><answer>4</answer>",
    "<think>\nlet me see\n</think>\n<answer>\n4\n</answer>\n",
    "  <think></think> <answer>x</answer>",
    "<think>uses <b>other</b> tags and 1 < 2</think><answer>4</answer>",
])
def test_think_answer_accepts(completion):
    assert think_answer_format("q", completion) == 1.0


@pytest.mark.parametrize("completion", [
    "",
    "4",
    "<answer>4</answer>",                                              # missing section
    "<think>a</think>",
    "<answer>4</answer><think>a</think>",                              # wrong order
    "<think>a</think><answer>4</answer> trailing text",                # text outside the structure
    "preamble <think>a</think><answer>4</answer>",
    "<think>a</think><answer>4</answer><answer>5</answer>",            # a tag twice
    "<think>a<think>b</think><answer>4</answer>",                      # nested opening tag
    "<think>a</think>between<answer>4</answer>",
    "<think>a</think><answer>4",                                       # unclosed
    "<THINK>a</THINK><ANSWER>4</ANSWER>",
])
def test_think_answer_rejects(completion):
    assert think_answer_format("q", completion) == 0.0


def test_tag_format_other_tags():
    fmt = tag_format("reasoning", "code", "answer")
    assert fmt("q", "<reasoning>r</reasoning>\n<code>c</code>\n<answer>a</answer>") == 1.0
    assert fmt("q", "<reasoning>r</reasoning><answer>a</answer>") == 0.0
    with pytest.raises(ValueError, match="tags"):
        tag_format()
    with pytest.raises(ValueError, match="tags"):
        tag_format("a>b")


def test_regex_format_full_and_search():
    boxed = regex_format(r".*\\boxed\{[^}]*\}\s*")
    assert boxed("q", "so the answer is \\boxed{4}\n") == 1.0
    assert boxed("q", "\\boxed{4} and then more text") == 0.0
    anywhere = regex_format(r"\\boxed\{", full_match=False)
    assert anywhere("q", "\\boxed{4} and then more text") == 1.0
    assert anywhere("q", "no box") == 0.0
    assert anywhere("q", "\\boxed{1}", answer="1", other_field=3) == 1.0   # unknown fields ignored


@pytest.mark.serial
def test_long_completion_is_fast():
    text = "<think>" + "x < y and </thin " * 20_000 + "</think><answer>1</answer>"
    start = time.perf_counter()
    assert think_answer_format("q", text) == 1.0
    assert think_answer_format("q", text + "<think>") == 0.0
    assert time.perf_counter() - start < 1
