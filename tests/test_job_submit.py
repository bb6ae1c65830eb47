"""Running on a cluster. End to end (slow): `ray job submit` to a real Ray head with its dashboard and token auth,
a user's project directory uploaded as the job's working dir (a job YAML and a reward file named by a relative
path), and `raylhf train` running as the job's driver, which must join that cluster (RAY_ADDRESS) rather than
start an embedded Ray. Fast: how the driver picks the cluster and names reward files, and the deploy/ files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator import ray_setup
from orchestrator.config import JobConfig
from tests.conftest import base_config

BIN = Path(sys.executable).parent  # this venv's `ray` and `raylhf`

USER_REWARDS = textwrap.dedent("""
    def ends_with_answer(prompt, completion, answer="", **fields):
        \"\"\"A user's own reward, shipped in the job's working dir.\"\"\"
        return float(completion.strip().endswith(str(answer)))
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def dashboard_answers(url: str) -> bool:
    """Any HTTP answer (a 401 without the token included) means the dashboard is serving."""
    try:
        urllib.request.urlopen(f"{url}/api/version", timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@contextlib.contextmanager
def ray_head_with_dashboard(cwd: Path, env: dict):
    """`ray start --head --block` on loopback with the dashboard (the job server), every port chosen free; yields
    the dashboard URL. Teardown ends exactly what it started: SIGTERM to `ray start` (which stops its cluster), then
    SIGKILL to its process group. Not `ray stop`: that kills every Ray process on the machine, other test sessions'
    clusters included."""
    temp = tempfile.mkdtemp(prefix="rlj", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    dashboard = f"http://127.0.0.1:{free_port()}"
    log_path = cwd / "ray-start.log"
    args = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
            "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard.rsplit(':', 1)[1]}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}", "--disable-usage-stats", f"--temp-dir={temp}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = wait_until(lambda: "block forever" in log_path.read_text() or proc.poll() is not None, 120)
        assert started and proc.poll() is None, log_path.read_text()[-3000:]
        answered = wait_until(lambda: dashboard_answers(dashboard), 60)
        assert answered, "the dashboard did not answer\n" + log_path.read_text()[-3000:]
        yield dashboard
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def ray_cli(*args: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_ray_job_submit_runs_a_user_project_on_the_cluster(tmp_path, tiny_model):
    """The driver joins the cluster it was submitted to; a relative reward file from the working dir scores."""
    import ray._private.utils

    missing = ray._private.utils.get_dashboard_dependency_error()
    assert missing is None, f"the job server is part of Ray's dashboard: pip install 'ray[default]' ({missing})"
    project, home, run_dir = tmp_path / "project", tmp_path / "home", tmp_path / "run"
    project.mkdir()
    home.mkdir()
    (project / "my_rewards.py").write_text(USER_REWARDS)
    cfg = base_config(tiny_model, reward={"functions": [{"name": "my_rewards.py:ends_with_answer"},
                                                        {"name": "rewards.final_answer:hash_answer"}]})
    (project / "job.yaml").write_text(yaml.safe_dump(cfg))  # no ray.address: the job's RAY_ADDRESS must be used

    # A fresh token in a temporary HOME, so the user's own ~/.ray/auth_token is neither read nor replaced.
    token = subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, text=True,
                           check=True, timeout=60, env={**os.environ, "HOME": str(home)}).stdout.strip()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # the job's shell finds `raylhf` here
    env.pop("RAY_ADDRESS", None)

    with ray_head_with_dashboard(tmp_path, env) as dashboard:
        job_id = f"raylhf-test-{os.getpid()}"
        submit = ray_cli("job", "submit", "--address", dashboard, "--submission-id", job_id,
                         "--working-dir", str(project), "--",
                         "raylhf", "train", "job.yaml", "--set", "loop.steps=2", "--set", "logging.progress=false",
                         "--set", "reward.num_processes=1",
                         "--run-dir", str(run_dir), env=env, timeout=240)
        status = ray_cli("job", "status", "--address", dashboard, job_id, env=env, timeout=60)
        unauthenticated = ray_cli("job", "list", "--address", dashboard, timeout=60,
                                  env={**env, "RAY_AUTH_TOKEN": "wrong-token", "HOME": str(home / "nobody")})

    job_output = submit.stdout + submit.stderr
    # `ray job status` words a SUCCEEDED job as "Job '<id>' succeeded".
    assert f"Job '{job_id}' succeeded" in status.stdout, \
        f"{status.stdout}{status.stderr}\n--- job ---\n{job_output[-6000:]}"
    assert submit.returncode == 0, job_output[-6000:]
    assert "raylhf: run directory" in job_output and "== summary ==" in job_output
    assert "Started a local Ray instance" not in job_output  # it joined the cluster it was submitted to
    assert unauthenticated.returncode != 0  # the cluster really enforces the token

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert "reward/ends_with_answer" in r and r["reward/ends_with_answer/failures"] == 0
        assert "reward/hash_answer" in r
    assert (run_dir / "final_policy" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- the driver side, without a cluster


def job_config(*reward_names: str, **ray) -> JobConfig:
    functions = [{"name": n} for n in reward_names]
    return JobConfig.model_validate(base_config("/models/m", reward={"functions": functions}, ray=ray))


def test_the_cluster_address_comes_from_the_config_then_from_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_setup.cluster_address(job_config("rewards.final_answer:hash_answer")) is None  # embedded Ray
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # what `ray job submit` gives its driver
    assert ray_setup.cluster_address(job_config("rewards.final_answer:hash_answer")) == "10.0.0.1:6379"
    assert ray_setup.cluster_address(job_config("rewards.final_answer:hash_answer", address="auto")) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    with pytest.raises(ValueError, match="dashboard .*ray job submit"):
        ray_setup.cluster_address(job_config("rewards.final_answer:hash_answer"))


def test_reward_files_in_a_submitted_jobs_working_dir_stay_relative_and_others_are_shipped(tmp_path, monkeypatch):
    """Workers run in their node's copy of the job's working dir, so a file there is named relative to it; a
    file outside it is shipped as a py_module, as for any remote cluster."""
    job_dir, elsewhere = tmp_path / "job", tmp_path / "elsewhere"
    (job_dir / "lib").mkdir(parents=True)
    elsewhere.mkdir()
    for path in (job_dir / "my_rewards.py", job_dir / "lib" / "more.py", elsewhere / "far.py"):
        path.write_text(f"def {path.stem}(prompt, completion, **fields):\n    return 1.0\n")
    monkeypatch.chdir(job_dir)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    job_env = {"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}  # what Ray's job supervisor sets
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_env))
    calls = []
    monkeypatch.setattr(ray_setup, "init_ray", lambda cfg, runtime_env=None: calls.append(runtime_env) or True)
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh driver, whatever ran before here
    cfg = job_config("my_rewards.py:my_rewards", "rewards.final_answer:hash_answer",
                     str(elsewhere / "far.py") + ":far", "lib/more.py:more")
    (tmp_path / "staging").mkdir()

    started, specs = ray_setup.connect_ray(cfg, tmp_path / "staging")

    names = [s.name for s in specs]
    assert started and names[0] == "my_rewards.py:my_rewards" and names[1] == "rewards.final_answer:hash_answer"
    assert names[2].startswith("raylhf_user_far_") and names[3] == "lib/more.py:more"
    assert [Path(m).name for m in calls[0]["py_modules"]] == [names[2].split(":")[0] + ".py"]

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")  # a plain driver joining a cluster ships every file
    assert ray_setup.submitted_job_dir() is None
    _, specs = ray_setup.connect_ray(cfg, tmp_path / "staging")
    assert all(s.name.startswith(("raylhf_user_", "rewards.")) for s in specs)


# ----------------------------------------------------------------------------- the deploy files cannot drift

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def dockerfile_args() -> dict[str, str]:
    text = (DEPLOY / "Dockerfile").read_text()
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))


def test_the_image_pins_the_vllm_the_engine_is_written_for_and_the_ray_the_rayjob_names():
    from actors.engines.vllm import VLLM_VERSION

    args = dockerfile_args()
    assert args["VLLM_VERSION"] == VLLM_VERSION and args["TORCH_VERSION"] == "2.14.0"  # vllm 0.33.0's torch pin
    assert args["CUDA_VERSION"].startswith("13.0")  # torch 2.14.0's PyPI wheel is built for CUDA 13.0
    rayjob = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == args["RAY_VERSION"]


def test_the_cluster_files_are_valid_and_expose_rollout_and_trainer_nodes():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    cluster = yaml.safe_load((DEPLOY / "cluster.yaml").read_text())
    validate_config(fillout_defaults(cluster))  # Ray's own schema for `ray up`
    types = cluster["available_node_types"]
    assert types["rollout_gpu"]["resources"] == {"rollout_node": 8}  # one per GPU of a p5 node
    assert types["trainer_gpu"]["resources"] == {"trainer_node": 8}
    assert "-e RAY_AUTH_MODE=token" in cluster["docker"]["run_options"]

    spec = yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())["spec"]
    assert spec["entrypoint"].startswith("raylhf train ") and spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    groups = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))  # KubeRay's quoted JSON
              for g in spec["rayClusterSpec"]["workerGroupSpecs"]}
    assert groups == {"rollout": {"rollout_node": 8}, "trainer": {"trainer_node": 8}}


@pytest.mark.parametrize("script", ["deploy/submit.sh", "scripts/gpu_smoke.sh"])
def test_the_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(DEPLOY.parent / script)], check=True)
