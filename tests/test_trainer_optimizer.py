"""The trainer's optimizer step (one rank: ZeRO stage 0, fused AdamW, the trainer's own multi-tensor clip) gives the
update of a plain torch computation: the same loss, clipped gradient and AdamW step, computed here without DeepSpeed
or the trainer's code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from actors.batch import compact
from actors.records import Shard
from actors.trainer import PolicyTrainer, effective_zero_stage
from actors.weights import unpack_state_dict
from algorithms.losses import policy_loss
from orchestrator.config import AlgorithmConfig, ModelConfig, TrainerConfig
from tests.conftest import in_process_ranks
from tests.test_trainer_dp import synthetic_batch

LR, CLIP, BETAS = 1e-2, 0.05, (0.9, 0.99)  # a clip far below the gradient norm: clipping is exercised


def test_one_rank_runs_zero_stage_0_and_several_ranks_keep_their_stage():
    assert [effective_zero_stage(s, 1) for s in (0, 1, 2, 3)] == [0, 0, 0, 3]
    assert [effective_zero_stage(s, 2) for s in (0, 1, 2, 3)] == [0, 1, 2, 3]


def reference_step(model_path: str, batch) -> tuple[dict[str, torch.Tensor], float]:
    """The update by hand: token-mean PPO-clip loss over the whole batch, global-norm clip, torch's per-tensor AdamW."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0, foreach=False)
    am = batch.attention_mask  # [B, P+T]
    t = batch.response_mask.shape[1]
    p = am.shape[1] - t
    logits = model(input_ids=batch.input_ids, attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp(min=0)).logits
    logp = F.log_softmax(logits[:, p - 1 : p - 1 + t].float(), -1).gather(-1, batch.input_ids[:, p:, None])[..., 0]
    loss, _ = policy_loss(logp, batch.old_logp, batch.advantages, batch.response_mask, 0.2, 0.2, "token-mean")
    loss.backward()
    norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP, foreach=False))
    opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}, norm


@pytest.fixture()
def one_rank(tiny_model):
    """A one-rank PolicyTrainer in this process (its process group made here, or another module's reused)."""
    with in_process_ranks():
        trainer = TrainerConfig(lr=LR, betas=BETAS, micro_batch_size=64, grad_clip=CLIP).model_dump()  # zero_stage 2
        rank = PolicyTrainer(0, 1, ModelConfig(path=tiny_model).model_dump(), trainer, AlgorithmConfig().model_dump(),
                             1.0, 8, 1, 1, 0)
        rank.setup("127.0.0.1", 0) if torch.distributed.is_initialized() else rank.setup(*rank.rendezvous())
        yield rank


def test_the_one_rank_step_equals_a_plain_torch_step(one_rank, tiny_model):
    vocab = one_rank.engine.module.config.vocab_size
    batch = synthetic_batch(12, vocab=vocab, seed=3)
    expected, norm = reference_step(tiny_model, batch)
    assert one_rank.zero_stage == 0  # configured 2, one rank
    stats = one_rank.train_step([compact(Shard(batch, float(batch.response_mask.sum())))], 0.0)
    assert stats["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 10 * CLIP
    got = unpack_state_dict(one_rank.state_dict())
    moved = 0
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=2e-6, msg=k)
        moved += int(not torch.equal(v, initial_weights(tiny_model)[k]))
    assert moved >= len(expected) // 2  # the step really moved the weights


_BEFORE: dict[str, dict[str, torch.Tensor]] = {}


def initial_weights(path: str) -> dict[str, torch.Tensor]:
    """The checkpoint's weights before any step (cached)."""
    if path not in _BEFORE:
        from transformers import AutoModelForCausalLM

        _BEFORE[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    return _BEFORE[path]
