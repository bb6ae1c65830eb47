"""Moving weights between actors: a state dict packed as numpy arrays (zero-copy reads from
Ray's object store), and a checksum that proves two actors hold the same weights."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import torch

_VIEW_AS = {torch.bfloat16: torch.int16}  # dtypes numpy lacks travel as raw bits


def pack_state_dict(model: torch.nn.Module) -> dict[str, tuple[np.ndarray, str]]:
    """CPU numpy copies of every tensor in the state dict, with the torch dtype to restore."""
    return pack_state(model.state_dict())


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """`pack_state_dict` of any name -> tensor mapping (e.g. only a model's LoRA adapters)."""
    out = {}
    for name, t in state.items():
        t = t.detach().to("cpu").contiguous()
        raw = t.view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t
        out[name] = (raw.numpy().copy(), str(t.dtype).removeprefix("torch."))
    return out


def unpack_state_dict(packed: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """Torch tensors viewing the packed arrays, with no copy, read-only ones included: arrays read from Ray's
    object store are read-only views of its shared memory, and the tensors here are only read
    (`load_state_dict` copies them into the model), so each receiver copies the weights exactly once."""
    out = {}
    with warnings.catch_warnings():  # torch warns that writing through a read-only array's tensor is undefined
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (arr, dtype) in packed.items():
            t = torch.from_numpy(arr)
            want = getattr(torch, dtype)
            out[name] = t.view(want) if want in _VIEW_AS else t
    return out


def load_packed(model: torch.nn.Module, packed: dict[str, tuple[np.ndarray, str]]) -> None:
    """Load packed weights into `model` in place, strictly (every key must match)."""
    state = unpack_state_dict(packed)
    with torch.no_grad():
        model.load_state_dict(state, strict=True)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 over parameter names and bytes, in name order: equal iff the weights are identical."""
    return state_checksum(model.state_dict())


def state_checksum(state: dict[str, torch.Tensor]) -> str:
    """`weights_checksum` of any name -> tensor mapping."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        t = t.detach().to("cpu").contiguous()
        raw = t.view(_VIEW_AS[t.dtype]) if t.dtype in _VIEW_AS else t
        h.update(name.encode())
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


class WeightBoard:
    """Partial rollouts (`rollout.partial`): where the orchestrator posts each new policy version (a reference to
    the packed state dict in the object store, wrapped in a list so Ray passes the reference, not the weights)
    for rollout workers to take at a token boundary (`actors.rollout.RolloutWorker.generate`)."""

    def __init__(self):
        self.version, self.refs = 0, [None]

    def post(self, version: int, refs: list) -> None:
        if version > self.version:
            self.version, self.refs = version, refs

    def latest(self) -> tuple[int, list]:
        """(newest version posted, [its packed state dict's ObjectRef])."""
        return self.version, self.refs
