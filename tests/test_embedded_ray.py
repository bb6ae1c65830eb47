"""The embedded Ray of `raylhf train` (`orchestrator.ray_setup.init_ray`): every socket it listens on is bound to
the loopback address, and none of its processes outlives a driver killed with SIGKILL; the CPU trainer ranks'
process group listens on loopback too."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "data" / "embedded_ray_driver.py"


def label(p: psutil.Process) -> str:
    """gcs_server, raylet, ray::Echo, monitor.py ...: what the process is, in a word."""
    cmd = p.cmdline() or [p.name()]
    return next((Path(a).name for a in cmd if a.startswith("ray::") or a.endswith((".py", "/gcs_server", "/raylet"))),
                Path(cmd[0]).name)


def loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback  # ::ffff:127.0.0.1 is loopback


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_processes(session: str) -> list[psutil.Process]:
    """Processes whose command line names this Ray session (a worker still starting up, before it renames itself)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if any(session in arg for arg in p.info["cmdline"] or []) and alive(p):
            found.append(p)
    return found


def session_name(tree: list[psutil.Process]) -> str:
    """The Ray session of the driver's tree, read from the GCS server's command line."""
    for p in tree:
        for arg in p.cmdline():
            if arg.startswith("--session-name="):
                return arg.split("=", 1)[1]
    raise AssertionError("no gcs_server under the driver")


@contextlib.contextmanager
def embedded_ray_driver():
    """tests/data/embedded_ray_driver.py in a session of its own, once it printed "ready"; whatever is left of it
    and its Ray is killed on the way out, so a failing test leaves nothing running."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(DRIVER)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: list[psutil.Process] = []
    session = None
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()[-3000:] if proc.poll() is not None else line
        seen = psutil.Process(proc.pid).children(recursive=True)
        session = session_name(seen)
        yield proc, session
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for p in seen + (session_processes(session) if session else []):
            with contextlib.suppress(psutil.Error):
                p.kill()


def test_every_socket_of_the_embedded_ray_listens_on_loopback_only():
    """GCS, raylet, dashboard agent, runtime-env agent, the driver and every worker (and the autoscaler monitor's
    and dashboard's metrics servers, when no other Ray on this machine holds their fixed ports 44217 and 44227):
    each listening TCP socket (IPv4 and IPv6) of the driver's process tree is bound to a loopback address."""
    with embedded_ray_driver() as (proc, _):
        time.sleep(1)  # let the agents and the two starting workers open their servers
        driver = psutil.Process(proc.pid)
        listening, exposed = [], []
        for p in [driver, *driver.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                name = label(p)
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.append(f"{name} {c.laddr.ip}:{c.laddr.port}")
                        if not loopback(c.laddr.ip):
                            exposed.append(listening[-1])
    print("\n".join(listening))
    assert len(listening) >= 5, listening  # GCS, raylet (2), driver, a worker at least
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)


def test_no_process_of_the_embedded_ray_outlives_a_killed_driver():
    """SIGKILL the driver's process group while one actor runs and two actors' workers are still starting: within
    5 s no process of its Ray is left (GCS, raylet, agents, workers, starting workers)."""
    with embedded_ray_driver() as (proc, session):
        deadline = time.monotonic() + 10
        while not any("default_worker.py" in " ".join(p.cmdline()) for p in session_processes(session)):
            if time.monotonic() > deadline:
                break  # the workers came up already; the kill below still has to take every process with it
            time.sleep(0.05)
        tree = psutil.Process(proc.pid).children(recursive=True)
        names = {p.pid: label(p) for p in tree}
        os.killpg(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < 5:
            left = {p.pid: p for p in tree + session_processes(session) if alive(p)}
            if not left:
                break
            time.sleep(0.1)
        left = {pid: names.get(pid) or label(p) for pid, p in left.items()}
        assert not left, f"alive 5 s after the driver was killed: {sorted(left.values())}"


def test_two_cpu_trainer_ranks_listen_on_loopback_only(ray_local, tiny_model):
    """Two PolicyTrainer ranks on CPU, set up: their gloo group and its store (rank 0's TCPStore, which listened on
    every interface when it bound its own port) listen on loopback only."""
    import ray

    from actors.trainer import PolicyTrainer
    from orchestrator.config import AlgorithmConfig, ModelConfig, TrainerConfig

    trainer = TrainerConfig(num_workers=2, micro_batch_size=4).model_dump()
    alg, model = AlgorithmConfig().model_dump(), ModelConfig(path=tiny_model).model_dump()
    ranks = [ray.remote(PolicyTrainer).options(num_cpus=1, runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu"}}).remote(
        r, 2, model, trainer, alg, 1.0, 8, 1, 1, 0) for r in range(2)]
    try:
        addr, port = ray.get(ranks[0].rendezvous.remote())
        ray.get([r.setup.remote(addr, port) for r in ranks])
        pids = ray.get([r.__ray_call__.remote(lambda self: os.getpid()) for r in ranks])
        exposed = [f"rank {rank} {c.laddr.ip}:{c.laddr.port}" for rank, pid in enumerate(pids)
                   for c in psutil.Process(pid).net_connections(kind="inet")
                   if c.status == psutil.CONN_LISTEN and not loopback(c.laddr.ip)]
        assert not exposed, exposed
    finally:
        for r in ranks:
            ray.kill(r)
