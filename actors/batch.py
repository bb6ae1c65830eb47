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
    prompt_len = torch.tensor([len(x) for x in prompt_ids])  # [B]
    prompt_mask = torch.arange(p) >= p - prompt_len[:, None]  # [B, P]
    response_mask = _right_mask([len(x) for x in response_ids], t)  # [B, T]
    ids = torch.full((len(prompt_ids), p + t), pad_id, dtype=torch.long)  # [B, P+T]
    # One flat tensor per side, written through a mask (row-major, so in row order): converting row by row
    # cost ~10 us a row, most of the orchestrator's overhead for a step of 512 samples.
    ids[:, :p][prompt_mask] = torch.tensor([i for x in prompt_ids for i in x], dtype=torch.long)
    ids[:, p:][response_mask] = torch.tensor([i for x in response_ids for i in x], dtype=torch.long)
    return {"input_ids": ids,
            "attention_mask": torch.cat([prompt_mask, response_mask], 1).long(),  # [B, P+T]
            "response_mask": response_mask.float()}  # [B, T]


def _right_mask(lengths: list[int], width: int) -> torch.Tensor:
    """`[B, width]` bool: the first `lengths[b]` columns of row b."""
    return torch.arange(width) < torch.tensor(lengths, dtype=torch.long)[:, None]


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Right-pad float rows with zeros into `[B, width]` (a row longer than `width` is an error)."""
    lengths = [len(r) for r in rows]
    if lengths and max(lengths) > width:
        raise ValueError(f"a row of {max(lengths)} values does not fit in width {width}")
    out = torch.zeros(len(rows), width, dtype=torch.float32)  # [B, width]
    out[_right_mask(lengths, width)] = torch.tensor([v for r in rows for v in r], dtype=torch.float32)
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


_MASKS = ("attention_mask", "response_mask")


def compact(batch: dict[str, torch.Tensor]) -> dict:
    """The batch in fewer bytes for the trip to a trainer (`expand` undoes it exactly): token ids as int32,
    masks as bool, and `old_logp` left out when it is `rollout_logp` itself (algorithm.old_logprobs: rollout).
    About 180 instead of 450 bytes a row here, so a step's shard fits under Ray's 100 KB limit for passing
    arguments inline, which saved ~3 ms a step over a trip through the object store."""
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].to(torch.int32)
    for k in _MASKS:
        out[k] = batch[k].bool()
    if "old_logp" in batch and "rollout_logp" in batch and torch.equal(batch["old_logp"], batch["rollout_logp"]):
        del out["old_logp"]
        out["old_logp_is_rollout"] = True
    return out


def expand(batch: dict) -> dict[str, torch.Tensor]:
    """The batch `compact` was given."""
    out = dict(batch)
    out["input_ids"] = batch["input_ids"].long()
    out["attention_mask"] = batch["attention_mask"].long()
    out["response_mask"] = batch["response_mask"].float()
    if out.pop("old_logp_is_rollout", False):
        out["old_logp"] = out["rollout_logp"]
    return out
