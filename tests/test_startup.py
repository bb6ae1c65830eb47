"""Start-up never waits without a bound: a lock a killed start-up left behind, a build another live process holds,
and Ctrl-C while the actors start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import base_config

REPO = Path(__file__).resolve().parent.parent
PY_CPU = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"


def _train(tmp_path, tiny_model, env: dict | None = None, steps: int = 1, **popen) -> subprocess.Popen:
    """`raylhf train` on a `steps`-step job as a subprocess in its own session, with SIGINT delivered and handled
    as a terminal's foreground job has it (`_as_a_terminal_starts_it`)."""
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(tiny_model, loop={"steps": steps, "eval_size": 4})))
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", str(cfg_path), "--run-dir",
                             str(tmp_path / "run")], cwd=REPO, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})}, preexec_fn=_as_a_terminal_starts_it, **popen)


def _as_a_terminal_starts_it() -> None:
    """In the child before exec: SIGINT unblocked and at its default action. An ignored signal and a signal mask both
    survive exec, and Python installs its KeyboardInterrupt handler only over the default. In a full parallel run the
    pytest worker had SIGINT ignored (SIG_IGN), so the CLI it started ignored Ctrl-C and trained on: py-spy showed
    its main thread in the training loop 60 s after the signal."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _session_processes(sid: int) -> list[int]:
    """Pids of the processes still in session `sid` (the CLI and everything it started: Ray and its actors)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # after the name: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def locks_a_killed_startup_leaves(tmp_path: Path) -> dict[str, str]:
    """The environment of a run started after one killed while DeepSpeed loaded its CPU comm op: torch's lock file
    left in the extension cache (`TORCH_EXTENSIONS_DIR`, returned), and our build lock's file naming a dead pid.
    `tests/test_e2e.py::test_two_step_run_through_the_cli` starts its run in it and must finish."""
    extensions = tmp_path / "torch_extensions"
    for stale in (extensions / "deepspeed_shm_comm" / "lock", extensions / PY_CPU / "deepspeed_shm_comm" / "lock"):
        stale.parent.mkdir(parents=True)
        stale.touch()  # what torch's FileBaton leaves when its process dies holding it
    from actors.deepspeed_ops import _builder, op_dir

    (op_dir(_builder()) / "build.lock").parent.mkdir(parents=True, exist_ok=True)
    (op_dir(_builder()) / "build.lock").write_text("pid 999999999 on a dead host")  # a file, no holder
    return {"TORCH_EXTENSIONS_DIR": str(extensions)}


def test_a_build_held_by_a_live_process_fails_fast_naming_the_lock(tmp_path):
    """While another live process builds the op, a rank waits at most its timeout, then says which lock, which
    process, and what to do."""
    lock = tmp_path / "build.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(lock)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.write(f'pid {{os.getpid()}}'); f.flush()\n"
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", (
            "from actors.deepspeed_ops import load_shm_comm\n"
            f"load_shm_comm({str(tmp_path)!r}, timeout_s=1)")], capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "DS_ACCELERATOR": "cpu"})
        assert proc.returncode != 0 and time.monotonic() - t0 < 60
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("actors.deepspeed_ops.OpLockTimeout: waited 1 s for " + str(lock)), proc.stderr[-2000:]
        assert f"held by the live process pid {holder.pid}" in last and "let it finish" in last
    finally:
        holder.kill()
        holder.wait()


def test_a_trainer_that_times_out_on_the_build_lock_reaches_the_driver_as_one_message(ray_local):
    """`_join` hands the driver the rank's OpLockTimeout itself (`raylhf train` prints it as one line)."""
    from actors.deepspeed_ops import OpLockTimeout
    from orchestrator.pools import _join

    class Rank:
        def rendezvous(self):
            return "127.0.0.1", 1

        def setup(self, addr, port):
            raise OpLockTimeout("waited 1 s for /x/build.lock, held by the live process pid 7 ...")

    rank = ray_local.remote(num_cpus=0)(Rank).remote()
    with pytest.raises(OpLockTimeout) as e:
        _join([rank])
    assert type(e.value) is OpLockTimeout and str(e.value).startswith("waited 1 s for /x/build.lock")
    ray_local.kill(rank)


@pytest.mark.slow
def test_ctrl_c_during_startup_prints_one_line_and_leaves_nothing_running(tmp_path, tiny_model):
    """Ctrl-C (SIGINT to the whole foreground group, as a terminal sends it) while the actors start: exit 130,
    `raylhf: interrupted` and no traceback on stderr, and no process of the run left."""
    # Steps enough that the run cannot finish between the trainer's start and the signal on a loaded machine
    # (with one step it once did, and exited 0).
    proc = _train(tmp_path, tiny_model, steps=10_000, stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while "raylhf: run directory" not in proc.stderr.readline():
            assert proc.poll() is None and time.monotonic() < deadline
        while not any("PolicyTrainer" in _cmdline(pid) for pid in _session_processes(proc.pid)):
            assert proc.poll() is None and time.monotonic() < deadline, "no trainer started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired as e:  # say where it hung: the CLI's last words and what still runs
            left = [_cmdline(p)[:120] for p in _session_processes(proc.pid)]
            raise AssertionError(f"no exit 60 s after SIGINT; stderr tail: {(e.stderr or b'')[-3000:]!r}; "
                                 f"still running: {left}") from None
        assert proc.returncode == 130, err[-3000:]
        assert "Traceback" not in err and err.rstrip().endswith("raylhf: interrupted"), err[-3000:]
        deadline = time.monotonic() + 30
        while _session_processes(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _session_processes(proc.pid) == [], [_cmdline(p) for p in _session_processes(proc.pid)]
    finally:
        for pid in _session_processes(proc.pid):
            os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
