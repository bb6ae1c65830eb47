"""A driver for tests/test_embedded_ray.py: start the embedded Ray the way `raylhf train` does (`init_ray`), bring
up an actor and run a task, ask for two more actors without waiting for them (their workers are still starting
when the test looks), print "ready" and wait to be killed."""

import time

import ray

from orchestrator.config import load_config
from orchestrator.ray_setup import init_ray

init_ray(load_config("examples/arith_grpo.yaml", ["ray.num_cpus=2"], check_paths=False))


@ray.remote
class Echo:
    def ping(self) -> str:
        return "pong"


@ray.remote
def square(x: int) -> int:
    return x * x


up = Echo.remote()
assert ray.get([up.ping.remote(), square.remote(3)]) == ["pong", 9]
starting = [Echo.remote() for _ in range(2)]
print("ready", flush=True)
time.sleep(600)
