"""ScoringWorker: log-probs of sampled responses under the frozen reference and the old policy.

The reference gives the KL term (survey 3.14) and is skipped when beta = 0; the old policy (the
weights that generated the samples) gives the denominator of the PPO ratio (2.4.3).
"""

from __future__ import annotations

import time

import torch

from actors.batch import collate_groups, select, trim
from actors.modeling import load_causal_lm, load_tokenizer, response_logprobs, set_threads
from actors.types import Group
from actors.weights import load_packed, weights_checksum


class ScoringWorker:
    """Holds a reference model (optional) and a copy of the current policy."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 with_reference: bool = True, temperature: float = 1.0, micro_batch_size: int = 64,
                 threads: int | None = None, device: str = "cpu"):
        set_threads(threads)
        self.pad_id = load_tokenizer(model_path, trust_remote_code).pad_token_id
        self.policy = load_causal_lm(model_path, dtype, trust_remote_code, device).eval()
        self.reference = load_causal_lm(model_path, dtype, trust_remote_code, device).eval() if with_reference else None
        self.temperature = temperature
        self.micro_batch_size = micro_batch_size
        self.version = 0

    @torch.no_grad()
    def _logprobs(self, model, batch: dict[str, torch.Tensor]) -> list[list[float]]:
        rows: list[list[float]] = []
        n = batch["input_ids"].shape[0]
        for lo in range(0, n, self.micro_batch_size):
            mb = trim(select(batch, slice(lo, lo + self.micro_batch_size)))
            logp, _ = response_logprobs(model, mb, self.temperature)  # [b, t]
            lengths = mb["response_mask"].sum(-1).long().tolist()
            rows.extend(logp[i, :k].tolist() for i, k in enumerate(lengths))
        return rows

    def score(self, groups: list[Group]) -> list[Group]:
        """Fill `old_logp` (and `ref_logp` when a reference is held) of every sample."""
        start = time.perf_counter()
        batch = collate_groups(groups, self.pad_id)
        samples = [s for g in groups for s in g.samples]
        for s, row in zip(samples, self._logprobs(self.policy, batch)):
            s.old_logp = row
        if self.reference is not None:
            for s, row in zip(samples, self._logprobs(self.reference, batch)):
                s.ref_logp = row
        elapsed = time.perf_counter() - start
        for g in groups:
            g.add_time("score", elapsed / len(groups))
        return groups

    def load_weights(self, packed: dict, version: int) -> int:
        """The policy copy serves `version` from now on (the reference never changes)."""
        load_packed(self.policy, packed)
        self.version = version
        return version

    def weights_version(self) -> tuple[int, str]:
        return self.version, weights_checksum(self.policy)
