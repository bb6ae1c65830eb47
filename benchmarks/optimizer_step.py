"""The trainer's optimizer step in isolation: DeepSpeed's `engine.step()` under each ZeRO stage and torch AdamW path.

Run: python benchmarks/optimizer_step.py [--hidden 256] [--layers 4] [--repeats 30] [--threads 1]
Builds a Llama from config (default about 3.2M parameters, the size issue 20 measured), wraps it in a one-rank
DeepSpeed engine (gloo, CPU) the way `actors.trainer.DeepSpeedRank` does, and times, per variant, the median of
`engine.backward` (of a fixed loss) and of the optimizer step: `engine.step()` (gradient clipping, AdamW, ZeRO's
copies) and, under stage 0, the trainer's own gradient clip before it (`actors.trainer.clips_itself`). The variants
run interleaved, one step each in turn, so machine load hits them alike. `--profile VARIANT` prints torch's
profiler table of that variant's step instead.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

# (zero_stage, AdamW implementation): "for" is torch's per-tensor loop (its CPU default), "foreach" the
# multi-tensor path, "fused" the single fused kernel.
VARIANTS = {"zero2-for": (2, "for"), "zero0-for": (0, "for"), "zero0-foreach": (0, "foreach"),
            "zero0-fused": (0, "fused"), "zero1-fused": (1, "fused"), "zero2-fused": (2, "fused")}


def build(hidden: int, layers: int, zero: int, impl: str, seed: int = 0):
    """A one-rank DeepSpeed engine around a fresh Llama, with `actors.trainer.make_optimizer`'s AdamW."""
    import deepspeed
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.trainer import ds_config, make_optimizer

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    opt = make_optimizer(list(model.parameters()), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, impl=impl)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(64, 1, 1, zero, 1.0, "float32"))
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--profile", choices=list(VARIANTS))
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import torch

    from actors.deepspeed_ops import load_shm_comm
    from actors.trainer import clips_itself

    torch.set_num_threads(args.threads)
    load_shm_comm()
    deepspeed.init_distributed("gloo")
    names = [args.profile] if args.profile else args.variants
    engines = {n: build(args.hidden, args.layers, *VARIANTS[n]) for n in names}
    params = sum(p.numel() for p in next(iter(engines.values())).module.parameters())
    ids = torch.randint(0, 64, (16, 48), generator=torch.Generator().manual_seed(1))
    times: dict[str, dict[str, list[float]]] = {n: {"backward": [], "step": []} for n in names}

    def one(name: str) -> None:
        engine = engines[name]
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        if clips_itself(VARIANTS[name][0], "float32"):  # as `DeepSpeedRank.train_step`: DeepSpeed does not clip here
            torch.nn.utils.clip_grad_norm_(list(engine.module.parameters()), 1.0, foreach=True)
        engine.step()
        t2 = time.perf_counter()
        times[name]["backward"].append(t1 - t0)
        times[name]["step"].append(t2 - t1)

    for name in names:  # warm-up
        one(name)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                one(args.profile)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    for _ in range(args.repeats):
        for name in names:
            one(name)
    print(f"{params / 1e6:.2f}M parameters, {args.threads} thread(s), medians of {args.repeats} interleaved steps, "
          f"load average {os.getloadavg()[0]:.2f}")
    base = statistics.median(times[names[0]]["step"])
    print(f"{'variant':16} {'fwd+bwd ms':>11} {'step ms':>9} {'step vs ' + names[0]:>18}")
    for name in names:
        fb, st = statistics.median(times[name]["backward"]), statistics.median(times[name]["step"])
        print(f"{name:16} {fb * 1e3:>11.1f} {st * 1e3:>9.2f} {st / base:>17.2f}x")


if __name__ == "__main__":
    main()
