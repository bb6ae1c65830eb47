"""The survey's 2.1.3 experiment (Schulman 2020): bias and spread of the k1, k2, k3 KL estimators.

p = N(0, 1) is the reference, q = N(1, 1) the sampling policy, x ~ q; true KL[q ‖ p] = 0.5.
Run: python benchmarks/kl_estimators.py [--samples N] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

# Run as a script, this folder is sys.path[0] and benchmarks/algorithms.py would shadow the package.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]

from algorithms import KL_KINDS, kl_estimate  # noqa: E402


def normal_logpdf(x: torch.Tensor, mu: float) -> torch.Tensor:
    return -0.5 * (x - mu) ** 2 - 0.5 * math.log(2 * math.pi)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10**6, help="Monte-Carlo samples drawn from q")
    parser.add_argument("--seed", type=int, default=0, help="torch generator seed")
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    x = 1.0 + torch.randn(args.samples, generator=gen, dtype=torch.float64)  # [N] x ~ q
    logq, logp = normal_logpdf(x, 1.0), normal_logpdf(x, 0.0)  # [N]
    true_kl = 0.5
    print(f"p = N(0,1), q = N(1,1), x ~ q, {args.samples:,} samples (seed {args.seed}); true KL[q, p] = {true_kl}\n")
    print("| estimator | bias / true | std / true |")
    print("|---|---:|---:|")
    for kind in KL_KINDS:
        k = kl_estimate(logq, logp, kind)  # [N]
        print(f"| {kind} | {(k.mean().item() - true_kl) / true_kl:+.4f} | {k.std().item() / true_kl:.4f} |")


if __name__ == "__main__":
    main()
