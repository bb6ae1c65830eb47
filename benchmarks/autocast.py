"""bf16 autocast against float32 on this machine: one trainer micro-batch, one scoring pass and one generate call of
the compute-bound job (examples/arith_scratch_grpo.yaml: the 20.5M Llama, 8 prompts x G 8, <= 96 new tokens).

Run: python benchmarks/autocast.py [--model checkpoints/arith-scratch-20m] [--threads 1] [--repeats 5]
Builds the model with the job's model.prepare when it is missing. The batch is the policy's own samples (one generate
call in float32, so the lengths are the job's); then, alternating float32 and bf16 autocast `--repeats` times each:
  train   forward + loss + backward of the 64 rows as the trainer runs them (response_logprobs, shared prompts)
  score   the same forward without gradients (a scoring worker's pass)
  generate one generate call of the hf engine (8 prompts x 8, the loop sampler), tokens/s; and the same call with
           the weights held in bf16 (`rollout.dtype: bfloat16`: no autocast, no per-matmul casts) in each round
and prints the medians, the bf16/float32 time ratios, and how far bf16 log-probs are from float32 ones on the batch
(|delta log p| mean and max over response tokens: what `mismatch/*` would show between a bf16 and a float32 actor).
Prints whether this CPU has native bf16 (`actors.precision.cpu_has_native_bf16`) and the load average: timings move
with whatever else runs on the machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from actors.batch import collate  # noqa: E402
from actors.engines.hf import HFEngine  # noqa: E402
from actors.modeling import encode_prompts, load_causal_lm, load_tokenizer, response_logprobs  # noqa: E402
from actors.precision import autocast, cpu_has_native_bf16  # noqa: E402
from actors.records import SamplingParams, TrainBatch  # noqa: E402


def sample_batch(engine: HFEngine, prompts: list[list[int]], g: int, max_new: int, seed: int
                 ) -> tuple[TrainBatch, float]:
    """The policy's own completions (float32) collated as the trainer gets them, and the seconds generate took."""
    t = time.perf_counter()
    groups = engine.generate(prompts, SamplingParams(n=g, max_new_tokens=max_new, temperature=1.0), seed)
    seconds = time.perf_counter() - t
    completions = [c for group in groups for c in group]
    batch = collate([p for p in prompts for _ in range(g)], [c.token_ids for c in completions], pad_id=0)
    mask = batch["response_mask"]  # [B, T]
    logp = torch.zeros(mask.shape)
    for i, c in enumerate(completions):
        logp[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    adv = torch.randn(mask.shape[0], 1).expand_as(mask) * mask  # [B, T]
    return TrainBatch(**batch, rollout_logp=logp, old_logp=logp, advantages=adv), seconds


def train_pass(model, batch: TrainBatch, bf16: bool) -> torch.Tensor:
    """The trainer's forward (autocast) + a token-mean policy-gradient loss in float32 + backward; the log-probs."""
    with autocast(bf16, "cpu"):
        logp, _ = response_logprobs(model, batch, 1.0, True)  # [B, T], float32
    mask = batch.response_mask
    loss = -(logp * batch.advantages * mask).sum() / mask.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return logp.detach()


@torch.no_grad()
def score_pass(model, batch: TrainBatch, bf16: bool) -> torch.Tensor:
    with autocast(bf16, "cpu"):
        return response_logprobs(model, batch, 1.0, True)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="checkpoints/arith-scratch-20m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if not Path(args.model, "config.json").is_file():
        from examples.scratch.warmstart import prepare

        prepare(args.model)
    from examples.scratch.task import make_rows

    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model)
    engine = HFEngine.from_model(model.eval(), tok)
    held_bf16 = HFEngine.from_model(copy.deepcopy(model).to(torch.bfloat16).eval(), tok)  # rollout.dtype: bfloat16
    prompts = encode_prompts(tok, [r["prompt"] for r in make_rows("train", args.prompts, seed=1)])
    batch, _ = sample_batch(engine, prompts, args.group_size, args.max_new_tokens, seed=0)
    tokens = int(batch.response_mask.sum())
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; {args.threads} thread(s); batch {batch.rows} rows, "
          f"{batch.input_ids.shape[1]} columns, {tokens} response tokens; load {os.getloadavg()[0]:.2f}")

    times: dict[str, dict[bool, list[float]]] = {k: {False: [], True: []} for k in ("train", "score", "generate")}
    gen_tokens: dict[bool, int] = {}
    held_times, held_tokens = [], 0  # generate with the weights held in bf16
    sampling = SamplingParams(n=args.group_size, max_new_tokens=args.max_new_tokens, temperature=1.0)
    for i in range(args.repeats + 1):  # the first round warms up and is not counted
        for bf16 in ((False, True) if i % 2 == 0 else (True, False)):
            model.train()
            t0 = time.perf_counter()
            train_pass(model, batch, bf16)
            t1 = time.perf_counter()
            model.eval()
            score_pass(model, batch, bf16)
            t2 = time.perf_counter()
            with autocast(bf16, "cpu"):
                groups = engine.generate(prompts, sampling, seed=100 + i)
            t3 = time.perf_counter()
            if i:
                for key, dt in (("train", t1 - t0), ("score", t2 - t1), ("generate", t3 - t2)):
                    times[key][bf16].append(dt)
                gen_tokens[bf16] = gen_tokens.get(bf16, 0) + sum(len(c.token_ids) for g in groups for c in g)
        t = time.perf_counter()
        groups = held_bf16.generate(prompts, sampling, seed=100 + i)
        if i:
            held_times.append(time.perf_counter() - t)
            held_tokens += sum(len(c.token_ids) for g in groups for c in g)
    print(f"{'':10}{'float32 s':>11}{'bf16 s':>9}{'bf16/fp32':>11}")
    for key, by in times.items():
        a, b = statistics.median(by[False]), statistics.median(by[True])
        print(f"{key:10}{a:>11.3f}{b:>9.3f}{b / a:>11.2f}")
    for bf16 in (False, True):
        print(f"generate {'bf16' if bf16 else 'float32'}: {gen_tokens[bf16] / sum(times['generate'][bf16]):.0f} "
              "tokens/s")
    g32 = statistics.median(times["generate"][False])
    print(f"generate, weights held in bf16: {statistics.median(held_times):.3f} s ({statistics.median(held_times) / g32:.2f}"
          f" of float32), {held_tokens / sum(held_times):.0f} tokens/s")
    fp32, bf = score_pass(model, batch, False), score_pass(model, batch, True)
    gap = ((bf - fp32).abs() * batch.response_mask)
    print(f"|log p bf16 - log p float32| over response tokens: mean {float(gap.sum()) / tokens:.2e}, "
          f"max {float(gap.max()):.2e}; load {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
