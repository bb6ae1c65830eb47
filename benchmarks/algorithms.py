"""Time `gae` and `policy_loss` (forward + backward) on a 64 × 2048-token float32 batch.

Run: python benchmarks/algorithms.py [--batch B] [--length T] [--repeats R]
Prints the median wall time in ms over R repeats (after one warm-up call).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

# Run as a script, this folder is sys.path[0] and benchmarks/algorithms.py would shadow the package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from algorithms import gae, policy_loss  # noqa: E402


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="sequences per batch")
    parser.add_argument("--length", type=int, default=2048, help="response tokens per sequence")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is printed")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, T = args.batch, args.length

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)  # [B]
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()  # [B, T]
    rewards = torch.randn(B, T, generator=gen) * 0.01  # [B, T]
    values = torch.randn(B, T, generator=gen)  # [B, T]
    old_logp = -torch.rand(B, T, generator=gen) * 3  # [B, T]
    logp = (old_logp + 0.1 * torch.randn(B, T, generator=gen)).requires_grad_(True)  # [B, T]
    advantages = torch.randn(B, T, generator=gen)  # [B, T]

    def policy_step(ratio_level: str) -> None:
        loss, _ = policy_loss(logp, old_logp, advantages, mask, 0.2, 0.28, "token-mean", 3.0, ratio_level)
        loss.backward()
        logp.grad = None

    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, B={B}, T={T}, float32, median of {args.repeats}")
    timings = {
        "gae (γ=1, λ=0.95)": median_ms(lambda: gae(rewards, values, mask, 1.0, 0.95), args.repeats),
        "policy_loss token ratio, fwd+bwd": median_ms(lambda: policy_step("token"), args.repeats),
        "policy_loss sequence ratio (GSPO), fwd+bwd": median_ms(lambda: policy_step("sequence"), args.repeats),
    }
    for name, ms in timings.items():
        print(f"{name:<44} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
