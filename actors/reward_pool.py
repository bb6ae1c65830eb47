"""A pool of subprocesses that run reward calls, so that a call that hangs can be killed.

A hung Python function cannot be interrupted in a thread, so every reward call runs in a child
process started by the pool (`python -m actors.reward_pool`, its own session). The parent sends a
*work item* (one function, many samples) per pickled message; before each call the child writes
(call index, start time) into a small shared page, so the parent knows, with no message per call,
which call is running and since when (each value is one aligned 8-byte store: `struct.pack_into`
zeroes its buffer first, and a reader that saw a start of 0 timed busy calls out at once). A call
past `timeout_s` gets its process group killed with SIGKILL and a fresh process started in the
background; the hung call scores a failure and the other calls of its work item are sent again. A
child that dies on its own (a crash, `os._exit`) is handled the same way. Work items are sized from
the measured cost per call (about `TARGET_ITEM_S` each), so cheap rewards cost a round trip or two
per batch and slow ones spread evenly over the processes. Children die with their parent
(PR_SET_PDEATHSIG on Linux, and end of input on their command pipe), so none is left when the owning
actor is killed. Each child's address space is limited (RLIMIT_AS, `memory_mb`) before it loads the reward
modules: a reward that allocates too much gets a MemoryError (or its process dies), not the node's memory.

Only the standard library (and actors.reward_limits, which imports nothing else) is imported here: the
children start fast and load nothing but the reward modules they are asked to run.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import math
import mmap
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from actors.reward_limits import check_value, default_memory_mb, limit_memory

_PAGE_BYTES = 16  # two int64 slots: index of the running call in its work item, its start (CLOCK_MONOTONIC, ns)
_HEADER = struct.Struct("<Q")  # length prefix of a pickled message
TARGET_ITEM_S = 0.02  # work items of about this long: cheap rewards cost few round trips, slow ones balance well
ASYNC_GRACE_S = 1.0  # an async work item enforces timeout_s itself; the parent steps in only this much later
READY_TIMEOUT_S = 120.0  # a child must import its reward modules within this

Item = tuple[str, str, dict]  # (prompt, completion, fields) of one sample
# A call's outcome: (score, extra numbers or None) on success, (None, failure kind, traceback text) on failure.
Outcome = tuple


class RewardLoadFailed(RuntimeError):
    """A child process could not import a reward function (the message holds the child's traceback)."""


@dataclass
class Job:
    """Every sample of one batch for one reward function: `batched` calls take lists of `batch_size` samples."""

    label: str
    items: list[Item]
    batched: bool = False
    batch_size: int | None = None


# ----------------------------------------------------------------------------- parent side


@dataclass
class _Work:
    job: int  # index into the jobs of the current run
    positions: list[int]  # sample positions within the job


@dataclass
class _Child:
    proc: subprocess.Popen
    to_child: Any  # binary file objects of the command and result pipes
    from_child: Any
    page: mmap.mmap
    progress: memoryview  # the page as int64 [index, start_ns]
    sent_ns: int = 0  # when the current work item was sent: no call of it started before
    ready: bool = False
    kinds: dict[str, dict[str, bool]] = field(default_factory=dict)  # label -> {"async", "batched"}
    work: _Work | None = None


class RewardProcessPool:
    """`num_processes` children that run reward calls in parallel; each call is bounded by `timeout_s`."""

    def __init__(self, functions: dict[str, str], num_processes: int = 2, timeout_s: float = 60.0,
                 max_chunk: int = 64, max_abs_score: float = 1e6, memory_mb: int | None = None):
        """`functions`: label -> "module:function" or "/abs/file.py:function", imported by every child.
        A returned value beyond +-`max_abs_score` fails its call; each child may map `memory_mb` MiB of address
        space (None: `default_memory_mb()`)."""
        if num_processes < 1 or timeout_s <= 0:
            raise ValueError(f"need num_processes >= 1 and timeout_s > 0, got {num_processes}, {timeout_s}")
        if not 0 < max_abs_score < math.inf or (memory_mb is not None and memory_mb < 1):
            raise ValueError(f"need 0 < max_abs_score < inf and memory_mb >= 1, got {max_abs_score}, {memory_mb}")
        self.functions = dict(functions)
        self.timeout_s = timeout_s
        self.max_abs_score = max_abs_score
        self.memory_mb = memory_mb if memory_mb is not None else default_memory_mb()
        self.max_chunk = max_chunk
        self.restarts = 0
        self._cost: dict[str, float] = {}  # label -> seconds per call as last measured (round trip included)
        self._children: list[_Child] = []
        try:
            self._children = [self._start() for _ in range(num_processes)]
            deadline = time.monotonic() + READY_TIMEOUT_S
            for c in self._children:
                self._await_ready(c, deadline)
        except BaseException:
            self.close()
            raise
        self.kinds = self._children[0].kinds  # label -> {"async": bool, "batched": bool}, as the functions say

    # -- processes

    def _start(self) -> _Child:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        page = tempfile.TemporaryFile()
        page.truncate(_PAGE_BYTES)
        env = dict(os.environ)
        # The actor's import path (Ray's py_modules and working_dir included), so children import what it can.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "actors.reward_pool", str(cmd_r), str(res_w), str(page.fileno()),
                 str(os.getpid())],
                pass_fds=(cmd_r, res_w, page.fileno()), stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        finally:
            os.close(cmd_r)
            os.close(res_w)
        mapped = mmap.mmap(page.fileno(), _PAGE_BYTES)
        page.close()  # the mapping keeps the page alive
        child = _Child(proc, os.fdopen(cmd_w, "wb"), os.fdopen(res_r, "rb", buffering=0), mapped,
                       memoryview(mapped).cast("q"))
        _send(child.to_child, {"functions": self.functions, "timeout_s": self.timeout_s,
                               "max_abs_score": self.max_abs_score, "memory_mb": self.memory_mb})
        return child

    def _await_ready(self, c: _Child, deadline: float) -> None:
        if not select.select([c.from_child], [], [], max(0.0, deadline - time.monotonic()))[0]:
            self._kill(c)
            raise RewardLoadFailed(f"reward process did not start within {READY_TIMEOUT_S:.0f} s")
        self._take_ready(c)

    def _take_ready(self, c: _Child) -> None:
        msg = _recv(c.from_child)
        if msg is None or msg[0] != "ready":
            self._kill(c)
            detail = msg[1] if msg else f"it exited with status {c.proc.poll()}"
            raise RewardLoadFailed(f"a reward process could not load the reward functions: {detail}")
        c.ready, c.kinds = True, msg[1]

    def _kill(self, c: _Child) -> None:
        """SIGKILL the child's whole process group (whatever it started too) and reap it."""
        try:
            os.killpg(c.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        c.proc.wait()
        for f in (c.to_child, c.from_child):
            try:
                f.close()
            except OSError:
                pass
        c.progress.release()
        c.page.close()

    def _replace(self, c: _Child) -> _Child:
        self._kill(c)
        self.restarts += 1
        return self._start()  # becomes ready in the background while the others work

    def pids(self) -> list[int]:
        """Process ids of the current children."""
        return [c.proc.pid for c in self._children]

    def close(self) -> None:
        """Stop every child (SIGKILL of its process group)."""
        for c in getattr(self, "_children", []):
            self._kill(c)
        self._children = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # -- running

    def _chunks(self, j: int, job: Job) -> list[_Work]:
        """Batches of a batched job, one item per child for an async job, else all of it (split at dispatch)."""
        n = len(job.items)
        if job.batched:
            size = job.batch_size or n
        elif self.kinds.get(job.label, {}).get("async"):
            size = -(-n // len(self._children))  # concurrent within a child: one work item per child
        else:
            size = n
        return [_Work(j, list(range(lo, min(n, lo + size)))) for lo in range(0, n, size)]

    def _take(self, queue: collections.deque, jobs: list[Job]) -> _Work:
        """The next work item: calls of a plain function are taken a few at a time, enough to last about
        TARGET_ITEM_S at the last measured cost (a few while it is unknown), at most a child's share."""
        work = queue.popleft()
        job = jobs[work.job]
        if job.batched or self.kinds.get(job.label, {}).get("async"):
            return work
        n, p = len(work.positions), len(self._children)
        cost = self._cost.get(job.label)
        size = min(-(-n // p), math.ceil(TARGET_ITEM_S / cost)) if cost else min(self.max_chunk, -(-n // (4 * p)))
        size = max(1, size)
        if size < n:
            queue.appendleft(_Work(work.job, work.positions[size:]))
        return _Work(work.job, work.positions[:size])

    def run(self, jobs: list[Job]) -> list[list[Outcome]]:
        """Outcomes of every job, aligned with its items; never raises for a reward's fault."""
        outcomes: list[list[Outcome | None]] = [[None] * len(job.items) for job in jobs]
        queue = collections.deque(w for j, job in enumerate(jobs) for w in self._chunks(j, job))
        while queue or any(c.work for c in self._children):
            for i, c in enumerate(self._children):
                if c.ready and c.work is None and queue:
                    work = self._take(queue, jobs)
                    if not self._dispatch(c, work, jobs):  # it died while idle (e.g. the OOM killer)
                        queue.appendleft(work)
                        self._children[i] = self._replace(c)
            waiting = [c for c in self._children if c.work is not None or not c.ready]
            now = time.monotonic()
            wake = min((self._deadline(c, jobs) for c in waiting if c.work is not None), default=now + 1.0)
            readable = select.select([c.from_child for c in waiting], [], [], min(1.0, max(0.0, wake - now)))[0]
            for i, c in enumerate(self._children):
                if c.from_child in readable:
                    if not c.ready:
                        self._take_ready(c)
                        continue
                    result = _recv(c.from_child)
                    if result is None:  # the child died
                        self._children[i] = self._fail_running(c, jobs, outcomes, queue, "ProcessDied",
                                                               _how_it_died(c.proc.pid))
                        continue
                    for pos, out in zip(c.work.positions, result):
                        outcomes[c.work.job][pos] = out
                    job = jobs[c.work.job]
                    if not self._whole_item(c, jobs):
                        self._cost[job.label] = max(1e-7, (time.monotonic_ns() - c.sent_ns) / 1e9 / len(result))
                    c.work = None
                elif c.work is not None and time.monotonic() > self._deadline(c, jobs):
                    self._children[i] = self._fail_running(c, jobs, outcomes, queue, "TimeoutError",
                                                           f"the call took longer than {self.timeout_s:g} s; "
                                                           "its process was killed")
        return outcomes  # type: ignore[return-value]

    def _dispatch(self, c: _Child, work: _Work, jobs: list[Job]) -> bool:
        """Send `work` to an idle child; False if the child is gone."""
        job = jobs[work.job]
        items = [job.items[p] for p in work.positions]
        c.sent_ns = time.monotonic_ns()
        try:
            _send(c.to_child, (job.label, job.batched, items))
        except OSError:
            return False
        c.work = work
        return True

    def _running(self, c: _Child) -> tuple[int, float]:
        """(index, start in seconds) of the call the child runs now; the page may still hold the previous
        item's last call, so a start before the item was sent means the item's first call."""
        index, start_ns = c.progress[0], c.progress[1]
        if start_ns < c.sent_ns:
            return 0, c.sent_ns / 1e9
        return index, start_ns / 1e9

    def _whole_item(self, c: _Child, jobs: list[Job]) -> bool:
        """Whether the work item is one call (batched) or concurrent calls (async): no single call to blame."""
        job = jobs[c.work.job]
        return job.batched or bool(self.kinds.get(job.label, {}).get("async"))

    def _deadline(self, c: _Child, jobs: list[Job]) -> float:
        _, start = self._running(c)
        grace = ASYNC_GRACE_S if self.kinds.get(jobs[c.work.job].label, {}).get("async") else 0.0
        return start + self.timeout_s + grace  # on time.monotonic()

    def _fail_running(self, c: _Child, jobs: list[Job], outcomes: list[list], queue: collections.deque,
                      kind: str, message: str) -> _Child:
        """The running call fails (all of a batched or async item); the item's other calls go back in the queue."""
        work = c.work
        index, _ = self._running(c)
        failed = work.positions if self._whole_item(c, jobs) else [work.positions[min(index, len(work.positions) - 1)]]
        for pos in failed:
            outcomes[work.job][pos] = (None, kind, message)
        # Calls done before the hang are lost with the process: they run again, first, with the rest.
        rest = [p for p in work.positions if p not in failed]
        if rest:
            queue.appendleft(_Work(work.job, rest))
        return self._replace(c)


def _how_it_died(pid: int) -> str:
    """Exit status or signal of a child that closed its pipe, read without reaping it (its group id stays
    reserved until `_kill` has signalled the group)."""
    info = None
    for _ in range(20):
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            break
        time.sleep(0.01)
    if info is None:
        return "the reward process closed its result pipe"
    if info.si_code == os.CLD_EXITED:
        return f"the reward process exited with status {info.si_status} in the middle of a call"
    return f"the reward process was killed by signal {info.si_status} in the middle of a call"


def _send(f, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_HEADER.pack(len(data)) + data)
    f.flush()


def _read_exact(f, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = f.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(f) -> Any:
    """The next message, or None at end of input (the other side is gone).

    Files are unbuffered on the reading side, so that `select` on them never misses buffered data.
    """
    head = _read_exact(f, _HEADER.size)
    if head is None:
        return None
    data = _read_exact(f, _HEADER.unpack(head)[0])
    return None if data is None else pickle.loads(data)


# ----------------------------------------------------------------------------- child side


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if that already happened."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def _failure(e: BaseException, memory_mb: int | None = None) -> Outcome:
    text = "".join(traceback.format_exception(e))
    if isinstance(e, MemoryError) and memory_mb is not None:
        text += (f"(a reward process may use reward.memory_mb = {memory_mb} MiB of address space; raise it if the "
                 "reward needs more)\n")
    return (None, type(e).__name__, text)


class _Runner:
    """The child's loaded reward functions and its one event loop (async rewards keep their clients)."""

    def __init__(self, functions: dict[str, str], timeout_s: float, progress: memoryview, max_abs_score: float,
                 memory_mb: int):
        from rewards.loader import load_function

        self.fns = {label: load_function(spec) for label, spec in functions.items()}
        self.timeout_s = timeout_s
        self.max_abs_score, self.memory_mb = max_abs_score, memory_mb
        self.progress = progress
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)

    def kinds(self) -> dict[str, dict[str, bool]]:
        return {label: {"async": _is_async(fn), "batched": bool(getattr(fn, "batched", False))}
                for label, fn in self.fns.items()}

    def _mark(self, index: int) -> None:
        self.progress[1] = time.monotonic_ns()  # the start first: a reader never pairs this index with an old start
        self.progress[0] = index

    def _finish(self, value: Any) -> Any:
        """Await what an async (or coroutine-returning) function gave back, within the timeout."""
        if inspect.isawaitable(value):
            return self.loop.run_until_complete(asyncio.wait_for(value, self.timeout_s))
        return value

    def run(self, label: str, batched: bool, items: list[Item]) -> list[Outcome]:
        fn = self.fns[label]
        if batched:
            return self._run_batched(fn, items)
        if _is_async(fn):
            return self._run_async(fn, items)
        out = []
        for k, (prompt, completion, fields) in enumerate(items):
            self._mark(k)
            try:
                out.append(check_value(self._finish(fn(prompt, completion, **fields)), self.max_abs_score))
            except BaseException as e:  # a reward's SystemExit or KeyboardInterrupt must not end the child
                out.append(_failure(e, self.memory_mb))
        return out

    def _run_async(self, fn, items: list[Item]) -> list[Outcome]:
        async def one(prompt: str, completion: str, fields: dict) -> Outcome:
            try:
                value = await asyncio.wait_for(fn(prompt, completion, **fields), self.timeout_s)
                return check_value(value, self.max_abs_score)
            except BaseException as e:
                return _failure(e, self.memory_mb)

        async def every() -> list[Outcome]:
            return await asyncio.gather(*(one(*item) for item in items))

        self._mark(0)
        return self.loop.run_until_complete(every())

    def _run_batched(self, fn, items: list[Item]) -> list[Outcome]:
        self._mark(0)
        keys = list(dict.fromkeys(k for _, _, fields in items for k in fields))
        columns = {k: [fields.get(k) for _, _, fields in items] for k in keys}
        try:
            values = self._finish(fn([p for p, _, _ in items], [c for _, c, _ in items], **columns))
            if hasattr(values, "tolist"):
                values = values.tolist()  # numpy arrays, tensors
            if not isinstance(values, (list, tuple)) or len(values) != len(items):
                raise TypeError(f"batched reward returned {type(values).__name__} of length "
                                f"{len(values) if hasattr(values, '__len__') else '?'}, expected a list of "
                                f"{len(items)} scores")
        except BaseException as e:
            return [_failure(e, self.memory_mb)] * len(items)
        out = []
        for v in values:
            try:
                out.append(check_value(v, self.max_abs_score))
            except (TypeError, ValueError) as e:
                out.append(_failure(e))
        return out


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _child_main(cmd_fd: int, res_fd: int, page_fd: int, parent: int) -> None:
    _die_with_parent(parent)
    commands, results = os.fdopen(cmd_fd, "rb", buffering=0), os.fdopen(res_fd, "wb")
    progress = memoryview(mmap.mmap(page_fd, _PAGE_BYTES)).cast("q")
    os.close(page_fd)
    init = _recv(commands)
    if init is None:
        return
    try:
        limit_memory(init["memory_mb"])
        runner = _Runner(init["functions"], init["timeout_s"], progress, init["max_abs_score"], init["memory_mb"])
    except BaseException as e:
        _send(results, ("error", _failure(e, init["memory_mb"])[2]))
        return
    _send(results, ("ready", runner.kinds()))
    while (msg := _recv(commands)) is not None:
        _send(results, runner.run(*msg))


if __name__ == "__main__":
    _child_main(*(int(a) for a in sys.argv[1:5]))
