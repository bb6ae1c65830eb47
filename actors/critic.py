"""CriticTrainer: data-parallel DeepSpeed ranks that fit the value model V(s_t) for PPO's GAE (survey 2.14-2.18).

The value model is the policy's (or the reward model's) transformer with a one-output head per token
(`actors.modeling.load_value_model`); values[:, t] is V(s_t), the state before response token t.
The loss is the clipped value loss of (2.18) against the λ-returns of GAE (2.17), around the values
the scoring pool computed at rollout time.
"""

from __future__ import annotations

import torch

from actors.modeling import load_value_model, response_values
from actors.records import TrainBatch
from actors.trainer import DeepSpeedRank
from algorithms.losses import value_loss


class CriticTrainer(DeepSpeedRank):
    """One critic rank. `model["path"]` is where the value model starts (policy or reward-model checkpoint). Under
    LoRA (`model["lora"]`) the transformer body trains through adapters and the value head trains whole."""

    value_head = True

    def __init__(self, rank: int, world_size: int, model: dict, trainer: dict, value_clip: float | None, agg: str,
                 grad_accum: int, total_steps: int, seed: int = 0, device: str = "cpu"):
        super().__init__(rank, world_size, model, trainer, grad_accum, total_steps, seed, device)
        self.value_clip = value_clip
        # Values are regressed per token; a Dr.GRPO constant-length norm has no meaning for them.
        self.agg = "token-mean" if agg == "token-mean" else "seq-mean-token-mean"

    def build_model(self) -> torch.nn.Module:
        m = self.model_cfg
        return load_value_model(m["path"], m["dtype"], m["trust_remote_code"], self.device)

    def _micro_loss(self, micro: TrainBatch, global_units: float) -> tuple[torch.Tensor, dict, float, torch.Tensor]:
        mask = micro.response_mask  # [b, t]
        values = response_values(self.engine, micro)  # [b, t]
        loss, stats = value_loss(values, micro.old_values, micro.returns, mask, self.value_clip, self.agg)
        valid = mask.bool()
        err = torch.where(valid, values.detach() - micro.returns, 0)  # [b, t]
        stats = {"value_loss": loss.detach(), **stats,
                 "value_mae": err.abs().sum() / valid.sum().clamp(min=1)}
        units = float(mask.sum()) if self.agg == "token-mean" else float(mask.shape[0])
        return loss, {f"critic/{k}": v for k, v in stats.items()}, units / global_units, values
