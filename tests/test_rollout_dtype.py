"""`rollout.dtype`: the hf engine holding its weights in bf16 while the trainer keeps float32. What `auto` picks, the
config's checks, that the engine's matmuls and weights really are bf16, that its log-probs are the bf16 policy's own
(checked against a full forward of that policy, not the engine's cached decode), and that weight syncs and checksums
still answer for the trainer's float32 weights, in process and through Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.modeling import load_causal_lm, token_logprobs
from actors.precision import rollout_dtype
from actors.records import SamplingParams
from actors.weights import pack_state_dict, state_checksum, weights_checksum
from orchestrator.config import JobConfig
from tests.conftest import base_config
from tests.test_precision import AVX2, AVX512_NO_BF16, SAPPHIRE_RAPIDS, ZEN4, linear_output_dtypes

SAMPLING = SamplingParams(n=3, temperature=1.0, max_new_tokens=6)
PROMPTS = [[5, 6, 7], [8, 9]]


@pytest.mark.parametrize("mode, cpuinfo, held", [
    ("model", ZEN4, "float32"), ("auto", ZEN4, "bfloat16"), ("auto", SAPPHIRE_RAPIDS, "bfloat16"),
    ("auto", AVX2, "float32"), ("auto", AVX512_NO_BF16, "float32"), ("bfloat16", AVX2, "bfloat16"),
    ("float16", ZEN4, "float16")])
def test_auto_holds_bf16_only_where_bf16_is_native(mode, cpuinfo, held):
    assert rollout_dtype(mode, "float32", "cpu", cpuinfo) == held


def test_model_keeps_the_models_dtype_and_bad_modes_are_refused():
    assert rollout_dtype("model", "bfloat16", "cpu", AVX2) == "bfloat16"
    assert rollout_dtype("auto", "float16", "cpu", AVX2) == "float16"  # not native: the model's own dtype
    with pytest.raises(ValueError, match="rollout.dtype must be one of"):
        rollout_dtype("bf16", "float32", "cpu", ZEN4)


def test_config_default_checks_and_wiring():
    from orchestrator.pool_specs import pool_specs

    assert JobConfig.model_validate(base_config("unused")).rollout.dtype == "model"
    with pytest.raises(ValueError, match="rollout.dtype"):
        JobConfig.model_validate(base_config("unused", rollout={"dtype": "bf16"}))
    with pytest.raises(ValueError, match="rollout.dtype: applies to the hf engine"):
        JobConfig.model_validate(base_config("unused", rollout={"engine": "vllm", "num_gpus": 1, "dtype": "auto"}))
    with pytest.raises(ValueError, match="rollout.dtype bfloat16 with rollout.autocast bf16"):
        JobConfig.model_validate(base_config("unused", rollout={"dtype": "bfloat16", "autocast": "bf16"}))
    cfg = JobConfig.model_validate(base_config("unused", rollout={"dtype": "auto"}))
    rollout = {s.name: s for s in pool_specs(cfg, "unused", [])}["rollout"]
    assert rollout.kwargs[0]["engine_options"] == {"autocast": "off", "weights_dtype": "auto"}


def test_bf16_weights_sample_with_their_own_logprobs_and_answer_for_the_trainers_weights(tiny_model):
    """The engine's weights and matmuls are bf16; each sampled token's log-prob is the bf16 policy's (a full,
    uncached forward of the held weights gives the same to bf16 rounding, while the float32 policy's differ more
    than that); its checksum is the float32 checkpoint's, then each sync's float32 state's."""
    from actors.engines.hf import HFEngine

    threads = torch.get_num_threads()
    try:
        engine = HFEngine(tiny_model, weights_dtype="bfloat16")
        assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}
        seen, _ = linear_output_dtypes(engine.model)
        groups = engine.generate(PROMPTS, SAMPLING, seed=3)
        assert set(seen) == {torch.bfloat16}
        fp32 = load_causal_lm(tiny_model)
        own, other = [], []
        for prompt, group in zip(PROMPTS, groups):
            for c in group:
                assert all(isinstance(x, float) for x in c.logprobs) and len(c.logprobs) == len(c.token_ids)
                ids = torch.tensor([prompt + c.token_ids])
                for model, out in ((engine.model, own), (fp32, other)):
                    with torch.no_grad():
                        logits = model(input_ids=ids).logits[:, len(prompt) - 1 : -1].float()  # [1, T, V]
                    full = token_logprobs(logits, ids[:, len(prompt):], SAMPLING.temperature)[0]
                    out.append((torch.tensor(c.logprobs) - full).abs())
        own_gap, other_gap = torch.cat(own), torch.cat(other)
        assert float(own_gap.max()) < 0.05, own_gap.max()
        assert float(own_gap.mean()) < float(other_gap.mean()), (own_gap.mean(), other_gap.mean())

        assert engine.checksum() == weights_checksum(fp32)  # before any sync: the float32 checkpoint's
        with torch.no_grad():
            for p in fp32.parameters():
                p.add_(0.01 * torch.randn_like(p))
        packed = pack_state_dict(fp32)
        engine.load_weights(packed, 1)
        assert engine.checksum() == state_checksum(fp32.state_dict()) == weights_checksum(fp32)
        held = dict(engine.model.named_parameters())
        for name, p in fp32.named_parameters():
            assert held[name].dtype == torch.bfloat16 and torch.equal(held[name], p.to(torch.bfloat16)), name
        assert engine.generate(PROMPTS, SAMPLING, seed=3) != groups  # the new weights sample
    finally:
        torch.set_num_threads(threads)


def test_a_run_with_bf16_rollout_weights_serves_the_trainers_weights_and_logs_the_mismatch(ray_local, tiny_model):
    """Through Ray: after a step the rollout worker reports the trainer's version and float32 checksum, and the
    bf16 behaviour log-probs differ from the trainer's float32 ones by bf16 rounding (mismatch > 0, small)."""
    from orchestrator.batching import kl_controller
    from orchestrator.collect import sampling_params
    from orchestrator.data import load_data
    from orchestrator.loop import Run, train_step
    from orchestrator.pools import Pools

    cfg = JobConfig.model_validate(base_config(tiny_model, rollout={"dtype": "bfloat16"}))
    toy = str(Path(__file__).parent / "data" / "toy_rewards.py")
    pools = Pools(cfg, tiny_model, [("length", f"{toy}:length_reward", 1.0)])
    try:
        run = Run(cfg, pools, load_data(cfg, tiny_model), kl_controller(cfg.algorithm), sampling_params(cfg))
        metrics, _ = train_step(run, version=1)
        assert pools.served_versions() == [(1, pools.trainer_checksums()[0])]
        assert 1e-4 < metrics["mismatch/logprob_abs_mean"] < 0.05, metrics["mismatch/logprob_abs_mean"]
    finally:
        pools.shutdown()
