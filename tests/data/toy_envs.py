"""Environments for the multi-turn tests, named by file path as users write them."""

from __future__ import annotations

import asyncio
import math
import time


class Flaky:
    """Misbehaves by row: the prompt's first digit picks raising, hanging (in a plain or an async step), a NaN
    reward or a garbage return; every other row answers "=1" for two turns and ends on the third with reward 0.5."""

    KINDS = {"1": "raise", "2": "hang", "3": "async_hang", "4": "nan", "5": "garbage"}

    def __init__(self, misbehave: bool = True):
        self.misbehave, self.turn, self.kind = misbehave, 0, "ok"

    def reset(self, row: dict) -> str:
        self.kind = self.KINDS.get(row["prompt"][0], "ok") if self.misbehave else "ok"
        if self.kind == "async_hang":
            self.step = self._hang_async
        return row["prompt"]

    def step(self, action: str):
        self.turn += 1
        if self.kind == "raise":
            raise RuntimeError("a broken environment")
        if self.kind == "hang":
            time.sleep(3600)
        if self.kind == "nan":
            return "=1", math.nan, False
        if self.kind == "garbage":
            return ["not", "a", "tuple"]
        return ("=1\n" if self.turn < 3 else None), 0.5, self.turn >= 3

    async def _hang_async(self, action: str):
        await asyncio.sleep(3600)
