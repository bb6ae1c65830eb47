"""End-of-run PNG: reward and held-out accuracy per step (and the other curves users check first)."""

from __future__ import annotations

from pathlib import Path


def plot_run(records: list[dict], out: Path) -> Path:
    """Draw reward, held-out accuracy, response length, KL/entropy and stage seconds per step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward/mean" in r]
    evals = [r for r in records if "eval/accuracy" in r]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["reward/mean"] for r in train], label="train reward (mean)")
    ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train accuracy (sampled)", alpha=0.6)
    ax.plot([r["step"] for r in evals], [r["eval/accuracy"] for r in evals], "o-", label="held-out greedy accuracy")
    ax.set_title("Reward and accuracy")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ax.plot([r["step"] for r in train], [r["response_length/mean"] for r in train])
    ax.set_title("Response length (tokens, mean)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax = axes[1][0]
    for key, label in (("entropy", "entropy"), ("kl", "KL to reference"), ("clip_frac", "clip fraction"),
                       ("approx_kl", "approx KL old→new")):
        if train and key in train[0]:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=label)
    ax.set_title("Policy statistics")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1][1]
    for stage in ("rollout", "generate", "reward", "score", "train", "sync", "overhead"):
        key = f"time/{stage}"
        if train and key in train[0]:
            ax.plot([r["step"] for r in train], [r[key] for r in train], label=stage)
    ax.set_title("Seconds per stage")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
