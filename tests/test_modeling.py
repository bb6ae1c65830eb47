"""Scoring response tokens: rows that repeat a prompt run it once (`response_logits`), and the logits and
gradients match running every row on its own, unpadded."""

from __future__ import annotations

import torch

from actors.batch import collate
from actors.modeling import load_causal_lm, response_logits, token_logprobs


def _rows_seen(model) -> tuple[list[int], object]:
    """Rows of each forward through the transformer body, recorded by a hook."""
    seen: list[int] = []
    handle = model.model.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]),
                                                   with_kwargs=True)
    return seen, handle


def _batch(group_size: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[list[int]], list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [[2] + torch.randint(3, 20, (n,), generator=g).tolist() for n in (2, 5, 3)]
    rows = [p for p in prompts for _ in range(group_size)]
    order = torch.randperm(len(rows), generator=g).tolist()  # a prompt's rows are not adjacent
    prompt_ids = [rows[i] for i in order]
    response_ids = [torch.randint(3, 20, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g).tolist()
                    for _ in order]
    return collate(prompt_ids, response_ids, pad_id=0), prompt_ids, response_ids


def test_rows_sharing_a_prompt_match_each_row_run_alone(tiny_model):
    torch.manual_seed(0)
    model = load_causal_lm(tiny_model)
    with torch.no_grad():  # larger weights than the init's, so the logits are far from uniform
        for p in model.parameters():
            p.mul_(3.0)
    batch, prompt_ids, response_ids = _batch(group_size=4)
    t = batch["response_mask"].shape[1]
    seen, handle = _rows_seen(model)
    logits = response_logits(model, batch["input_ids"], batch["attention_mask"], t)  # [12, T, V]
    handle.remove()
    assert seen == [3, 12]  # 3 distinct prompts once, then the 12 responses on their copied caches
    logp = token_logprobs(logits, batch["input_ids"][:, -t:])
    w = torch.randn(batch["response_mask"].shape, generator=torch.Generator().manual_seed(1))  # [B, T] loss weights
    shared_grads = torch.autograd.grad((logp * w * batch["response_mask"]).sum(), list(model.parameters()))

    alone, total = [], torch.zeros(())
    for i, (pr, rs) in enumerate(zip(prompt_ids, response_ids)):
        ids = torch.tensor([pr + rs])
        row_logits = model(input_ids=ids).logits[0, len(pr) - 1 : -1]  # [len(rs), V]
        row_logp = token_logprobs(row_logits, ids[0, len(pr):])
        alone.append(row_logp)
        total = total + (row_logp * w[i, : len(rs)]).sum()
    for i, row in enumerate(alone):
        torch.testing.assert_close(logp[i, : len(row)], row, atol=2e-5, rtol=1e-5)
    alone_grads = torch.autograd.grad(total, list(model.parameters()))
    for a, b in zip(shared_grads, alone_grads):  # float32 rounding only: measured <= 2e-6 relative
        assert float((a - b).norm() / b.norm()) < 1e-4
    assert max(float(g.abs().max()) for g in alone_grads) > 1e-3  # a real gradient, so agreement means something


def test_rows_with_distinct_prompts_or_sharing_off_take_one_plain_forward(tiny_model):
    model = load_causal_lm(tiny_model)
    for group_size, share in ((1, True), (4, False)):
        batch, _, _ = _batch(group_size=group_size)
        seen, handle = _rows_seen(model)
        response_logits(model, batch["input_ids"], batch["attention_mask"], batch["response_mask"].shape[1], share)
        handle.remove()
        assert seen == [3 * group_size]
