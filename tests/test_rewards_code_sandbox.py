"""Code verifier and its sandbox: scoring, limits, and escapes that must fail (each test a few seconds at most)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the code sandbox is Linux-only", allow_module_level=True)

from rewards.code_sandbox import (BOOT, Limits, _launch, code_tests, extract_program,  # noqa: E402
                                  run_program, same_output, sandbox_info)

pytestmark = pytest.mark.serial  # wall-clock bounds, and sandbox_pids() sees every sandbox on the machine

INFO = sandbox_info()
DOUBLER = "n = int(input())\nprint(n * 2)\n"
KERNEL_BLOCKS_FORK = INFO.seccomp or not INFO.root  # seccomp, or RLIMIT_NPROC (which root ignores)


def processes_with(marker: str) -> list[int]:
    """Pids whose command line (arguments joined by spaces) contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes().replace(b"\0", b" "):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def sandbox_pids() -> list[int]:
    """Processes still running the sandbox's boot stage (ours or any other)."""
    return processes_with(BOOT)


# --- scoring -----------------------------------------------------------------------------------------------

def test_correct_program_passes():
    completion = f"Read n, print twice n.\n```python\n{DOUBLER}```\nDone."
    tests = [{"input": "3\n", "output": "6\n"}, {"input": "10", "output": "20"}]
    assert code_tests("q", completion, tests=tests) == {"score": 1.0, "passed": 2.0, "timeouts": 0.0}


def test_wrong_program_scores_the_fraction_passed():
    completion = "```python\nn = int(input())\nprint(n * 2 if n < 5 else n)\n```"
    tests = [{"input": "3", "output": "6"}, {"input": "10", "output": "20"}]
    assert code_tests("q", completion, tests=json.dumps(tests), difficulty="easy") == {
        "score": 0.5, "passed": 1.0, "timeouts": 0.0}


def test_crash_or_nonzero_exit_fails_even_with_right_output():
    completion = "```python\nprint(6)\nraise SystemExit(1)\n```"
    assert code_tests("q", completion, tests=[{"input": "3", "output": "6"}])["score"] == 0.0
    assert code_tests("q", "```python\nprint(1/0)\n```", tests=[{"input": "", "output": ""}])["score"] == 0.0


def test_missing_tests_say_what_is_needed():
    with pytest.raises(ValueError, match="tests"):
        code_tests("q", "print(1)")


def test_extract_program():
    assert extract_program("a\n```python\nx = 1\n```\nb\n```python\ny = 2\n```\nc") == "y = 2\n"
    assert extract_program("```py\nz = 3\n```\n```text\nnot code\n```") == "z = 3\n"
    assert extract_program("```\nu = 4\n```") == "u = 4\n"              # untagged, when no python block
    assert extract_program("```python\nv = 5\n") == "v = 5\n"           # truncated: unclosed block
    assert extract_program("print(6)") == "print(6)"                    # no block: the whole completion


def test_same_output():
    assert same_output("6  \n7\n\n", "6\n7")
    assert not same_output("6\n7", "6\n8")
    assert not same_output("67", "6\n7")


# --- limits ------------------------------------------------------------------------------------------------

def test_infinite_loop_is_killed_at_the_wall_limit():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", limits=Limits(wall_s=1.0, cpu_s=30))
    elapsed = time.perf_counter() - start
    assert result.timed_out and result.returncode != 0
    assert 1.0 <= elapsed < 2.0
    assert not sandbox_pids()


def test_cpu_limit_kills_a_busy_program():
    start = time.perf_counter()
    result = run_program("while True:\n    pass\n", limits=Limits(wall_s=10, cpu_s=1))
    assert result.timed_out and result.cpu_s >= 1
    assert time.perf_counter() - start < 8  # SIGKILL at 2 s of CPU, well before the 10 s wall limit


def test_a_timeout_stops_the_remaining_cases():
    completion = "```python\nwhile True:\n    pass\n```"
    start = time.perf_counter()
    result = code_tests("q", completion, tests=[{"input": "", "output": "x"}] * 3, limits=Limits(wall_s=0.5))
    assert result == {"score": 0.0, "passed": 0.0, "timeouts": 1.0}
    assert time.perf_counter() - start < 2


def test_memory_hog_fails_cleanly():
    limits = Limits(memory_mb=256)
    for hog in ("x = bytearray(1 << 30)\n", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n"):
        result = run_program(hog, limits=limits)
        assert result.returncode != 0 and not result.timed_out
        assert "MemoryError" in result.stderr
    assert run_program("print(len(bytearray(50 << 20)))", limits=limits).stdout == f"{50 << 20}\n"


def test_output_is_capped():
    result = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", limits=Limits(file_mb=1))
    assert result.returncode != 0 and not result.timed_out
    assert len(result.stdout) <= 1 << 20


SINGLE_FORK = ("import os, threading\nthreading.Thread(target=print, args=('thread ok',)).start()\n"
               "try:\n    pid = os.fork()\n    print('forked')\nexcept OSError as e:\n    print('refused', e.errno)\n")


@pytest.mark.skipif(not INFO.seccomp, reason="no seccomp filter on this machine")
def test_kernel_refuses_new_processes_but_not_threads():
    result = run_program(SINGLE_FORK, guard=False)
    assert result.stdout == f"thread ok\nrefused {errno.EAGAIN}\n", result.stderr


@pytest.mark.parametrize("guard", [True, pytest.param(False, marks=pytest.mark.skipif(
    not KERNEL_BLOCKS_FORK, reason="without seccomp, root has no kernel bound on processes"))])
def test_fork_bomb_is_contained(guard):
    if not guard and INFO.seccomp:  # never start a real bomb on a machine where the filter does not hold
        assert "forked" not in run_program(SINGLE_FORK, guard=False).stdout
    bomb = "import os\nwhile True:\n    os.fork()\n"
    start = time.perf_counter()
    result = run_program(bomb, limits=Limits(wall_s=2), guard=guard)
    assert result.returncode != 0
    assert time.perf_counter() - start < 3
    assert not sandbox_pids()
    assert subprocess.run(["true"]).returncode == 0               # the host can still start processes
    assert run_program(DOUBLER, "21").stdout == "42\n"


def test_children_die_with_the_program():
    """Leftovers are killed with the process group, and with the pid namespace even after setsid()."""
    marker = f"{30 + os.getpid() % 1000 / 1000:.3f}"  # a sleep length no other process uses
    program = (f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\n"
               f"subprocess.Popen(['sleep', '{marker}1'], start_new_session=True)\nprint('started', flush=True)\n"
               f"while True:\n    pass\n")
    # Seccomp and the guard would refuse these children; keep only the other layers to test the cleanup.
    config = {"rlimits": {}, "landlock_abi": INFO.landlock_abi, "seccomp": False, "guard": False}
    result = _launch(list(INFO.prefix), sys.executable, config, program, b"", wall_s=2.0, output_bytes=1 << 16)
    assert result.timed_out and result.stdout == "started\n", result.stderr
    time.sleep(0.2)
    assert not processes_with(f"sleep {marker} ")  # the one in the process group
    if INFO.namespaces:
        assert not processes_with(f"sleep {marker}1")
    assert not sandbox_pids()


# --- escapes: each layer on its own ------------------------------------------------------------------------

def run_with(layers: str, program: str):
    """"all": the normal sandbox; "kernel": without the Python guard; "guard": the Python guard alone."""
    if layers == "all":
        return run_program(program)
    if layers == "kernel":
        return run_program(program, guard=False)
    config = {"rlimits": {}, "landlock_abi": 0, "seccomp": False, "guard": True}
    return _launch([], sys.executable, config, program, b"", wall_s=5, output_bytes=1 << 16)


def layers(kernel_has_it: bool, reason: str) -> list:
    return ["all", pytest.param("kernel", marks=pytest.mark.skipif(not kernel_has_it, reason=reason)), "guard"]


def _write_attempts(target: Path) -> str:
    return f"""
import os
attempts = [
    lambda: open({str(target)!r}, "w").write("x"),
    lambda: os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)),
    lambda: (os.symlink({str(target)!r}, "link"), open("link", "w").write("x")),
    lambda: (open("here", "w").write("x"), os.rename("here", {str(target)!r})),
]
for attempt in attempts:
    try:
        attempt()
        print("escaped")
    except OSError as e:
        print("refused", type(e).__name__)
open("inside.txt", "w").write("ok")
print(open("inside.txt").read())
"""


@pytest.mark.parametrize("layer", layers(INFO.landlock_abi > 0, "no Landlock"))
def test_writes_outside_the_box_are_refused(tmp_path, layer):
    tmp_path.chmod(0o777)  # world-writable, like /tmp: file permissions alone would allow it
    target = tmp_path / "escaped.txt"
    result = run_with(layer, _write_attempts(target))
    assert result.returncode == 0, result.stderr
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["refused"] * 4 + ["ok"]
    assert not target.exists()


@pytest.mark.skipif(not INFO.landlock_abi, reason="no Landlock: reads are not restricted")
def test_reads_outside_python_and_system_dirs_are_refused(tmp_path):
    secret = tmp_path / "expected_outputs.jsonl"
    secret.write_text("42\n")
    tmp_path.chmod(0o755)
    secret.chmod(0o644)
    result = run_program(f"print(open({str(secret)!r}).read())", guard=False)
    assert "PermissionError" in result.stderr and "42" not in result.stdout


@pytest.mark.parametrize("layer", layers(INFO.namespaces or INFO.landlock_abi >= 4, "no network namespace or TCP rules"))
def test_network_is_refused(layer):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=1):  # reachable from outside the sandbox
            server.accept()[0].close()
        program = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                   f"    print('connected')\nexcept OSError as e:\n    print('refused', type(e).__name__)\n")
        result = run_with(layer, program)
        assert result.stdout.startswith("refused"), (result.stdout, result.stderr)
        server.settimeout(0.1)
        with pytest.raises(TimeoutError):
            server.accept()


@pytest.mark.parametrize("layer", layers(INFO.namespaces or INFO.landlock_abi >= 6, "no pid namespace or signal scope"))
def test_signals_cannot_reach_the_host(layer):
    result = run_with(layer, f"import os\ntry:\n    os.kill({os.getpid()}, 0)\n    print('reached')\n"
                             f"except OSError as e:\n    print('refused', type(e).__name__)\n")
    assert result.stdout.startswith("refused"), (result.stdout, result.stderr)


@pytest.mark.parametrize("program", ["import ctypes", "import _posixsubprocess", "import os\nos.fork()",
                                     "import os\nos.system('true')", "import subprocess\nsubprocess.run(['true'])",
                                     "import socket\nsocket.socket()"])
def test_guard_refuses(program):
    result = run_with("guard", program)
    assert result.returncode != 0 and "sandbox:" in result.stderr, (program, result.stderr)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("RAYLHF_TEST_SECRET", "hunter2")
    result = run_program("import os\nprint(sorted(os.environ))\nprint(os.getcwd() == os.environ['HOME'])")
    assert "RAYLHF_TEST_SECRET" not in result.stdout
    assert result.stdout.endswith("True\n")


def test_runs_from_a_worker_thread():
    results = []
    worker = threading.Thread(target=lambda: results.append(run_program(DOUBLER, "4").stdout))
    worker.start()
    worker.join()
    assert results == ["8\n"]
