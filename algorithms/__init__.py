"""Pure-torch RLHF math: KL estimators, advantages, losses and KL-coefficient control (see the survey in reference/)."""

from .advantages import (
    broadcast_to_tokens,
    gae,
    group_normalized,
    kl_shaped_token_rewards,
    process_reward_advantages,
    reinforce_baseline,
    reinforce_pp,
    rloo,
)
from .kl import KL_KINDS, kl_estimate
from .kl_control import AdaptiveKLController, FixedKLController
from .losses import (
    AGG_MODES,
    RATIO_LEVELS,
    aggregate,
    dpo_loss,
    entropy,
    policy_loss_with_kl,
    kwise_reward_model_loss,
    policy_loss,
    reward_model_loss,
    sft_loss,
    tis_weights,
    token_entropy,
    value_loss,
)

__all__ = [
    "AGG_MODES",
    "KL_KINDS",
    "RATIO_LEVELS",
    "AdaptiveKLController",
    "FixedKLController",
    "aggregate",
    "broadcast_to_tokens",
    "dpo_loss",
    "entropy",
    "gae",
    "group_normalized",
    "policy_loss_with_kl",
    "kl_estimate",
    "kl_shaped_token_rewards",
    "kwise_reward_model_loss",
    "policy_loss",
    "process_reward_advantages",
    "reinforce_baseline",
    "reinforce_pp",
    "reward_model_loss",
    "rloo",
    "sft_loss",
    "tis_weights",
    "token_entropy",
    "value_loss",
]
