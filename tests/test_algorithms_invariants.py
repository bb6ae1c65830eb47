"""Properties every public function keeps: padding never matters, dtype kept, inputs untouched."""

from collections.abc import Callable

import pytest
import torch

import algorithms as A

B, T, V, K = 4, 6, 5, 2
LENGTHS = [6, 3, 1, 4]
TOKEN_KEYS = (
    "logp", "old_logp", "ref_logp", "rollout_logp", "advantages", "rewards", "values", "old_values", "returns",
    "entropies",
)


def _inputs(dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    inp = {key: rand(B, T) for key in TOKEN_KEYS}
    for key in ("logp", "old_logp", "ref_logp"):
        inp[key] = -inp[key].abs() - 0.1
    inp["old_logp"] = inp["logp"] + 0.3 * rand(B, T)  # a mix of clipped and unclipped tokens
    inp["rollout_logp"] = inp["old_logp"] + 0.2 * rand(B, T)  # a mix of kept and masked tokens
    inp["entropies"] = inp["entropies"].abs()
    inp["mask"] = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).to(dtype)  # [B, T]
    inp["logits"] = 3 * rand(B, T, V)
    inp["scores"] = rand(B)
    inp["step_rewards"] = rand(B, K)
    inp["step_ends"] = torch.tensor([[2, 5], [1, 2], [0, 0], [3, 0]])
    inp["step_mask"] = torch.tensor([[1, 1], [1, 1], [1, 0], [1, 0]], dtype=dtype)
    return inp


def _pad_with(inp: dict[str, torch.Tensor], fill: float) -> dict[str, torch.Tensor]:
    """Same inputs with every padded token position (and padded step) set to `fill`."""
    out = dict(inp)
    pad = ~inp["mask"].bool()  # [B, T]
    for key in TOKEN_KEYS:
        out[key] = inp[key].masked_fill(pad, fill)
    out["logits"] = inp["logits"].masked_fill(pad[..., None], fill)
    out["step_rewards"] = inp["step_rewards"].masked_fill(~inp["step_mask"].bool(), fill)
    out["step_ends"] = inp["step_ends"].masked_fill(~inp["step_mask"].bool(), 10**6)  # out-of-range index
    return out


# name → (function of the inputs returning {output name: tensor}, names of its [B, T] outputs)
MASKED: dict[str, tuple[Callable, tuple[str, ...]]] = {
    **{
        f"kl_estimate_{kind}": (
            lambda x, kind=kind: {"kl": A.kl_estimate(x["logp"], x["ref_logp"], kind, x["mask"])},
            ("kl",),
        )
        for kind in A.KL_KINDS
    },
    "gae": (
        lambda x: dict(zip(("adv", "ret"), A.gae(x["rewards"], x["values"], x["mask"], 0.99, 0.95))),
        ("adv", "ret"),
    ),
    "process_reward_advantages": (
        lambda x: {"adv": A.process_reward_advantages(x["step_rewards"], x["step_ends"], x["mask"], x["step_mask"], 2)},
        ("adv",),
    ),
    "kl_shaped_token_rewards": (
        lambda x: {"r": A.kl_shaped_token_rewards(x["scores"], x["logp"], x["ref_logp"], x["mask"], 0.05, "k3")},
        ("r",),
    ),
    "broadcast_to_tokens": (lambda x: {"adv": A.broadcast_to_tokens(x["scores"], x["mask"])}, ("adv",)),
    **{
        f"aggregate_{agg}": (lambda x, agg=agg: {"v": A.aggregate(x["values"], x["mask"], agg)}, ())
        for agg in A.AGG_MODES
    },
    **{
        f"policy_loss_{level}_{agg}": (
            lambda x, level=level, agg=agg: _with_stats(
                A.policy_loss(
                    x["logp"], x["old_logp"], x["advantages"], x["mask"], 0.2, 0.28, agg, 3.0, level
                )
            ),
            (),
        )
        for level in A.RATIO_LEVELS
        for agg in A.AGG_MODES
    },
    **{
        f"cispo_loss_{agg}": (
            lambda x, agg=agg: _with_stats(
                A.cispo_loss(x["logp"], x["old_logp"], x["advantages"], x["mask"], 0.2, 0.28, agg)
            ),
            (),
        )
        for agg in A.AGG_MODES
    },
    "cispo_loss_token_weights": (
        lambda x: _with_stats(
            A.cispo_loss(
                x["logp"], x["old_logp"], x["advantages"], x["mask"], 0.2, 0.28, "token-mean",
                token_weights=x["values"],
            )
        ),
        (),
    ),
    "tis_weights": (lambda x: _with_weights(A.tis_weights(x["old_logp"], x["rollout_logp"], x["mask"], 1.2)), ("w",)),
    "icepop_weights": (
        lambda x: _with_weights(A.icepop_weights(x["old_logp"], x["rollout_logp"], x["mask"], 0.8, 1.25)),
        ("w",),
    ),
    "seq_mask_weights": (
        lambda x: _with_weights(A.seq_mask_weights(x["old_logp"], x["rollout_logp"], x["mask"], 0.98, 1.04)),
        ("w",),
    ),
    "distillation_advantages": (
        lambda x: {"adv": A.distillation_advantages(x["logp"], x["ref_logp"], x["mask"])},
        ("adv",),
    ),
    "top_entropy_mask": (lambda x: {"m": A.top_entropy_mask(x["entropies"], x["mask"], 0.5)}, ("m",)),
    "policy_loss_with_kl": (
        lambda x: _with_stats(
            A.policy_loss_with_kl(x["logp"], x["old_logp"], x["ref_logp"], x["advantages"], x["mask"], 0.2, 0.2, 0.04)
        ),
        (),
    ),
    "value_loss": (
        lambda x: _with_stats(A.value_loss(x["values"], x["old_values"], x["returns"], x["mask"], 0.2)),
        (),
    ),
    "entropy": (lambda x: {"h": A.entropy(x["logits"], x["mask"])}, ()),
    "sft_loss": (lambda x: {"nll": A.sft_loss(x["logp"], x["mask"], "seq-mean-token-mean")}, ()),
}

UNMASKED: dict[str, Callable] = {
    "group_normalized": lambda x: {"a": A.group_normalized(x["scores"], 2)},
    "group_normalized_mean_only": lambda x: {"a": A.group_normalized(x["scores"], 2, std_normalize=False)},
    "rloo": lambda x: {"a": A.rloo(x["scores"], 2)},
    "reinforce_baseline": lambda x: {"a": A.reinforce_baseline(x["scores"])},
    "reinforce_pp": lambda x: {"a": A.reinforce_pp(x["scores"])},
    "token_entropy": lambda x: {"h": A.token_entropy(x["logits"])},
    "dpo_loss": lambda x: _with_stats(
        A.dpo_loss(x["scores"], x["scores"].flip(0), x["scores"] * 0.5, x["scores"].roll(1), 0.1)
    ),
    "reward_model_loss": lambda x: {"l": A.reward_model_loss(x["scores"], x["scores"].flip(0))},
    "kwise_reward_model_loss": lambda x: {"l": A.kwise_reward_model_loss(x["values"])},
}


def _with_stats(result: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    loss, stats = result
    return {"loss": loss, **stats}


def _with_weights(result: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    weights, stats = result
    return {"w": weights, **stats}


@pytest.mark.parametrize("name", sorted(MASKED))
def test_padding_never_changes_an_output(name):
    fn, token_outputs = MASKED[name]
    clean = _inputs()
    base = fn(clean)
    pad = ~clean["mask"].bool()
    for fill in (1e9, -1e9, float("nan")):
        padded = fn(_pad_with(clean, fill))
        assert base.keys() == padded.keys()
        for key, value in base.items():
            assert torch.equal(value, padded[key]), f"{name}:{key} changed with padding {fill}"
            assert torch.isfinite(padded[key]).all(), f"{name}:{key} not finite"
    for key in token_outputs:
        assert (base[key][pad] == 0).all(), f"{name}:{key} nonzero at padding"


@pytest.mark.parametrize("name", sorted(MASKED))
def test_float_and_bool_masks_agree(name):
    fn, _ = MASKED[name]
    inp = _inputs()
    as_float, as_bool = fn(inp), fn({**inp, "mask": inp["mask"].bool(), "step_mask": inp["step_mask"].bool()})
    for key, value in as_float.items():
        assert torch.equal(value, as_bool[key]), f"{name}:{key}"


@pytest.mark.parametrize(
    "key,fn_name",
    [
        ("logp", "policy_loss"),
        ("logp", "policy_loss_with_kl"),
        ("logp", "cispo_loss"),
        ("values", "value_loss"),
        ("logits", "entropy"),
        ("logp", "sft_loss"),
    ],
)
def test_gradients_ignore_padding(key, fn_name):
    loss_fns = {
        "policy_loss": lambda x: A.policy_loss(
            x["logp"], x["old_logp"], x["advantages"], x["mask"], 0.2, 0.2, "token-mean"
        )[0],
        "policy_loss_with_kl": lambda x: A.policy_loss_with_kl(
            x["logp"], x["old_logp"], x["ref_logp"], x["advantages"], x["mask"], 0.2, 0.2, 0.1, ratio_level="sequence"
        )[0],
        "cispo_loss": lambda x: A.cispo_loss(
            x["logp"], x["old_logp"], x["advantages"], x["mask"], 0.2, 0.28, "seq-mean-token-mean"
        )[0],
        "value_loss": lambda x: A.value_loss(x["values"], x["old_values"], x["returns"], x["mask"], 0.2)[0],
        "entropy": lambda x: A.entropy(x["logits"], x["mask"]),
        "sft_loss": lambda x: A.sft_loss(x["logp"], x["mask"]),
    }
    grads = []
    for inp in (_inputs(), _pad_with(_inputs(), 1e9)):
        leaf = inp[key].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fns[fn_name]({**inp, key: leaf}), leaf)
        grads.append(grad)
    assert torch.equal(grads[0], grads[1])
    pad = ~_inputs()["mask"].bool()
    assert (grads[1][pad] == 0).all() and torch.isfinite(grads[1]).all()
    assert (grads[1][~pad] != 0).any()


ALL = {**{name: fn for name, (fn, _) in MASKED.items()}, **UNMASKED}


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dtype_and_device_are_kept(name, dtype):
    inp = _inputs(dtype)
    for key, value in ALL[name](inp).items():
        assert value.dtype == dtype, f"{name}:{key} is {value.dtype}"
        assert value.device == inp["logp"].device


@pytest.mark.parametrize("name", sorted(ALL))
def test_inputs_are_not_modified(name):
    inp = _pad_with(_inputs(), 1e9)
    before = {key: value.clone() for key, value in inp.items()}
    ALL[name](inp)
    for key, value in inp.items():
        assert torch.equal(value, before[key]), f"{name} modified {key}"
