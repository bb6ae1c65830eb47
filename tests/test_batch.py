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
    from actors.records import Shard, TrainBatch

    rollout = torch.tensor([[-0.5, 0.0, 0.0], [-1.0, -2.0, -0.1]])
    b = TrainBatch(**collate([[5, 6, 7], [8]], [[9], [10, 11, 12]], pad_id=0), rollout_logp=rollout,
                   old_logp=rollout.clone(), advantages=torch.tensor([[1.0, 0.0, 0.0], [-1.0, -1.0, -1.0]]))
    small = compact(Shard(b, 4.0))
    assert "old_logp" not in small["rows"] and len(pickle.dumps(small)) < len(pickle.dumps(Shard(b, 4.0)))
    back = expand(small)
    assert back.global_units == 4.0 and set(back.rows.tensors()) == set(b.tensors())
    for k, v in b.tensors().items():
        assert torch.equal(getattr(back.rows, k), v) and getattr(back.rows, k).dtype == v.dtype, k
    b.old_logp[1, 0] = -0.9  # recomputed pi_old differs from the rollout's: it travels
    assert torch.equal(expand(compact(Shard(b, 4.0))).rows.old_logp, b.old_logp)


def test_expand_takes_read_only_arrays_as_ray_hands_an_argument_over():
    import warnings

    import numpy as np

    from actors.batch import compact, expand
    from actors.records import Shard, TrainBatch

    b = TrainBatch(**collate([[5, 6]], [[9, 10]], pad_id=0), rollout_logp=torch.tensor([[-0.5, -0.25]]))
    small = compact(Shard(b, 2.0))
    for v in small["rows"].values():
        assert isinstance(v, np.ndarray)
        v.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only array
        back = expand(small)
    back.rows.rollout_logp[0, 0] = 1.0  # the trainer owns its copy
    assert small["rows"]["rollout_logp"][0, 0] == -0.5


def test_distinct_rows_numbers_rows_by_first_occurrence():
    from actors.batch import distinct_rows

    first, inverse = distinct_rows(torch.tensor([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]]))
    assert first.tolist() == [0, 1, 3] and inverse.tolist() == [0, 1, 0, 2, 1]
    first, inverse = distinct_rows(torch.zeros(3, 0, dtype=torch.long))  # no columns: one row, repeated
    assert first.tolist() == [0] and inverse.tolist() == [0, 0, 0]


def test_distinct_rows_groups_as_torch_unique_does():
    from actors.batch import distinct_rows

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        pool = torch.randint(0, 4, (int(torch.randint(1, 6, (1,), generator=g)), 3), generator=g)
        x = pool[torch.randint(0, len(pool), (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)]
        first, inverse = distinct_rows(x)
        _, expected = torch.unique(x, dim=0, return_inverse=True)
        assert torch.equal(x[first][inverse], x)  # each row maps to a row equal to it
        assert len(first) == len(set(expected.tolist()))  # and equal rows share one number
        assert all(inverse[i] == len(set(inverse[:i].tolist())) for i in first.tolist())  # in order of first sight
