"""LoRA through peft: a model wrapped with adapters (`model.lora` of the config), the state that trains and
travels (the adapters, and a critic's value head), the adapter in peft's own file format, a merged copy, and a
checksum of the base model's weights that pins what a LoRA checkpoint may be resumed against.

peft freezes the base and marks the adapters (and `modules_to_save`, the critic's head) trainable, so "what
trains" is exactly `requires_grad`. Every actor that serves a LoRA policy (trainer, rollout engine, scoring
copies) wraps its base the same way, so the state dict names of that trainable state agree everywhere. B starts
at zero, so a freshly wrapped model computes exactly its base: version 0 is the base wherever it is served.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

ADAPTER = "default"  # peft's name for the one adapter a model carries
VALUE_HEAD = "score"  # the value model's head (`actors.modeling.load_value_model`): trained whole, not through LoRA


def peft_config(lora: dict, value_head: bool = False, task_type: str | None = None):
    """peft's `LoraConfig` for `model.lora` (a dict of the config's fields); `value_head`: the critic's head is
    trained fully (`modules_to_save`)."""
    from peft import LoraConfig

    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], modules_to_save=[VALUE_HEAD] if value_head else None,
                      task_type=task_type)


def wrap(model: torch.nn.Module, lora: dict, value_head: bool = False, task_type: str | None = None):
    """`model` with fresh adapters (a peft `PeftModel`); its forward takes and returns what the model's does."""
    from peft import get_peft_model

    return get_peft_model(model, peft_config(lora, value_head, task_type))


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` (or the module a DeepSpeed engine holds) is a peft-wrapped model."""
    model = getattr(model, "module", model)
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def trainable_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters that train (adapters and a critic's head, under LoRA; all, without)."""
    return {name for name, p in model.named_parameters() if p.requires_grad}


def sync_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a weight sync sends and a checkpoint needs: the adapters (and a critic's head) under LoRA, else the
    whole state dict."""
    state = model.state_dict()
    if not is_lora(model):
        return state
    names = trainable_names(model)
    return {name: t for name, t in state.items() if name in names}


def load_sync_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what `sync_state` gave, in place: every key, no more and no fewer (an adapter of another shape or
    target set fails here, naming the keys)."""
    with torch.no_grad():
        if not is_lora(model):
            model.load_state_dict(state, strict=True)
            return
        want = trainable_names(model)
        missing, extra = sorted(want - set(state)), sorted(set(state) - want)
        if missing or extra:
            raise ValueError(f"LoRA state does not match the model's adapters: missing {missing[:3]}, unexpected "
                             f"{extra[:3]} ({len(missing)} and {len(extra)} in all); was it trained with another "
                             "model.lora (target_modules) or base?")
        model.load_state_dict(state, strict=False)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------- files


def peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with peft's on-disk names: the adapter's name dropped (`lora_A.default.weight` ->
    `lora_A.weight`, `modules_to_save.default.weight` -> `weight`), as `PeftModel.save_pretrained` writes them."""
    out = {}
    for name, t in state.items():
        name = name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(f".{ADAPTER}.", ".")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_adapter(directory: str | Path, state: dict[str, torch.Tensor], lora: dict, base_path: str) -> Path:
    """Write a policy's adapter in peft's format (adapter_config.json, adapter_model.safetensors) without a model
    in memory: what `PeftModel.from_pretrained` and vLLM's `LoRARequest` load. The target modules are listed by
    name (the ones the state holds), not as "all-linear", so a loader need not resolve them."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    targets = sorted({name.split(".lora_")[0].rsplit(".", 1)[-1] for name in state if ".lora_" in name})
    config = peft_config({**lora, "target_modules": targets}, task_type="CAUSAL_LM")
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(directory))
    save_file(peft_names(state), str(directory / "adapter_model.safetensors"))
    return directory


def save_merged_policy(path: str | Path, base_path: str, lora: dict, adapter: dict[str, torch.Tensor], tokenizer,
                       dtype: str = "float32", trust_remote_code: bool = False) -> Path:
    """The policy as a plain Hugging Face model at `path`, its adapter merged into the base weights (peft's
    `merge_and_unload`: W + (alpha / r) B A), with the tokenizer; and the adapter alone, in peft's format, at
    `path`/adapter. Built from the base on CPU, so the caller's model is not touched."""
    from actors.modeling import load_causal_lm

    path = Path(path)
    model = wrap(load_causal_lm(base_path, dtype, trust_remote_code, "cpu"), lora, task_type="CAUSAL_LM")
    load_sync_state(model, {k: v.to("cpu") for k, v in adapter.items()})
    model.save_pretrained(str(path / "adapter"))
    model.merge_and_unload().save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))
    return path


def base_checksum(path: str | Path) -> str:
    """SHA-256 of a model directory's weights, read from its files without building the model: every tensor of its
    safetensors files by name (name, dtype, shape and bytes; how they are split into shards does not matter), or,
    for a checkpoint without safetensors, the bytes of its weight files in name order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors import safe_open

        digests: dict[str, bytes] = {}  # per tensor, then combined in name order
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    t = st.get_tensor(key).contiguous()
                    d = hashlib.sha256(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
                    d.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
                    digests[key] = d.digest()
        for key in sorted(digests):
            h.update(digests[key])
        return h.hexdigest()
    weights = sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if not weights:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {str(path)!r}")
    for f in weights:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()
