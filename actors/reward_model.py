"""RewardModelWorker: scores prompt + completion with a sequence classifier that has one output (a reward model).

The checkpoint is any `AutoModelForSequenceClassification` with `num_labels=1` (e.g. trained with the
Bradley-Terry loss of survey 3.1, `algorithms.losses.reward_model_loss`). Texts are scored in batches,
longest first, right-padded with an attention mask: a causal model's real tokens never see the
padding, and Hugging Face pools at the last token that is not the pad token, which with right padding
is the last real token (unless a text ends in the pad token itself, e.g. pad = EOS and a trailing EOS),
so a text's score does not depend on its batch.
"""

from __future__ import annotations

import time

import torch

from actors.modeling import load_tokenizer, set_threads
from actors.records import Group
from actors.reward_limits import check_value


class RewardModelError(ValueError):
    """A checkpoint that is not a one-output sequence classifier."""


class RewardModelWorker:
    """One reward model; `score` adds `weight * score` to each sample's reward under `label` (ray.remote-ready)."""

    def __init__(self, label: str, model_path: str, weight: float = 1.0, batch_size: int = 32,
                 failure_score: float = 0.0, device: str = "cpu", threads: int | None = 1,
                 trust_remote_code: bool = False, max_abs_score: float = 1e6):
        from transformers import AutoModelForSequenceClassification

        set_threads(threads)
        self.label, self.weight, self.batch_size, self.failure_score = label, weight, batch_size, failure_score
        self.max_abs_score = max_abs_score  # a score beyond +- this fails, like a reward function's
        self.device = device
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"  # an over-long text keeps its end, the completion
        model, info = AutoModelForSequenceClassification.from_pretrained(
            model_path, dtype="auto", trust_remote_code=trust_remote_code, output_loading_info=True)
        if model.config.num_labels != 1:
            raise RewardModelError(f"reward model {model_path!r} has num_labels={model.config.num_labels}; "
                                   "a reward model has exactly one output (num_labels=1)")
        if info["missing_keys"]:
            raise RewardModelError(f"reward model {model_path!r} lacks trained weights for "
                                   f"{sorted(info['missing_keys'])[:4]}: is it a sequence-classification checkpoint?")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id  # the model finds the last real token by it
        self.model = model.to(device).eval()
        # `raylhf train-rm` stores the mean training score here: scores come out with mean 0 (survey 3.2.2, 3.3.1).
        self.offset = float(getattr(model.config, "reward_offset", 0.0) or 0.0)
        limit = getattr(model.config, "max_position_embeddings", None) or self.tokenizer.model_max_length
        self.max_length = min(limit, self.tokenizer.model_max_length)
        self._reported: set[str] = set()

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        """The model's scalar output minus the config's `reward_offset` for each text, in order; batches of
        `batch_size`, longest first."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths share a batch: less padding
        scores = [0.0] * len(texts)
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)  # input_ids, attention_mask: [b, L]
            logits = self.model(**enc).logits  # [b, 1]
            for i, v in zip(idx, (logits[:, 0].float() - self.offset).tolist()):
                scores[i] = v
        return scores

    def reward(self, groups: list[Group]) -> list[Group]:
        """Score prompt + completion of every sample; a non-finite score, or one beyond +-max_abs_score, counts as
        a failure."""
        start = time.perf_counter()
        pairs = [(g, s) for g in groups for s in g.samples]
        values = self.score_texts([g.prompt + s.text for g, s in pairs])
        for (g, s), value in zip(pairs, values):
            try:
                value, _ = check_value(value, self.max_abs_score)  # the bound a reward function's value meets
            except ValueError as e:
                g.note_reward_failure(self.label, "ValueError", f"reward model {self.label}: {e}", self._reported)
                value = self.failure_score
            s.add_reward(self.label, self.weight, value)
        elapsed = time.perf_counter() - start
        Group.spread_time(groups, "reward", elapsed)
        return groups
