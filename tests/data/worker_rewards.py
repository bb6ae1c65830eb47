"""Reward functions for the RewardWorker tests: every form, and every way a reward can misbehave.

`misbehave*` choose what to do from the completion text, so one batch holds good and bad samples.
Hanging calls first write their process id into the row's `pid_dir`, so a test can watch the process.
"""

import asyncio
import math
import os
import time


def exact(prompt: str, completion: str, answer: str = "", **fields) -> float:
    """1.0 when the completion is the row's answer."""
    return float(completion == answer)


def detailed(prompt: str, completion: str, answer: str = "", completion_tokens: int = -1, **fields) -> dict:
    """A dict: the score plus numbers to log."""
    return {"score": float(completion == answer), "tokens": completion_tokens, "prompt_chars": len(prompt)}


def fields_seen(prompt: str, completion: str, **fields) -> float:
    """Fails unless it gets exactly the row's other columns plus completion_tokens."""
    assert sorted(fields) == ["answer", "completion_tokens", "topic"], sorted(fields)
    return float(fields["topic"] == "arith")


def lengths(prompts: list, completions: list, answer: list, **columns) -> list:
    """Batched (declared in the config): len(completion) + 0.5 when it equals its row's answer."""
    return [len(c) + 0.5 * (c == a) for c, a in zip(completions, answer)]


def batch_sizes(prompts: list, completions: list, **columns) -> list:
    """Batched (declared by the attribute below): every sample scores the size of the batch it came in."""
    return [float(len(completions))] * len(completions)


batch_sizes.batched = True


async def slow_async(prompt: str, completion: str, **fields) -> float:
    """Waits 0.3 s (an API call, say) then scores 2.0."""
    await asyncio.sleep(0.3)
    return 2.0


def sleepy(prompt: str, completion: str, **fields) -> float:
    """Blocks 0.4 s per call: parallel processes overlap these."""
    time.sleep(0.4)
    return 1.0


def _note_pid(fields: dict) -> None:
    if fields.get("pid_dir"):
        open(os.path.join(fields["pid_dir"], str(os.getpid())), "w").close()


def misbehave(prompt: str, completion: str, **fields):
    """Plain form: raise, hang, spin, exit the process, allocate too much, or return NaN, inf, a number beyond
    reward.max_abs_score or a non-number (as the score or an extra of a dict), by completion."""
    if completion == "raise":
        raise RuntimeError("verifier bug")
    if completion == "hang":
        _note_pid(fields)
        time.sleep(600)
    if completion == "spin":  # holds the GIL: nothing in this process can interrupt it
        while True:
            pass
    if completion == "exit":
        os._exit(3)
    if completion == "hog":  # 2 GiB, written: more than reward.memory_mb allows the test's process
        return float(len(bytearray(2 << 30)))
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "text": "1.0", "none": None, "bool": True,
            "nodict": {"value": 1.0}, "dictnan": {"score": math.nan}, "huge": 1e308, "-huge": -1e308,
            "big": 2e6, "bigint": 10**400, "dicthuge": {"score": 1.0, "n": 1e308}, "dicttext": {"score": 1.0, "note": "x"},
            "dictbool": {"score": 1.0, "ok": True}, "dictnanextra": {"score": 1.0, "ratio": math.nan},
            }.get(completion, 1.0)


async def misbehave_async(prompt: str, completion: str, **fields):
    """Async form: an await that never ends, or a blocking sleep that stalls the event loop."""
    if completion == "hang":
        await asyncio.sleep(600)
    if completion == "block":
        _note_pid(fields)
        time.sleep(600)
    if completion == "raise":
        raise ValueError("async verifier bug")
    return 1.0


def misbehave_batched(prompts: list, completions: list, **columns):
    """Batched form: hang, return the wrong number of scores, or a NaN among good scores."""
    if "hang" in completions:
        time.sleep(600)
    if "short" in completions:
        return [1.0]
    return [math.nan if c == "nan" else 1.0 for c in completions]


misbehave_batched.batched = True
