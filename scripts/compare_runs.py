"""Whether two runs logged the same numbers: every metric of every step in both `metrics.jsonl` files, except
wall-clock and machine-dependent ones (time/*, busy/*, utilization/*, throughput, memory/*), must be equal, bit
for bit.

The proof a refactor changed no behaviour (issue 15): run the demo config with a fixed seed before and after,

    raylhf train examples/arith_grpo.yaml --set loop.steps=50 --run-dir runs/before   # at the old commit
    raylhf train examples/arith_grpo.yaml --set loop.steps=50 --run-dir runs/after    # at the new one
    python scripts/compare_runs.py runs/before runs/after

Exit code 0 when every number of the first run is in the second, identical, and 1 otherwise (each difference is
printed). Metrics only the second run logs (a new metric) are listed, not counted as differences.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CLOCK = ("time/", "busy/", "utilization/", "critic/time/", "memory/", "critic/memory/")
CLOCK_KEYS = {"tokens_per_s", "generate_tokens_per_s"}


def compared(record: dict) -> dict:
    """The record without its wall-clock numbers."""
    return {k: v for k, v in record.items() if not k.startswith(CLOCK) and k not in CLOCK_KEYS}


def read(run_dir: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [compared(json.loads(line)) for line in lines if line.strip()]


def main(a: str, b: str) -> int:
    ra, rb = read(a), read(b)
    diffs = []
    if len(ra) != len(rb):
        diffs.append(f"{len(ra)} records vs {len(rb)}")
    added: set[str] = set()
    for x, y in zip(ra, rb):
        step = x.get("step")
        added |= set(y) - set(x)
        for key in sorted(x):
            if x[key] != y.get(key, "<missing>"):
                diffs.append(f"step {step}: {key}: {x[key]} vs {y.get(key, '<missing>')}")
    sa, sb = (Path(d, "samples.jsonl").read_text() if Path(d, "samples.jsonl").exists() else "" for d in (a, b))
    if sa != sb:
        diffs.append("samples.jsonl differ (the logged completions, rewards and advantages)")
    keys = sorted({k for r in ra for k in r})
    print(f"{len(ra)} records, {len(keys)} metrics compared (wall-clock ones left out); samples.jsonl: {len(sa.splitlines())} lines")
    if added:
        print(f"new in the second run: {', '.join(sorted(added))}")
    for line in diffs[:50]:
        print(line)
    print("identical" if not diffs else f"{len(diffs)} differences")
    return 0 if not diffs else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
