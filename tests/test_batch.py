"""Collating: prompts left-padded, responses right-padded, masks and float rows, on a hand-worked example."""

from __future__ import annotations

import pytest
import torch

from actors.batch import collate, pad_rows


def test_collate_pads_prompts_left_and_responses_right():
    b = collate([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 9, 0, 0], [0, 0, 8, 10, 11, 12]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert b["response_mask"].tolist() == [[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
    assert (b["input_ids"].dtype, b["attention_mask"].dtype, b["response_mask"].dtype) == (
        torch.long, torch.long, torch.float32)


def test_an_empty_response_keeps_one_padded_column():
    b = collate([[5], [6, 7]], [[], []], pad_id=3)
    assert b["input_ids"].tolist() == [[3, 5, 3], [6, 7, 3]]
    assert b["response_mask"].tolist() == [[0.0], [0.0]]


def test_pad_rows_right_pads_with_zeros_and_refuses_rows_too_long():
    assert pad_rows([[0.5], [], [1.0, 2.0]], 3).tolist() == [[0.5, 0, 0], [0, 0, 0], [1.0, 2.0, 0]]
    with pytest.raises(ValueError, match="does not fit"):
        pad_rows([[1.0, 2.0]], 1)


def test_compact_then_expand_gives_the_batch_back_in_fewer_bytes():
    import pickle

    from actors.batch import compact, expand

    b = collate([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0)
    b["rollout_logp"] = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -2.0, -0.1]])
    b["old_logp"] = b["rollout_logp"].clone()
    b["advantages"] = torch.tensor([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]])
    b["global_units"] = 4.0
    small = compact(b)
    assert "old_logp" not in small and len(pickle.dumps(small)) < len(pickle.dumps(b))
    back = expand(small)
    assert set(back) == set(b)
    for k, v in b.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype if isinstance(v, torch.Tensor) else back[k] == v
    b["old_logp"][1, 0] = -0.9  # recomputed pi_old differs from the rollout's: it travels
    assert torch.equal(expand(compact(b))["old_logp"], b["old_logp"])
