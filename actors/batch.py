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
    b = len(prompt_ids)
    p = max(len(x) for x in prompt_ids)
    t = max(1, max(len(x) for x in response_ids))
    input_ids = torch.full((b, p + t), pad_id, dtype=torch.long)  # [B, P+T]
    attention_mask = torch.zeros((b, p + t), dtype=torch.long)  # [B, P+T]
    response_mask = torch.zeros((b, t), dtype=torch.float32)  # [B, T]
    for i, (pr, rs) in enumerate(zip(prompt_ids, response_ids)):
        input_ids[i, p - len(pr) : p] = torch.tensor(pr, dtype=torch.long)
        input_ids[i, p : p + len(rs)] = torch.tensor(rs, dtype=torch.long)
        attention_mask[i, p - len(pr) : p + len(rs)] = 1
        response_mask[i, : len(rs)] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Right-pad float rows with zeros into `[B, width]`."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)  # [B, T]
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.float32)
    return out


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
