"""Collating groups into padded tensors: prompts left-padded, responses right-padded.

Layout (as in verl): `input_ids [B, P+T]` holds the left-padded prompt then the right-padded
response, so every response tensor is `[B, T]` with an explicit `response_mask`, and the logits
that predict response token t sit at position P-1+t.
"""

from __future__ import annotations

import torch

from actors.types import Group


def collate(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad prompts on the left and responses on the right into one `[B, P+T]` batch."""
    p = max(len(x) for x in prompt_ids)
    t = max(1, max(len(x) for x in response_ids))
    # Rows are built as Python lists and converted once: per-row tensor writes cost ~10 us each, which for a
    # step of 512 samples was most of the orchestrator's overhead.
    ids, attention, response = [], [], []
    for pr, rs in zip(prompt_ids, response_ids):
        lead, tail = p - len(pr), t - len(rs)
        ids.append([pad_id] * lead + list(pr) + list(rs) + [pad_id] * tail)
        attention.append([0] * lead + [1] * (len(pr) + len(rs)) + [0] * tail)
        response.append([1.0] * len(rs) + [0.0] * tail)
    return {"input_ids": torch.tensor(ids, dtype=torch.long).reshape(-1, p + t),  # [B, P+T]
            "attention_mask": torch.tensor(attention, dtype=torch.long).reshape(-1, p + t),  # [B, P+T]
            "response_mask": torch.tensor(response, dtype=torch.float32).reshape(-1, t)}  # [B, T]


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Right-pad float rows with zeros into `[B, width]` (a row longer than `width` is an error)."""
    padded = [list(r) + [0.0] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.float32).reshape(-1, width)  # [B, T]


def collate_groups(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """All samples of `groups`, group after group, as one padded batch with their rollout log-probs."""
    prompts = [g.prompt_ids for g in groups for _ in g.samples]
    responses = [s.response_ids for g in groups for s in g.samples]
    batch = collate(prompts, responses, pad_id)
    width = batch["response_mask"].shape[1]
    batch["rollout_logp"] = pad_rows([s.rollout_logp for g in groups for s in g.samples], width)
    return batch


def select(batch: dict[str, torch.Tensor], index: slice | torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `index` of every `[B, ...]` tensor in the batch; other entries are kept as they are."""
    out = {}
    for k, v in batch.items():
        out[k] = v[index] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
    return out


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop all-padding columns (left of the prompts, right of the responses) to save compute."""
    am, rm = batch["attention_mask"], batch["response_mask"]
    t_full = rm.shape[1]
    p_full = am.shape[1] - t_full
    t = max(1, int(rm.sum(0).nonzero().max()) + 1) if rm.any() else 1
    lead = int((am[:, :p_full].sum(0) == 0).sum())  # prompt columns that are padding in every row
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() < 2:
            out[k] = v
        elif v.shape[1] == t_full:
            out[k] = v[:, :t]
        elif v.shape[1] == p_full + t_full:
            out[k] = v[:, lead : p_full + t]
        else:
            out[k] = v
    return out
