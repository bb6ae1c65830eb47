"""Preference data for the arithmetic task, generated in code: no human labels, no download.

The warm-started policy samples several completions per prompt (temperature ~1, the project's HF
`generate` engine); the rule verifier labels them, and a correct answer is preferred to a wrong one.
Rows come in the two forms `orchestrator/offline/preferences.py` reads:

* pairs  `{"prompt", "chosen", "rejected"}` — a correct completion against a wrong one (survey 3.1, 3.8);
* ranked `{"prompt", "responses": [best, ..., worst]}` — for InstructGPT's K-wise loss (survey 3.3.1):
  correct first, then well-formed wrong answers by distance to the truth, then one without an answer.

Train rows come from the task's "train" split and held-out rows from its "eval" split, so their prompts
are disjoint. Everything is seeded; the rows are written once as JSONL under `cache_dir` (keyed by the
arguments and the policy's weights) and read from there afterwards. `pairs` and `ranked` are data sources
for a config (`source: examples.arith.preferences:pairs`): they build the policy and the data on first
use, so a new user runs one command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import tempfile
from collections import Counter
from pathlib import Path

import torch

from examples.arith.task import make_rows, verify
from examples.arith.warmstart import MAX_NEW_TOKENS
from rewards.final_answer import extract_final_answer

POLICY = "checkpoints/arith-sft"
POLICY_PREPARE = "examples.arith.warmstart:prepare"
CACHE_DIR = "checkpoints/arith-prefs"
SYNTHETIC_SEED = 7_919  # offsets the problem seed of synthetic pairs from the sampled ones
FORMAT_VERSION = 1  # bump when the rows this module writes change for the same arguments


def quality(completion: str, answer: str) -> tuple[int, int]:
    """Sort key, smaller is better: (0, 0) correct; (1, |error|) a wrong number; (2, 0) no `#### N` at all."""
    if verify(completion, answer):
        return (0, 0)
    got = extract_final_answer(completion)
    try:
        return (1, abs(int(got) - int(answer)))
    except (TypeError, ValueError):
        return (2, 0)


def rows_from_samples(rows: list[dict], samples: list[list[str]],
                      pairs_per_prompt: int) -> tuple[list[dict], list[dict]]:
    """(pair rows, ranked rows) from each prompt's sampled completions; prompts without both a correct and a
    wrong completion give no rows. Most frequent texts come first: the policy's typical answers and mistakes."""
    pairs, ranked = [], []
    for row, completions in zip(rows, samples):
        counts = Counter(c for c in completions if c.strip())
        texts = sorted(counts, key=lambda c: (-counts[c], c))  # most frequent first, ties by text
        correct = [c for c in texts if quality(c, row["answer"])[0] == 0]
        wrong = [c for c in texts if quality(c, row["answer"])[0] > 0]
        if not correct or not wrong:
            continue
        for j, rejected in enumerate(wrong[:pairs_per_prompt]):
            pairs.append({"prompt": row["prompt"], "chosen": correct[j % len(correct)], "rejected": rejected,
                          "answer": row["answer"]})
        by_level: dict[tuple[int, int], str] = {}
        for c in texts:  # one text per quality level, so the ranking is strict
            by_level.setdefault(quality(c, row["answer"]), c)
        ranked.append({"prompt": row["prompt"], "responses": [by_level[k] for k in sorted(by_level)],
                       "answer": row["answer"]})
    return pairs, ranked


def sample_completions(policy: str, prompts: list[str], n: int, temperature: float, seed: int,
                       prompts_per_call: int = 128) -> list[list[str]]:
    """`n` sampled completions per prompt from the checkpoint at `policy`, one thread and a seed per call so
    the same arguments give the same samples."""
    from actors.records import SamplingParams
    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = HFEngine(policy)
        prompt_ids = encode_prompts(engine.tokenizer, prompts)
        sampling = SamplingParams(n=n, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS)
        out: list[list[str]] = []
        for k, lo in enumerate(range(0, len(prompts), prompts_per_call)):
            groups = engine.generate(prompt_ids[lo : lo + prompts_per_call], sampling, seed=seed * 100_003 + k)
            out += [[c.text for c in group] for group in groups]
    finally:
        torch.set_num_threads(threads)
    return out


def _weights_digest(policy: str) -> str:
    """A short digest of the policy's weight files: new weights, new cache entry."""
    h = hashlib.sha256()
    for f in sorted(Path(policy).glob("*.safetensors")) + sorted(Path(policy).glob("*.bin")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _write_jsonl(rows: list[dict], path: Path) -> None:
    """Write rows as JSONL through a temp file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def generate(split: str = "train", n_prompts: int = 4000, samples_per_prompt: int = 8, temperature: float = 1.0,
             pairs_per_prompt: int = 4, seed: int = 0, policy: str = POLICY,
             policy_prepare: str | None = POLICY_PREPARE, cache_dir: str = CACHE_DIR) -> dict[str, Path]:
    """Build (or find cached) pair and ranked JSONL files for `n_prompts` problems of `split`;
    returns {"pairs": path, "ranked": path}. `policy_prepare` ("module:function") builds a missing policy."""
    from rewards.loader import load_function

    if policy_prepare:  # builds the policy when it is missing; returns at once when it is there
        load_function(policy_prepare)(policy)
    args = dict(split=split, n_prompts=n_prompts, samples_per_prompt=samples_per_prompt, temperature=temperature,
                pairs_per_prompt=pairs_per_prompt, seed=seed, weights=_weights_digest(policy), version=FORMAT_VERSION)
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:12]
    paths = {form: Path(cache_dir) / f"{split}-{key}.{form}.jsonl" for form in ("pairs", "ranked")}
    if all(p.is_file() for p in paths.values()):
        return paths
    rows = make_rows(split, n_prompts, seed=seed)
    samples = sample_completions(policy, [r["prompt"] for r in rows], samples_per_prompt, temperature, seed)
    pairs, ranked = rows_from_samples(rows, samples, pairs_per_prompt)
    correct = sum(verify(c, r["answer"]) for r, cs in zip(rows, samples) for c in cs) / (len(rows) * samples_per_prompt)
    print(f"[preferences] {split}: {len(rows)} prompts x {samples_per_prompt} samples, {correct:.1%} correct -> "
          f"{len(pairs)} pairs, {len(ranked)} rankings ({paths['pairs'].parent})", flush=True)
    _write_jsonl(ranked, paths["ranked"])
    _write_jsonl(pairs, paths["pairs"])
    return paths


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer of the kind the warm-started policy writes: one digit changed, or off by a carry
    (±1, ±10, ±100, ±11, ±110), never negative and never the answer itself."""
    if rng.random() < 0.5:
        digits = list(answer)
        i = rng.randrange(len(digits))
        digits[i] = rng.choice([d for d in "0123456789" if d != digits[i] and (i or d != "0" or len(digits) == 1)])
        return "".join(digits)
    wrong = int(answer) + rng.choice([-1, 1, -10, 10, -100, 100, -11, 11, -110, 110])
    return str(wrong) if wrong >= 0 else str(int(answer) + 1)


def no_answer(answer: str, rng: random.Random) -> str:
    """A completion without a `#### N` answer: empty (the policy stopped at once), a cut-off marker, or the bare
    number without the marker."""
    return rng.choice(["", "#", "##", "###", "####", "#### ", answer])


def synthetic_pairs(n: int, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` pair rows on fresh problems of `split`, ordered as `quality` orders them: mostly the true `#### N`
    against a near miss (`near_miss`, 80%), then the true answer against a completion with no answer
    (`no_answer`, 15%), then a near miss against one with no answer (5%: a wrong number still beats no answer).
    Without the last two, PPO found that stopping at once scored above a wrong answer and collapsed to empty
    completions; the last share stays small because its preferred answers are wrong and `lm_coef` trains on
    preferred answers.
    Unlimited and free; prompts differ from `generate`'s for the same seed."""
    rng = random.Random(f"near-miss-{split}-{seed}")
    rows = []
    for r in make_rows(split, n, seed=seed + SYNTHETIC_SEED):
        truth, kind = r["answer"], rng.random()
        if kind < 0.8:
            chosen, rejected = f"#### {truth}", f"#### {near_miss(truth, rng)}"
        elif kind < 0.95:
            chosen, rejected = f"#### {truth}", no_answer(truth, rng)
        else:
            chosen, rejected = f"#### {near_miss(truth, rng)}", no_answer(truth, rng)
        assert quality(chosen, truth) < quality(rejected, truth), (chosen, rejected, truth)
        rows.append({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected, "answer": truth})
    return rows


def pairs(synthetic: int = 0, **kwargs) -> list[dict]:
    """Pair rows {"prompt", "chosen", "rejected", "answer"}: a config data source (arguments of `generate`),
    then `synthetic` near-miss pairs on other problems of the same split (`synthetic_pairs`)."""
    rows = _read_jsonl(generate(**kwargs)["pairs"])
    if synthetic:
        rows += synthetic_pairs(synthetic, kwargs.get("split", "train"), kwargs.get("seed", 0))
    return rows


def ranked(synthetic: int = 0, **kwargs) -> list[dict]:
    """Ranked rows {"prompt", "responses": [best, ..., worst], "answer"}: a config data source (see `generate`),
    then `synthetic` pairs (`synthetic_pairs`) as rankings of two."""
    rows = _read_jsonl(generate(**kwargs)["ranked"])
    extra = synthetic_pairs(synthetic, kwargs.get("split", "train"), kwargs.get("seed", 0)) if synthetic else []
    return rows + [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "answer": r["answer"]}
                   for r in extra]


def main(argv: list[str] | None = None) -> None:
    """`python -m examples.arith.preferences` prints where the JSONL files are (building them if needed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="train", choices=("train", "eval"))
    p.add_argument("--n-prompts", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default=POLICY)
    p.add_argument("--cache-dir", default=CACHE_DIR)
    a = p.parse_args(argv)
    for form, path in generate(a.split, a.n_prompts, seed=a.seed, policy=a.policy, cache_dir=a.cache_dir).items():
        print(f"{form}: {path}")


if __name__ == "__main__":
    main()
