"""Micro-batches with little padding: a rank's rows of one mini-batch are ordered and cut wherever a cut saves more
padded token positions than one more forward/backward call costs (`trainer.micro_batch_split_tokens`), and every
rank gets the same number of micro-batches (DeepSpeed counts backwards; ZeRO's all-reduces pair them up).

The losses are sums over rows weighted by each micro-batch's share of the mini-batch's units (`actors.trainer`), so
how rows are ordered and cut changes no gradient, only the work."""

from __future__ import annotations

import numpy as np
import torch

from actors.batch import distinct_rows
from actors.records import TrainBatch


def row_shapes(part: TrainBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row `[B]` each: prompt length, response width (up to its last loss token: what `TrainBatch.trim` keeps)
    and which distinct prompt it continues (numbered as `actors.batch.distinct_rows` numbers them)."""
    am, rm = part.attention_mask, part.response_mask
    t = rm.shape[1]
    p = am.shape[1] - t
    prompt = am[:, :p].sum(1).numpy()  # [B]
    cols = torch.arange(1, t + 1)  # [T]
    width = (rm.bool() * cols).amax(1).numpy() if t else np.zeros(part.rows, dtype=np.int64)  # [B]
    _, pid = distinct_rows(torch.cat([part.input_ids[:, :p], am[:, :p]], 1))  # [B]
    return prompt.astype(np.int64), width.astype(np.int64), pid.numpy()


class CutCost:
    """Token positions a forward runs for contiguous rows [a, b) of an ordering: `U·P + B·T` when their G samples
    share each prompt (`actors.modeling.response_logits` runs each distinct prompt once when 2U <= B), else
    `B·(P + T)`; B rows, U distinct prompts, P the longest prompt, T the widest response (at least 1)."""

    def __init__(self, prompt: np.ndarray, width: np.ndarray, pid: np.ndarray, share_prompts: bool):
        self.p, self.t, self.share = prompt, width, share_prompts
        n = len(pid)
        self.prev = np.full(n, -1, dtype=np.int64)  # [B] the previous row with the same prompt (-1: none)
        self.next = np.full(n, n, dtype=np.int64)  # [B] the next one (n: none)
        last: dict[int, int] = {}
        for i, k in enumerate(pid.tolist()):
            if k in last:
                self.prev[i], self.next[last[k]] = last[k], i
            last[k] = i

    def _cost(self, rows, prompts, p, t) -> np.ndarray:
        t = np.maximum(t, 1)
        return np.where(self.share & (2 * prompts <= rows), rows * t + prompts * p, rows * (p + t))

    def of(self, a: int, b: int) -> int:
        """The positions of rows [a, b) run as one micro-batch."""
        u = int((self.prev[a:b] < a).sum())
        return int(self._cost(b - a, u, int(self.p[a:b].max()), int(self.t[a:b].max())))

    def best_cut(self, a: int, b: int) -> tuple[int, int]:
        """(positions saved, k): the cut of [a, b) into [a, k) and [k, b) that saves the most (b - a >= 2)."""
        p, t = self.p[a:b], self.t[a:b]
        k = np.arange(1, b - a)  # [b-a-1] rows on the left
        left = self._cost(k, np.cumsum(self.prev[a:b] < a)[:-1], np.maximum.accumulate(p)[:-1],
                          np.maximum.accumulate(t)[:-1])
        right = self._cost(b - a - k, np.cumsum((self.next[a:b] >= b)[::-1])[::-1][1:],
                           np.maximum.accumulate(p[::-1])[::-1][1:], np.maximum.accumulate(t[::-1])[::-1][1:])
        saved = self.of(a, b) - (left + right)  # [b-a-1]
        i = int(np.argmax(saved))
        return int(saved[i]), a + i + 1


def cut(cost: CutCost, n: int, max_rows: int, split_tokens: int) -> list[int]:
    """Sizes of consecutive micro-batches of `n` rows: halves are cut at their best point while a piece has more than
    `max_rows` rows or the cut saves more than `split_tokens` positions."""
    sizes, todo = [], [(0, n)]
    while todo:
        a, b = todo.pop()
        if b - a >= 2:
            saved, k = cost.best_cut(a, b)
            if b - a > max_rows or saved > split_tokens:
                todo += [(k, b), (a, k)]  # left first: sizes come out in row order
                continue
        sizes.append(b - a)
    return sizes


def length_order(prompt: np.ndarray, width: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """`[B]` rows by response width, then prompt, then prompt length: similar widths together, and a prompt's
    samples of one width next to each other (so a micro-batch can still run their prompt once)."""
    return np.lexsort((prompt, pid, width))


def plan(part: TrainBatch, max_rows: int, split_tokens: int, share_prompts: bool = True
         ) -> tuple[TrainBatch, list[int], int]:
    """(the rows reordered, micro-batch sizes, positions plus `split_tokens` per call): of the rows as they come
    (`orchestrator.batching.training_order`: a prompt's samples together) and sorted by response width
    (`length_order`), each cut by `cut`, the cheaper."""
    prompt, width, pid = row_shapes(part)
    best = None
    for order in (np.arange(part.rows), length_order(prompt, width, pid)):
        cost = CutCost(prompt[order], width[order], pid[order], share_prompts)
        sizes = cut(cost, part.rows, max_rows, split_tokens)
        bounds = np.cumsum([0] + sizes)
        total = sum(cost.of(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])) + split_tokens * len(sizes)
        if best is None or total < best[2]:
            best = (order, sizes, total)
    order, sizes, total = best
    rows = part if np.array_equal(order, np.arange(part.rows)) else part.select(torch.from_numpy(order))
    return rows, sizes, total


def equalize(rows: TrainBatch, sizes: list[int], count: int, share_prompts: bool = True) -> list[int]:
    """`sizes` split further (each time the piece whose best cut costs least, `CutCost.best_cut`) until there are
    `count` micro-batches; with fewer rows than `count`, zero-size ones (a rank's zero-weight filler pass) at the end."""
    sizes = list(sizes)
    if len(sizes) >= count:
        return sizes
    prompt, width, pid = row_shapes(rows)
    cost = CutCost(prompt, width, pid, share_prompts)
    while len(sizes) < count:
        starts = np.cumsum([0] + sizes)
        cuts = [(cost.best_cut(int(a), int(a) + s), i) for i, (a, s) in enumerate(zip(starts, sizes)) if s >= 2]
        if not cuts:
            return sizes + [0] * (count - len(sizes))
        (_, k), i = max(cuts)
        a = int(starts[i])
        sizes[i : i + 1] = [k - a, sizes[i] - (k - a)]
    return sizes
