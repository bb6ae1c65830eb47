"""bf16 autocast (`actors.precision`, the `*.autocast` switches): the CPU check that decides `auto`, the config's
checks, and that under bf16 the trainer's, the scoring worker's and the hf engine's matmuls really run in bf16 while
weights, gradients, optimizer state, log-probs and losses stay float32, with an update close to the float32 one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from actors.batch import compact
from actors.precision import cpu_flags, cpu_has_native_bf16, describe, use_bf16_autocast
from actors.records import Shard
from actors.trainer import PolicyTrainer
from actors.weights import unpack_state_dict
from orchestrator.config import AlgorithmConfig, JobConfig, ModelConfig, TrainerConfig
from tests.conftest import base_config, in_process_ranks
from tests.test_trainer_dp import synthetic_batch


def cpuinfo(*flags: str, cpus: int = 2) -> str:
    """/proc/cpuinfo text of `cpus` logical CPUs with `flags` (plus the other lines an x86 kernel writes)."""
    block = ("processor\t: {i}\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC (fake, avx512_bf16 in the name "
             "does not count)\nflags\t\t: fpu sse sse2 {flags}\nbugs\t\t: sysret_ss_attrs\n\n")
    return "".join(block.format(i=i, flags=" ".join(flags)) for i in range(cpus))


AVX2 = cpuinfo("avx", "avx2", "fma", "f16c")
AVX512_NO_BF16 = cpuinfo("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")  # emulates bf16: off
ZEN4 = cpuinfo("avx2", "avx512f", "avx512bw", "avx512_bf16")
SAPPHIRE_RAPIDS = cpuinfo("avx2", "avx512f", "amx_tile", "amx_bf16", "amx_int8")


def test_flags_are_read_from_the_flags_lines_only():
    assert cpu_flags(ZEN4) >= {"fpu", "avx2", "avx512_bf16"} and "AMD" not in cpu_flags(ZEN4)
    assert "sysret_ss_attrs" not in cpu_flags(ZEN4)  # a `bugs` line
    assert cpu_flags("") == set() and cpu_flags("model name\t: avx512_bf16\n") == set()


@pytest.mark.parametrize("text, native", [(AVX2, False), (AVX512_NO_BF16, False), (ZEN4, True),
                                          (SAPPHIRE_RAPIDS, True), ("", False)],
                         ids=["avx2", "avx512-without-bf16", "avx512_bf16", "amx_bf16", "empty"])
def test_auto_is_bf16_only_on_a_cpu_with_native_bf16(text, native):
    assert cpu_has_native_bf16(text) is native
    assert use_bf16_autocast("auto", "cpu", text) is native
    assert use_bf16_autocast("off", "cpu", text) is False  # the explicit modes ignore the flags
    assert use_bf16_autocast("bf16", "cpu", text) is True


def test_auto_on_cuda_asks_torch_and_bad_modes_are_refused():
    expected = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert use_bf16_autocast("auto", "cuda", AVX2) is expected  # the host CPU's flags do not decide for a GPU
    with pytest.raises(ValueError, match="autocast must be one of"):
        use_bf16_autocast("fp16", "cpu", ZEN4)
    assert "emulated" in describe("auto", False, "cpu") and "avx512_bf16" in describe("auto", True, "cpu")
    assert describe("bf16", True, "cpu").startswith("autocast bf16: bf16 forward passes on cpu")


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file() or not hasattr(torch.cpu, "_is_avx512_bf16_supported"),
                    reason="needs Linux's /proc/cpuinfo and torch's CPUID check")
def test_this_machines_flags_agree_with_torchs_cpuid_check():
    """An independent reading of the same hardware: torch's cpuinfo library asks CPUID itself."""
    flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    assert ("avx512_bf16" in flags) == bool(torch.cpu._is_avx512_bf16_supported())
    assert ("amx_tile" in flags) == bool(torch.cpu._is_amx_tile_supported())


def test_without_proc_cpuinfo_torchs_cpuid_check_answers(monkeypatch, tmp_path):
    from actors import precision

    monkeypatch.setattr(precision, "CPUINFO", tmp_path / "no-cpuinfo")  # not Linux
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert cpu_has_native_bf16() is (avx512_bf16 or amx)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert cpu_has_native_bf16() is False  # no way to tell: float32, never an assumed bf16


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("pool", ["rollout", "scoring", "trainer"])
def test_config_takes_the_three_modes_and_refuses_others(pool):
    assert getattr(JobConfig.model_validate(base_config("unused")), pool).autocast == "off"  # the default
    for mode in ("off", "bf16", "auto"):
        cfg = JobConfig.model_validate(base_config("unused", **{pool: {"autocast": mode}}))
        assert getattr(cfg, pool).autocast == mode
    with pytest.raises(ValueError, match=f"{pool}.autocast"):
        JobConfig.model_validate(base_config("unused", **{pool: {"autocast": "fp16"}}))
    with pytest.raises(ValueError, match=f"{pool}.autocast: bf16 autocast keeps float32 weights"):
        JobConfig.model_validate(base_config("unused", model={"path": "unused", "dtype": "bfloat16"},
                                             **{pool: {"autocast": "auto"}}))


def test_rollout_autocast_is_for_the_hf_engine_and_reaches_every_actor():
    with pytest.raises(ValueError, match="rollout.autocast: applies to the hf engine"):
        JobConfig.model_validate(base_config("unused", rollout={"engine": "vllm", "num_gpus": 1, "autocast": "bf16"}))
    from orchestrator.pool_specs import pool_specs

    cfg = JobConfig.model_validate(base_config(
        "unused", rollout={"autocast": "bf16"}, scoring={"autocast": "auto"}, trainer={"autocast": "bf16"},
        algorithm={"kl_coef": 0.1, "estimator": "gae"}))
    specs = {s.name: s for s in pool_specs(cfg, "unused", [])}
    assert specs["rollout"].kwargs[0]["engine_options"] == {"autocast": "bf16", "weights_dtype": "model"}
    assert specs["scoring"].kwargs[0]["autocast"] == "auto"
    assert specs["trainer"].kwargs[0]["trainer"]["autocast"] == "bf16"
    assert specs["critic"].kwargs[0]["trainer"]["autocast"] == "bf16"  # the critic follows trainer.autocast


# ----------------------------------------------------------------------------- the actors' forward passes


def linear_output_dtypes(model: torch.nn.Module) -> tuple[list[torch.dtype], list]:
    """Forward hooks on every Linear layer of `model` recording its output dtype; (the list, the hook handles)."""
    seen: list[torch.dtype] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


LR = 1e-2


def vocab_size(path: str) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).vocab_size


@pytest.fixture()
def make_rank(tiny_model):
    """Builds one-rank PolicyTrainers in this process with a given trainer.autocast (one process group for all)."""
    def make(mode: str, critic: bool = False, **algorithm) -> PolicyTrainer:
        trainer = TrainerConfig(lr=LR, micro_batch_size=64, grad_clip=1e9, autocast=mode).model_dump()
        model = ModelConfig(path=tiny_model).model_dump()
        if critic:
            from actors.critic import CriticTrainer

            rank = CriticTrainer(0, 1, model, trainer, None, "token-mean", 1, 1, 0)
        else:
            rank = PolicyTrainer(0, 1, model, trainer, AlgorithmConfig(**algorithm).model_dump(), 1.0, 8, 1, 1, 0)
        rank.setup("127.0.0.1", 0) if torch.distributed.is_initialized() else rank.setup(*rank.rendezvous())
        return rank

    with in_process_ranks():
        yield make


def one_step(rank: PolicyTrainer, batch) -> tuple[dict[str, torch.Tensor], dict, list[torch.dtype]]:
    """(weights after one train step on `batch`, its stats, the dtypes the Linear layers put out during it)."""
    seen, hooks = linear_output_dtypes(rank.engine.module)
    stats = rank.train_step([compact(Shard(batch, float(batch.response_mask.sum())))], 0.0)
    for h in hooks:
        h.remove()
    return unpack_state_dict(rank.state_dict()), stats, seen


def test_bf16_trainer_runs_its_matmuls_in_bf16_keeps_float32_state_and_steps_like_float32(make_rank, tiny_model):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    fp32, bf16 = make_rank("off"), make_rank("bf16")
    batch = synthetic_batch(16, vocab=fp32.engine.module.config.vocab_size, seed=5)
    w32, s32, seen32 = one_step(fp32, batch)
    w16, s16, seen16 = one_step(bf16, batch)
    assert (s32["train/autocast_bf16"], s16["train/autocast_bf16"]) == (0.0, 1.0)
    assert seen32 and set(seen32) == {torch.float32}
    assert seen16 and set(seen16) == {torch.bfloat16}  # every Linear (attention, MLP, LM head) ran in bf16
    # fp32 master weights and optimizer: parameters, gradients (accumulated in the parameters' dtype) and AdamW's
    # moments are all float32 after a bf16 step
    module = bf16.engine.module
    assert {p.dtype for p in module.parameters()} == {torch.float32}
    state = bf16.engine.optimizer.state
    assert state and {t.dtype for s in state.values() for t in s.values() if t.dim() > 0} == {torch.float32}
    for k in w32:
        assert w16[k].dtype == torch.float32, k

    # One AdamW step from zero moments moves each weight by about lr * g / |g| (the bias-corrected first step), so
    # the update is (nearly) the sign pattern of the gradient, lr in size. bf16 (8 bits of mantissa, relative error
    # ~0.4% per rounding) perturbs each gradient element a little: only elements whose gradient is near 0 may flip
    # sign. So the two updates point the same way overall (cosine > 0.9) and have the same size (within 10%),
    # while the update of another batch is nearly orthogonal (checked below, so the bound is not trivially met).
    def delta(w):
        return torch.cat([(w[k] - initial[k]).flatten() for k in w32])

    d32, d16 = delta(w32), delta(w16)
    cos = float(torch.nn.functional.cosine_similarity(d32, d16, dim=0))
    assert cos > 0.9, cos
    assert float(d16.norm() / d32.norm()) == pytest.approx(1.0, abs=0.1)
    assert float(d32.abs().max()) == pytest.approx(LR, rel=0.05)  # the first Adam step: lr per element at most
    assert s16["loss"] == pytest.approx(s32["loss"], abs=2e-2 * max(1.0, abs(s32["loss"])))

    other = make_rank("off")  # the float32 update of a different batch: far from d32
    w_other, _, _ = one_step(other, synthetic_batch(16, vocab=fp32.engine.module.config.vocab_size, seed=6))
    assert float(torch.nn.functional.cosine_similarity(d32, delta(w_other), dim=0)) < 0.5


def test_bf16_losses_and_logprobs_are_float32(make_rank):
    """The forward runs under autocast; `response_logprobs` casts the logits to float32, so the objective sees
    float32 log-probs and logits (entropy, ratio, KL) and returns a float32 loss."""
    rank = make_rank("bf16")
    batch = synthetic_batch(8, vocab=rank.engine.module.config.vocab_size, seed=1)
    rank.before_update = False
    with rank.autocast():
        loss, stats, _, logits = rank._micro_loss(batch.trim(), float(batch.response_mask.sum()))
    assert loss.dtype == torch.float32 and logits.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in stats.values() if torch.is_tensor(v))


def test_decoupled_proximal_pass_runs_in_the_updates_precision(make_rank):
    """Decoupled PPO recomputes pi_prox before the first update; under bf16 it must run in bf16 too, or the first
    update's ratio pi / pi_prox would carry the bf16-float32 gap (~1e-3 per token) instead of being exactly 1."""
    rank = make_rank("bf16", decoupled=True)
    batch = synthetic_batch(16, vocab=rank.engine.module.config.vocab_size, seed=4)
    stats = rank.train_step([compact(Shard(batch, float(batch.response_mask.sum())))], 0.0)
    assert stats["ratio_max"] == pytest.approx(1.0, abs=1e-6) and abs(stats["approx_kl"]) < 1e-9, stats
    assert stats["train/autocast_bf16"] == 1.0


def test_bf16_critic_runs_in_bf16_and_its_value_loss_is_float32(make_rank):
    """The critic follows trainer.autocast: its Linear layers put out bf16, its values and loss are float32. Its head
    starts at zero, so V = 0 exactly in either precision and the first loss is ½ mean R² (as in test_ppo)."""
    from tests.test_ppo import _synthetic

    critic = make_rank("bf16", critic=True)
    batch = _synthetic(8, vocab=critic.engine.module.config.vocab_size, seed=0)
    seen, hooks = linear_output_dtypes(critic.engine.module)
    stats = critic.train_step([compact(Shard(batch, float(batch.response_mask.sum())))])
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16} and stats["train/autocast_bf16"] == 1.0
    expected = 0.5 * float((batch.returns ** 2).sum() / batch.response_mask.sum())
    assert stats["critic/value_loss"] == pytest.approx(expected, rel=1e-5)
    assert {p.dtype for p in critic.engine.module.parameters()} == {torch.float32}


def test_bf16_scoring_and_generation_run_in_bf16_with_float32_logprobs_near_float32(tiny_model):
    """Scoring worker and hf engine with autocast bf16: their Linear layers put out bf16, their log-probs are float32
    and near the float32 ones (bf16 rounding of a 2-layer model: ~1e-2 in log p; a wrong forward is off by O(1))."""
    from actors.engines.hf import HFEngine
    from actors.records import SamplingParams
    from actors.scoring import ScoringWorker

    threads = torch.get_num_threads()
    try:
        batch = synthetic_batch(8, vocab=vocab_size(tiny_model), seed=2)
        scores = {}
        for mode in ("off", "bf16"):
            worker = ScoringWorker(tiny_model, with_reference=True, with_policy=False, threads=1, autocast=mode)
            seen, _ = linear_output_dtypes(worker.reference)
            logp = worker._logprobs(worker.reference, batch)
            assert set(seen) == {torch.float32 if mode == "off" else torch.bfloat16}
            scores[mode] = torch.tensor([x for row in logp for x in row])
        gap = (scores["bf16"] - scores["off"]).abs()
        assert 0 < float(gap.max()) < 0.1, gap.max()

        sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=6)
        runs = {}
        for mode in ("off", "bf16"):
            engine = HFEngine(tiny_model, autocast=mode)
            seen, _ = linear_output_dtypes(engine.model)
            runs[mode] = engine.generate([[5, 6, 7], [8, 9]], sampling, seed=3)
            assert set(seen) == {torch.float32 if mode == "off" else torch.bfloat16}
        pairs = list(zip((c for g in runs["off"] for c in g), (c for g in runs["bf16"] for c in g)))
        same = [(a, b) for a, b in pairs if a.token_ids == b.token_ids]  # bf16 may move a draw across a boundary
        assert len(same) >= len(pairs) // 2, "the same seed should mostly draw the same tokens"
        assert all(abs(x - y) < 0.1 for a, b in same for x, y in zip(a.logprobs, b.logprobs))
    finally:
        torch.set_num_threads(threads)
