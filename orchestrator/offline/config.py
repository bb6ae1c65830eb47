"""Configs of the offline preference trainers (`raylhf train-rm`, `raylhf train-dpo`): pydantic v2, from YAML
with `--set a.b=value` overrides, like the job config. A bad value is a `ConfigError` naming the field path,
raised before any data or model is touched.
"""

from __future__ import annotations

import os
from typing import Literal, TypeVar

from pydantic import Field

from orchestrator.config import (DataSource, ModelConfig, ProgressConfig, Section, check_model, check_reference,
                                 read_config)
from orchestrator.references import check_source, resolve_callable


class PreferenceData(Section):
    train: DataSource = Field(description='Training preferences: a .jsonl file or a "module:function" returning rows.')
    eval: DataSource | None = Field(None, description="Held-out preferences (disjoint prompts) for accuracy reports.")
    max_length: int = Field(128, gt=0, description="Longest prompt + response in tokens; longer rows are an error.")


class OptimConfig(Section):
    lr: float = Field(gt=0, description="Peak learning rate of AdamW.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to lr.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Decay after warm-up.")
    batch_size: int = Field(32, gt=0, description="Rows (pairs or rankings) per optimizer step.")
    epochs: int = Field(1, gt=0, description="Passes over the training rows (reshuffled each epoch).")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (default: all epochs).")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    seed: int = Field(0, description="Seeds the shuffling and any newly initialised weights.")
    threads: int | None = Field(
        None, gt=0, description="torch intra-op threads (default: every core this process may use).")
    eval_batch_size: int = Field(256, gt=0, description="Rows per forward pass when scoring without gradients.")


class LoggingConfig(ProgressConfig):
    log_every: int = Field(50, gt=0, description="Steps between plain-text progress lines when progress is off.")


class RewardModelConfig(Section):
    """`raylhf train-rm`: a reward model r_θ(x, y) trained on preferences (survey 3.2.1, 3.3.1)."""

    model: ModelConfig = Field(description="The causal LM the reward model starts from (the warm-started policy).")
    data: PreferenceData
    loss: Literal["pairwise", "kwise"] = Field(
        "pairwise", description="pairwise: Bradley-Terry on pair rows (survey eq. 3.1); kwise: InstructGPT's loss "
        "over all pairs of each ranked row (survey 3.3.1).")
    head_layers: int = Field(
        0, ge=0, description="Fresh transformer layers stacked on the starting model under the score head, identity "
        "at init (Llama-style layers): the score is read at the last token, and these layers give it depth to gather "
        "what the LM computed at earlier positions (e.g. its next-token predictions).")
    lm_coef: float = Field(
        0.0, ge=0, description="Weight of an auxiliary next-token loss on each row's preferred response (chosen, or "
        "the best of a ranking) through the starting model's LM head, added to the preference loss: the backbone "
        "keeps modelling the answers the preferences favour (Yang et al. 2024's SFT regulariser). 0: off.")
    trainer: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-4))
    normalize: bool = Field(True, description="After training, shift scores to mean 0 over the training responses "
                            "(survey 3.2.2, 3.3.1), stored as config.reward_offset.")
    output_dir: str = Field(description="Where the reward model (HF checkpoint + tokenizer) is written, atomically.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def form(self) -> Literal["pairs", "ranked"]:
        """The row form the loss reads."""
        return "pairs" if self.loss == "pairwise" else "ranked"


class GreedyEvalConfig(Section):
    prompts: DataSource = Field(description="Held-out problems: rows with the prompt and the reward function's fields.")
    prompt_key: str = Field("prompt", description="Row field holding the prompt text.")
    reward: str = Field("rewards.final_answer:hash_answer",
                        description='Rule verifier "module:function"; a completion scoring > 0 counts as correct.')
    size: int = Field(500, gt=0, description="Evaluate the first `size` rows.")
    max_new_tokens: int = Field(32, gt=0, description="Longest greedy completion, in tokens.")
    batch_size: int = Field(256, gt=0, description="Prompts per generate call.")


class DPOConfig(Section):
    """`raylhf train-dpo`: offline DPO (survey 3.4, eq. 3.8) against a frozen copy of the starting policy."""

    model: ModelConfig = Field(description="The starting policy; a frozen copy of it is the reference π_ref.")
    data: PreferenceData
    beta: float = Field(0.1, gt=0, description="β of eq. 3.8: the implicit reward is β·log(π/π_ref).")
    append_eos: bool = Field(True, description="Score each response followed by EOS (the policy must also stop).")
    trainer: OptimConfig = Field(default_factory=lambda: OptimConfig(lr=1e-5))
    eval: GreedyEvalConfig | None = Field(None, description="Held-out greedy accuracy before and after training.")
    output_dir: str = Field(description="Where the trained policy (HF checkpoint + tokenizer) is written, atomically.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def form(self) -> Literal["pairs"]:
        return "pairs"


Config = TypeVar("Config", RewardModelConfig, DPOConfig)


def load_preference_config(kind: type[Config], path: str | os.PathLike, overrides: list[str] | None = None,
                           *, check_paths: bool = True) -> Config:
    """Read YAML, apply `--set` overrides, validate as `kind`, and check that named files and functions exist."""
    cfg = read_config(kind, path, overrides)
    if check_paths:
        check_references(cfg)
    return cfg


def check_references(cfg: RewardModelConfig | DPOConfig) -> None:
    """Data files and "module:function" names must resolve, and the model must exist or be buildable."""
    sources = [("data.train", cfg.data.train), ("data.eval", cfg.data.eval)]
    if isinstance(cfg, DPOConfig) and cfg.eval is not None:
        sources.append(("eval.prompts", cfg.eval.prompts))
        check_reference("eval.reward", resolve_callable, cfg.eval.reward)
    for field, src in sources:
        if src is not None:
            check_reference(f"{field}.source", check_source, src.source, (".jsonl",))
    check_model(cfg.model)
