"""Kills what is left of an embedded Ray once its driver is gone (started by `ray_setup.start_embedded_ray`).

Ray ties its head processes to the driver (GCS, raylet, monitor, dashboard, log monitor die with it by
PR_SET_PDEATHSIG), and a worker that is up exits a second or two after its raylet is gone. A worker still
starting when the driver dies (importing, connecting) does not check: it retries the dead GCS for some 25 s.
This watchdog runs in a session of its own, so a SIGKILL of the driver's process group leaves it standing; when
its parent (the driver) is gone, it sends SIGKILL to every process whose environment carries MARK_VAR=<mark>.
The embedded Ray's processes, the workers its raylet starts and whatever they start inherit that variable.
Run as `python ray_watchdog.py MARK DRIVER_PID`; it imports the standard library only."""

from __future__ import annotations

import os
import signal
import sys
import time

MARK_VAR = "RAYLHF_EMBEDDED_RAY"
POLL_S = 0.2


def marked(mark: str) -> list[int]:
    """Pids of the live processes whose environment has MARK_VAR=mark (a zombie's environment reads empty)."""
    entry = f"{MARK_VAR}={mark}".encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if entry in f.read().split(b"\0"):
                    pids.append(int(name))
        except OSError:  # gone, or another user's
            continue
    return pids


def main(mark: str, driver: int) -> None:
    while os.getppid() == driver:  # reparented once the driver exits or is killed
        time.sleep(POLL_S)
    # The raylet may be starting a worker as it dies: sweep until two sweeps in a row find nothing (10 s at most).
    deadline, quiet = time.monotonic() + 10, 0
    while quiet < 2 and time.monotonic() < deadline:
        pids = marked(mark)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        quiet = 0 if pids else quiet + 1
        time.sleep(POLL_S)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
