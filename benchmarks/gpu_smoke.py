"""The hf engine and one policy update on a CUDA GPU in bf16, without Ray or DeepSpeed (issue 20's GPU check).

Run: python benchmarks/gpu_smoke.py [--device cuda] [--prompts 64] [--group 8] [--max-new-tokens 96] [--repeats 2]
     python benchmarks/gpu_smoke.py --device cpu --prompts 2 --group 2 --max-new-tokens 8 --layers 1   # a dry run

The model has the compute-bound job's shape (`examples.scratch.warmstart.SIZE`, 20.5M parameters) with random
weights, built from config into a temporary folder; prompts are scratchpad-addition training prompts. It prints:
* generation-only tokens/s of the `hf` engine's KV-cache loop and of Hugging Face `generate` with bf16 weights, and
  of the loop with float32 weights under `rollout.autocast: bf16`, on the same prompts (a warm-up call first, then
  `--repeats` timed calls each);
* the seconds of one policy update on the sampled rows, float32 and under `trainer.autocast: bf16`, the trainer's own
  pieces: `response_logprobs` (under `actors.precision.autocast`), the PPO-clip token-mean loss (`algorithms.losses.policy_loss`, the default objective's core), backward, the trainer's clip and a fused AdamW step, fp32 master weights (a warm-up update first).
Ray, DeepSpeed and pydantic are not needed (the GPU image lacks the first two), so this is the trainer's computation,
not its actor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

# Run as a script, this folder is sys.path[0]; the project root must be importable instead.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))

import torch  # noqa: E402


def build_model(path: str, layers: int) -> None:
    """The compute-bound job's Llama shape, random weights, and the example's tokenizer, saved at `path`."""
    from transformers import LlamaForCausalLM

    from examples.arith.model import tiny_config
    from examples.arith.tokenizer import build_tokenizer
    from examples.scratch.warmstart import SIZE

    tokenizer = build_tokenizer(max_length=256)
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config(tokenizer, **(SIZE | {"num_hidden_layers": layers}))).save_pretrained(path)
    tokenizer.save_pretrained(path)


def timed(fn, sync) -> float:
    """Seconds `fn()` takes, the device synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None, help="override the model's layer count (dry runs)")
    args = ap.parse_args()

    from actors.batch import collate
    from actors.engines.hf import HFEngine
    from actors.modeling import encode_prompts, response_logprobs
    from actors.precision import autocast
    from actors.records import SamplingParams, TrainBatch
    from actors.trainer import make_optimizer
    from algorithms.losses import policy_loss
    from examples.scratch.task import make_rows
    from examples.scratch.warmstart import SIZE

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}", flush=True)
    path = tempfile.mkdtemp(prefix="gpu-smoke-")
    build_model(path, args.layers or SIZE["num_hidden_layers"])
    rows = make_rows("train", args.prompts, seed=3)
    sampling = SamplingParams(n=args.group, temperature=1.0, max_new_tokens=args.max_new_tokens)

    groups = None
    for sampler, dtype, cast in (("loop", "bfloat16", "off"), ("generate", "bfloat16", "off"), ("loop", "float32", "bf16")):
        name = f"{sampler}, {dtype} weights, autocast {cast}"
        engine = HFEngine(path, dtype=dtype, device=args.device, sampler=sampler, autocast=cast)
        prompts = encode_prompts(engine.tokenizer, [r["prompt"] for r in rows])
        engine.generate(prompts[:8], sampling, seed=0)  # warm-up
        rates = []
        for k in range(args.repeats):
            out = []
            seconds = timed(lambda: out.append(engine.generate(prompts, sampling, seed=1 + k)), sync)
            tokens = sum(len(c.token_ids) for g in out[0] for c in g)
            rates.append(tokens / seconds)
            print(f"generate [{name}]: {tokens} tokens in {seconds:.3f} s, {tokens / seconds:,.0f} tokens/s",
                  flush=True)
            groups = groups or (prompts, out[0], engine.tokenizer)
        print(f"generate [{name}] median {statistics.median(rates):,.0f} tokens/s", flush=True)
        del engine

    prompts, out, tokenizer = groups
    pairs = [(p, c.token_ids or [tokenizer.eos_token_id]) for p, g in zip(prompts, out) for c in g]
    cols = collate([p for p, _ in pairs], [r for _, r in pairs], tokenizer.pad_token_id)
    mask = cols["response_mask"]
    torch.manual_seed(0)
    batch = TrainBatch(**cols, rollout_logp=torch.zeros_like(mask), old_logp=torch.zeros_like(mask),
                       advantages=torch.randn(mask.shape[0], 1) * mask)
    batch = TrainBatch(**{k: v.to(args.device) for k, v in batch.tensors().items()})

    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path).to(args.device).train()  # fp32 master weights
    optimizer = make_optimizer(list(model.parameters()), 1e-5, (0.9, 0.999), 0.0, impl="fused")

    def update(bf16: bool) -> None:
        with autocast(bf16, args.device):
            logp, _ = response_logprobs(model, batch, 1.0)
        loss, _ = policy_loss(logp.float(), batch.old_logp, batch.advantages, batch.response_mask, 0.2, 0.2, "token-mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for bf16 in (False, True):
        update(bf16)  # warm-up
        seconds = [timed(lambda: update(bf16), sync) for _ in range(args.repeats)]
        print(f"policy update, {'bf16 autocast' if bf16 else 'float32'}: {mask.shape[0]} rows, {int(mask.sum())} response tokens, "
              f"median {statistics.median(seconds):.3f} s ({int(mask.sum()) / statistics.median(seconds):,.0f} "
              "trained tokens/s)", flush=True)


if __name__ == "__main__":
    main()
