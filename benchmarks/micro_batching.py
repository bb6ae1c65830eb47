"""The trainer's forward/backward on one step's batch, with each `trainer.micro_batch_split_tokens` setting.

Run: python benchmarks/micro_batching.py [--config examples/arith_scratch_grpo.yaml] [--split null 256 32 0]
     [--repeats 5] [--threads 1] [--autocast bf16]
Samples one step of the config's job (prompts_per_step x group_size completions) with the `hf` engine from its model
(the checkpoint must exist: a run of the config builds it), shards it as the orchestrator does for one trainer rank
with each setting (`null`: the equal slices of before), and times the forward, loss and backward of every micro-batch
(`actors.modeling.response_logprobs`, a token-mean policy-gradient surrogate), settings interleaved so machine load
hits them alike. Prints per setting the median seconds (wall, and this process's CPU seconds, which a busy machine
disturbs less), micro-batches, token positions run, padded share and trained tokens per second; the gradients of
every setting are checked against the first's. `--autocast bf16` runs the forwards under bf16 autocast
(`trainer.autocast`), where a position costs less and a cut's fixed cost weighs more.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def sample_batch(cfg, seed: int = 0):
    """One step's groups sampled by the config's model, as a `TrainBatch` with random per-group advantages."""
    import dataclasses

    import torch

    from actors.batch import collate_groups
    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts
    from actors.records import Group, Sample, SamplingParams
    from orchestrator.data import load_rows

    rows = load_rows(cfg.data.train)[: cfg.loop.prompts_per_step]
    engine = HFEngine(cfg.model.path)
    ids = encode_prompts(engine.tokenizer, [r[cfg.data.prompt_key] for r in rows])
    sampling = SamplingParams(n=cfg.rollout.group_size, temperature=cfg.rollout.temperature,
                              max_new_tokens=cfg.rollout.max_new_tokens)
    completions = engine.generate(ids, sampling, seed=seed)
    groups = [Group(str(i), r[cfg.data.prompt_key], r, p,
                    [Sample(c.token_ids, c.text, c.logprobs, c.finish_reason) for c in cs], 0)
              for i, (r, p, cs) in enumerate(zip(rows, ids, completions))]
    batch = collate_groups(groups, engine.tokenizer.pad_token_id)
    g = torch.Generator().manual_seed(seed)
    mask = batch.response_mask  # [B, T]
    return dataclasses.replace(batch, old_logp=batch.rollout_logp,
                               advantages=torch.randn((batch.rows, 1), generator=g).expand_as(mask) * mask)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="examples/arith_scratch_grpo.yaml")
    ap.add_argument("--split", nargs="+", default=["null", "256", "32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--autocast", choices=["off", "bf16"], default="off", help="trainer.autocast of the forwards")
    args = ap.parse_args()
    import torch

    from actors.modeling import load_causal_lm, response_logprobs
    from actors.precision import autocast
    from actors.trainer import micro_parts
    from orchestrator.batching import shard
    from orchestrator.config import load_config
    from orchestrator.pool_specs import TrainPlan

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    batch = sample_batch(cfg)
    plan = TrainPlan.of(cfg, 1)
    settings = {s: None if s in ("null", "none") else int(s) for s in args.split}
    shards = {s: shard(batch, 1, 1, "token-mean", False, plan.grad_accum, plan.micro_batch_size, v,
                       cfg.model.share_prompt_forward)[0][0] for s, v in settings.items()}
    model = load_causal_lm(cfg.model.path).train()
    units = float(batch.response_mask.sum())

    def step(part) -> tuple[float, float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        start, cpu = time.perf_counter(), time.process_time()
        for rows, filler in micro_parts(part, plan.grad_accum):
            micro = part.rows.select(rows).trim()
            with autocast(args.autocast == "bf16", "cpu"):
                logp, _ = response_logprobs(model, micro, cfg.rollout.temperature, cfg.model.share_prompt_forward)
            loss = -(logp * micro.advantages * micro.response_mask).sum() / units  # [b, t] -> the token-mean surrogate
            (loss * 0.0 if filler else loss).backward()
        return time.perf_counter() - start, time.process_time() - cpu, [p.grad.clone() for p in model.parameters()]

    times: dict[str, list[float]] = {s: [] for s in settings}
    cpu_times: dict[str, list[float]] = {s: [] for s in settings}
    reference = None
    for _ in range(args.repeats):
        for s, part in shards.items():
            seconds, cpu, grads = step(part)
            times[s].append(seconds)
            cpu_times[s].append(cpu)
            reference = grads if reference is None else reference
            err = max(float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(grads, reference))
            assert err < (1e-4 if args.autocast == "off" else 0.1), (s, err)  # bf16: rounded in another order
    tokens = int(batch.response_mask.sum())
    print(f"{args.config}: {batch.rows} rows, {tokens} response tokens; {args.threads} thread(s); autocast "
          f"{args.autocast}; load average "
          f"{os.getloadavg()[0]:.2f}")
    print("split_tokens  micro-batches  positions  padding_frac  seconds (median, min)  CPU s (median)  trained tokens/s")
    for s, part in shards.items():
        micro = [part.rows.select(r).trim() for r, _ in micro_parts(part, plan.grad_accum)]
        positions = sum(m.input_ids.numel() for m in micro)
        real = sum(int(m.attention_mask.sum()) for (r, f), m in zip(micro_parts(part, plan.grad_accum), micro) if not f)
        med = statistics.median(times[s])
        print(f"{s:>12}  {len(micro):>13}  {positions:>9}  {1 - real / positions:>12.3f}  "
              f"{med:>8.3f} {min(times[s]):>8.3f}         {statistics.median(cpu_times[s]):>8.3f}  {tokens / med:>10.0f}")


if __name__ == "__main__":
    main()
