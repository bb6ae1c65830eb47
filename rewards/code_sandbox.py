"""Code verifier: run the completion's Python program on stdin/stdout test cases inside a sandbox.

Each test case runs `python -I -B rewards/sandbox_boot.py` as a fresh child in a new empty temporary
directory (the "box", its cwd). The parent enforces, everywhere:
  * a wall-clock limit, after which the whole process group (new session) is killed with SIGKILL;
    the group is killed again once the program has exited, so nothing it started lives on;
  * rlimits: CPU seconds, address space (memory), size of any file written (stdout included),
    open files, no core dumps, and a process count (the kernel ignores RLIMIT_NPROC for root);
  * a scrubbed environment (PATH, HOME=TMPDIR=box, LANG), `-I` (no user site, no PYTHON* variables).
Where this machine supports them (see `sandbox_info()`; the first run probes once per interpreter):
  * `unshare --net --pid --fork --kill-child` (with `--user --map-root-user` where plain unshare is not
    permitted, e.g. not root): no network interface but a down loopback, and a pid namespace whose
    processes all die with the program, even those that called setsid();
  * Landlock: writes only inside the box; reads only in the interpreter's prefixes and /usr, /lib*, /bin,
    /sbin (not /etc, /proc, /home, /tmp or the dataset); no TCP bind/connect (ABI 4); signals and
    abstract unix sockets confined to the sandbox (ABI 6);
  * seccomp (x86_64, aarch64): fork, vfork and clone of a new process fail with EAGAIN, so a fork bomb
    stops at its first fork; threads still work.
And by default a Python audit-hook guard (`sandbox_boot.install_guard`) refuses process creation, signals,
sockets, ctypes and writes outside the box: the only network and file barrier where the kernel layers
are missing, and one a determined program can get around.
Not enforced: without the network namespace, UDP and pathname unix sockets (e.g. a docker.sock) are
reachable past the guard; without Landlock, reads anywhere the user may read and writes past the guard;
as root without seccomp, nothing past the guard bounds the number of processes before the wall limit
(RLIMIT_NPROC does not apply to root). Memory is bounded per process as address space, not resident memory.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rewards.sandbox_boot import SETUP_FAILED

BOOT = str(Path(__file__).with_name("sandbox_boot.py"))
_NAMESPACES_AS_ROOT = ["unshare", "--net", "--pid", "--fork", "--kill-child"]
_NAMESPACES_AS_USER = ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--kill-child"]
_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program): a layer the probe found could not be applied."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run."""

    wall_s: float = 5.0
    """Wall-clock seconds before the process group is killed (a timeout)."""
    cpu_s: int = 4
    """RLIMIT_CPU seconds (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 512
    """RLIMIT_AS: address space of each process, in MiB."""
    file_mb: int = 16
    """RLIMIT_FSIZE: largest file the program may write, stdout and stderr included, in MiB."""
    max_files: int = 64
    """RLIMIT_NOFILE: open file descriptors."""
    max_procs: int = 16
    """RLIMIT_NPROC: processes and threads of the user (ignored by the kernel for root)."""


@dataclass(frozen=True)
class SandboxInfo:
    """What the sandbox enforces on this machine for one interpreter, as found by a probe run."""

    namespaces: bool
    """Network and pid namespaces via `unshare`."""
    landlock_abi: int
    """Landlock ABI applied (0: none; >= 4 also blocks TCP; >= 6 also scopes signals)."""
    seccomp: bool
    """New processes refused by a seccomp filter."""
    root: bool
    """The program runs as (namespaced) root: RLIMIT_NPROC is not enforced."""
    prefix: tuple[str, ...]
    """Command placed before the interpreter."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of one sandboxed run."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    """Killed at the wall-clock limit or by the CPU limit."""
    cpu_s: float
    """CPU seconds used by the program (and the processes it waited for)."""


def _env(box: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8"}


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already gone


def _launch(prefix: list[str], python: str, config: dict[str, Any], source: str, stdin: bytes, wall_s: float,
            output_bytes: int) -> RunResult:
    """Run the boot stage with `config` in a fresh box; kill the group at the deadline and after exit."""
    with tempfile.TemporaryDirectory(prefix="raylhf-box-", ignore_cleanup_errors=True) as box, \
            tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        Path(box, "main.py").write_text(source, encoding="utf-8", errors="replace")
        fin.write(stdin)
        fin.seek(0)
        # Files, not pipes: RLIMIT_FSIZE caps the output, and a leftover grandchild cannot hold us up.
        proc = subprocess.Popen([*prefix, python, "-I", "-B", BOOT, json.dumps(config)], stdin=fin, stdout=fout,
                                stderr=ferr, cwd=box, env=_env(box), start_new_session=True)
        status, usage, timed_out = _wait(proc.pid, wall_s)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(output_bytes), ferr.read(output_bytes)
    return RunResult(proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), timed_out,
                     usage.ru_utime + usage.ru_stime)


def _wait(pid: int, wall_s: float) -> tuple[int, Any, bool]:
    """Wait for `pid` until the deadline, then kill its group; (wait status, rusage, timed out).

    wait4 gives the CPU time of the child and the descendants it waited for (unshare waits for the
    program), which is how a kill by RLIMIT_CPU is told apart: unshare cannot pass SIGKILL on.
    """
    deadline = time.monotonic() + wall_s
    delay = 0.0005
    timed_out = False
    # WNOWAIT leaves the exited leader a zombie, so its group id cannot be reused before the kill.
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)
    _kill_group(pid)  # at the deadline, or whatever the program left behind
    _, status, usage = os.wait4(pid, 0)
    return status, usage, timed_out


@functools.lru_cache(maxsize=None)
def sandbox_info(python: str | None = None) -> SandboxInfo:
    """Probe (once per interpreter) which namespaces work here and which kernel layers the child can apply."""
    python = python or sys.executable
    root = os.geteuid() == 0
    candidates = [_NAMESPACES_AS_ROOT, _NAMESPACES_AS_USER, []] if root else [_NAMESPACES_AS_USER, []]
    failures = []
    for prefix in candidates:
        try:
            result = _launch(prefix, python, {"probe": True}, "", b"", wall_s=30, output_bytes=1 << 16)
            report = json.loads(result.stdout)
        except (OSError, ValueError) as e:
            failures.append(f"{' '.join(prefix[:1]) or 'plain'}: {e}")
            continue
        if result.returncode != 0:
            failures.append(f"{' '.join(prefix) or 'plain'}: exit {result.returncode}: {result.stderr.strip()[-300:]}")
            continue
        return SandboxInfo(namespaces=bool(prefix), landlock_abi=report["landlock_abi"],
                           seccomp=bool(report["seccomp"]), root=root, prefix=tuple(prefix))
    raise SandboxError(f"cannot start sandboxed {python}: " + "; ".join(failures))


def run_program(source: str, stdin: str = "", limits: Limits = Limits(), *, guard: bool = True,
                python: str | None = None) -> RunResult:
    """Run Python `source` on `stdin` in a fresh sandbox; `guard=False` leaves only the OS layers (for tests)."""
    python = python or sys.executable
    info = sandbox_info(python)
    file_bytes = limits.file_mb << 20
    rlimits = {"RLIMIT_CPU": [limits.cpu_s, limits.cpu_s + 1], "RLIMIT_AS": [limits.memory_mb << 20] * 2,
               "RLIMIT_FSIZE": [file_bytes] * 2, "RLIMIT_NOFILE": [limits.max_files] * 2,
               "RLIMIT_CORE": [0, 0], "RLIMIT_NPROC": [limits.max_procs] * 2}
    config = {"rlimits": rlimits, "landlock_abi": info.landlock_abi, "seccomp": info.seccomp, "guard": guard}
    result = _launch(list(info.prefix), python, config, source, stdin.encode("utf-8", "replace"), limits.wall_s,
                     file_bytes)
    if result.returncode == SETUP_FAILED and result.stderr.startswith("raylhf-sandbox:"):
        raise SandboxError(result.stderr.strip())
    if result.cpu_s >= limits.cpu_s and result.returncode != 0:
        return replace(result, timed_out=True)
    return result


def extract_program(completion: str) -> str:
    """The last ```python (or ```py/```python3) block; else the last untagged ``` block; else the whole text."""
    blocks = _FENCE.findall(completion)
    for wanted in ({"python", "py", "python3"}, {""}):
        tagged = [code for lang, code in blocks if lang.lower() in wanted]
        if tagged:
            return tagged[-1]
    return completion


def same_output(got: str, want: str) -> bool:
    """Stdout comparison: lines compared with trailing whitespace removed; trailing blank lines ignored."""
    def lines(text: str) -> list[str]:
        return [line.rstrip() for line in text.rstrip().splitlines()]

    return lines(got) == lines(want)


def code_tests(prompt: str, completion: str, tests: list[dict] | str | None = None, limits: Limits = Limits(),
               **_: object) -> dict[str, float]:
    """Fraction of `tests` ({"input", "output"}; a JSON string is accepted) the program passes.

    Stops at the first timeout (the remaining cases count as failed) so that a looping program
    costs one wall limit, not one per case. Returns {"score", "passed", "timeouts"}.
    Other limits: `functools.partial(code_tests, limits=Limits(...))` in a user's reward file.
    """
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not tests:
        raise ValueError("code_tests needs a non-empty `tests` field: a list of {'input': ..., 'output': ...}")
    program = extract_program(completion)
    passed = timeouts = 0
    for case in tests:
        result = run_program(program, str(case.get("input", "")), limits)
        if result.timed_out:
            timeouts += 1
            break
        passed += result.returncode == 0 and same_output(result.stdout, str(case["output"]))
    return {"score": passed / len(tests), "passed": float(passed), "timeouts": float(timeouts)}
