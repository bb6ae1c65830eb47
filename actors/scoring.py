"""ScoringWorker: log-probs of sampled responses under the frozen reference and the old policy, and
(PPO) the critic's values.

The reference gives the KL term (survey 3.14, 3.5.1) and is skipped when beta = 0; the old policy (the
weights that generated the samples) gives the denominator of the PPO ratio (2.4.3); the critic copy
gives V(s_t) per response token for GAE (2.14), kept in step with the CriticTrainer like the policy.
"""

from __future__ import annotations

import time

import torch

from actors.batch import collate_groups, select, trim
from actors.modeling import load_causal_lm, load_tokenizer, load_value_model, response_logprobs, response_values, set_threads
from actors.types import Group
from actors.weights import load_packed, weights_checksum


class ScoringWorker:
    """Holds a reference model (optional) and a copy of the current policy."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 with_reference: bool = True, temperature: float = 1.0, micro_batch_size: int = 64,
                 threads: int | None = None, device: str = "cpu", value_model: str | None = None):
        """`value_model`: where the critic starts (PPO); None scores no values."""
        set_threads(threads)
        self.pad_id = load_tokenizer(model_path, trust_remote_code).pad_token_id
        self.policy = load_causal_lm(model_path, dtype, trust_remote_code, device).eval()
        self.reference = load_causal_lm(model_path, dtype, trust_remote_code, device).eval() if with_reference else None
        self.critic = load_value_model(value_model, dtype, trust_remote_code, device).eval() if value_model else None
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.version = 0

    @torch.no_grad()
    def _per_token(self, fn, batch: dict[str, torch.Tensor]) -> list[list[float]]:
        """`fn(micro_batch) -> [b, t]` over the batch in micro-batches, cut to each response's length."""
        rows: list[list[float]] = []
        n = batch["input_ids"].shape[0]
        for lo in range(0, n, self.micro_batch_size):
            mb = trim(select(batch, slice(lo, lo + self.micro_batch_size)))
            out = fn(mb)  # [b, t]
            lengths = mb["response_mask"].sum(-1).long().tolist()
            rows.extend(out[i, :k].tolist() for i, k in enumerate(lengths))
        return rows

    def _logprobs(self, model, batch: dict[str, torch.Tensor]) -> list[list[float]]:
        return self._per_token(lambda mb: response_logprobs(model, mb, self.temperature)[0], batch)

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill `old_logp` of every sample, `ref_logp` when a reference is held and `values` when a critic is."""
        start = time.perf_counter()
        batch = collate_groups(groups, self.pad_id)
        samples = [s for g in groups for s in g.samples]
        for s, row in zip(samples, self._logprobs(self.policy, batch)):
            s.old_logp = row
        if self.reference is not None:
            for s, row in zip(samples, self._logprobs(self.reference, batch)):
                s.ref_logp = row
        if self.critic is not None:
            for s, row in zip(samples, self._per_token(lambda mb: response_values(self.critic, mb), batch)):
                s.values = row
        elapsed = time.perf_counter() - start
        Group.spread_time(groups, "score", elapsed)
        return groups

    def load_weights(self, packed: dict, version: int) -> int:
        """The policy copy serves `version` from now on (the reference never changes)."""
        load_packed(self.policy, packed)
        self.version = version
        return version

    def load_value_weights(self, packed: dict) -> None:
        """The critic copy takes the CriticTrainer's new weights."""
        load_packed(self.critic, packed)

    def weights_version(self) -> tuple[int, str]:
        return self.version, weights_checksum(self.policy)
