"""`raylhf export`: a run's policy (or any Hugging Face checkpoint) as a clean, verified model directory.

The output holds what `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` need and
nothing else: config.json, generation_config.json, the weights as safetensors, the tokenizer. It is
written to a temporary sibling directory, reloaded and compared with the source (every weight tensor
equal, the same logits on a probe text, the same token ids), and only then moved into place, so a
failed export never leaves a half-written model behind.

A run trained with LoRA (`model.lora`) writes its final policy merged (a plain model, exported as above) and the
adapter alone in peft's format in `final_policy/adapter/`. When the adapter's base model is there, the merged
weights are checked against base + adapter applied by peft (same logits on the probe). `--adapter-only` exports
the adapter alone instead, verified the same way after reloading it with `PeftModel.from_pretrained`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PROBE_TEXT = "12+34=46\nThe quick brown fox, 2 + 2 = 4."  # any text: the probe only has to be identical on both sides


class CheckpointError(Exception):
    """A path that is not a usable checkpoint, or an output that may not be written."""


class VerificationError(RuntimeError):
    """The written model does not reload to the same weights, tokens and logits."""


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The Hugging Face model directory at `path`: the directory itself, or a run directory's `final_policy/`."""
    p = Path(path).expanduser()
    if (p / "final_policy" / "config.json").is_file() and not (p / "config.json").is_file():
        p = p / "final_policy"
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a directory")
    if not (p / "config.json").is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no config.json: give a Hugging Face model directory "
                              "or a run directory holding final_policy/")
    return p.resolve()


def _check_output(src: Path, out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {str(out)!r} exists and is not a directory")
    if out == src or src in out.parents or out in src.parents:
        raise CheckpointError(f"output {str(out)!r} overlaps the checkpoint {str(src)!r}; choose another directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"output {str(out)!r} is not empty; pass --force to replace its contents")


def _load(path: Path, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load {str(path)!r} as a causal LM with its tokenizer: {e}") from None
    return model.eval(), tokenizer


def verify_copy(model, tokenizer, written: Path, trust_remote_code: bool = False) -> float:
    """Reload `written` and compare it with the in-memory `model` / `tokenizer`; the largest logit difference.

    Raises VerificationError when a weight, the probe's token ids or its logits differ."""
    import torch

    try:
        copy, copy_tok = _load(written, trust_remote_code)
    except CheckpointError as e:
        raise VerificationError(str(e)) from None
    if list(written.glob("*.bin")) or not list(written.glob("*.safetensors")):
        raise VerificationError(f"{written}: expected safetensors weights and no pickled .bin files")
    theirs = copy.state_dict()
    for name, tensor in model.state_dict().items():
        if name not in theirs or not torch.equal(tensor, theirs[name]):
            raise VerificationError(f"{written}: weight {name!r} differs after reloading")
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]  # [1, L]
    if not torch.equal(ids, copy_tok(PROBE_TEXT, return_tensors="pt")["input_ids"]):
        raise VerificationError(f"{written}: the reloaded tokenizer encodes the probe text differently")
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, copy(input_ids=ids).logits  # [1, L, V]
    diff = (a.float() - b.float()).abs().max().item()
    if not torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6):
        raise VerificationError(f"{written}: logits differ after reloading (max abs difference {diff:.3g})")
    return diff


def adapter_base(adapter: Path) -> Path:
    """The base model a peft adapter directory names (`base_model_name_or_path`), which must exist."""
    import json

    base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path") or ""
    if not (Path(base) / "config.json").is_file():
        raise CheckpointError(f"the LoRA adapter in {str(adapter)!r} names the base model {base!r}, which is not a "
                              "model directory here; the adapter cannot be checked without it")
    return Path(base)


def verify_adapter(model, tokenizer, adapter: Path, trust_remote_code: bool = False) -> float:
    """The largest logit difference on the probe text between `model` (the merged policy) and the adapter at
    `adapter` applied by peft to its base (`PeftModel.from_pretrained`, unmerged); VerificationError beyond float
    rounding (the merge adds (alpha / r) B A into each weight, the adapter adds it to each layer's output)."""
    import torch
    from peft import PeftModel

    base, _ = _load(adapter_base(adapter), trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    except (OSError, ValueError, KeyError) as e:
        raise VerificationError(f"{adapter}: peft cannot load the adapter: {e}") from None
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]  # [1, L]
    with torch.no_grad():
        a, b = model(input_ids=ids).logits.float(), peft_model(input_ids=ids).logits.float()  # [1, L, V]
    diff = (a - b).abs().max().item()
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
        raise VerificationError(f"{adapter}: base + adapter and the merged model give different logits (max abs "
                                f"difference {diff:.3g})")
    return diff


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike, force: bool = False,
                      trust_remote_code: bool = False, adapter_only: bool = False) -> dict:
    """Write `checkpoint` (a model directory, or a run directory's final_policy) to `out` and verify it;
    `adapter_only`: its LoRA adapter alone, in peft's format.

    Returns {"source", "output", "files", "max_logit_diff", "adapter_logit_diff"} (the last None when there is no
    adapter, or its base is missing, to check the merge against). A non-empty `out` is replaced only with `force`."""
    src = resolve_checkpoint(checkpoint)
    dest = Path(out).expanduser().resolve()
    _check_output(src, dest, force)
    adapter = src / "adapter"
    has_adapter = (adapter / "adapter_config.json").is_file()
    if adapter_only and not has_adapter:
        raise CheckpointError(f"{str(src)!r} holds no LoRA adapter (adapter/adapter_config.json): --adapter-only "
                              "exports what a run with model.lora wrote")
    model, tokenizer = _load(src, trust_remote_code)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    adapter_diff = None
    try:
        if adapter_only:
            shutil.copytree(adapter, staging)
            diff = adapter_diff = verify_adapter(model, tokenizer, staging, trust_remote_code)
        else:
            model.save_pretrained(staging)  # safetensors (transformers >= 5 writes nothing else)
            tokenizer.save_pretrained(staging)
            diff = verify_copy(model, tokenizer, staging, trust_remote_code)
            if has_adapter and _has_base(adapter):  # the merge, checked against base + adapter
                adapter_diff = verify_adapter(model, tokenizer, adapter, trust_remote_code)
        if dest.exists():
            shutil.rmtree(dest)  # empty, or non-empty with --force (checked above)
        staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"source": str(src), "output": str(dest), "files": sorted(p.name for p in dest.iterdir()),
            "max_logit_diff": diff, "adapter_logit_diff": adapter_diff}


def _has_base(adapter: Path) -> bool:
    try:
        adapter_base(adapter)
    except CheckpointError:
        return False
    return True


def main(checkpoint: str, out: str, force: bool = False, trust_remote_code: bool = False,
         adapter_only: bool = False) -> int:
    """The `raylhf export CHECKPOINT OUT [--force] [--adapter-only]` command: 0 when written and verified, 2 on a
    bad path, 1 when the written copy fails verification (then nothing is left at OUT's place)."""
    try:
        result = export_checkpoint(checkpoint, out, force, trust_remote_code, adapter_only)
    except CheckpointError as e:
        print(f"raylhf: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"raylhf: export failed verification, nothing written: {e}", file=sys.stderr)
        return 1
    print(f"exported {result['source']} -> {result['output']}")
    print(f"files: {', '.join(result['files'])}")
    if adapter_only:
        print(f"verified: the LoRA adapter (peft format) reloads with PeftModel.from_pretrained on its base and gives "
              f"the merged policy's logits (max abs difference {result['max_logit_diff']:.3g})")
        return 0
    print(f"verified: reloads with AutoModelForCausalLM; same weights, tokens and logits "
          f"(max abs logit difference {result['max_logit_diff']:.3g})")
    if result["adapter_logit_diff"] is not None:
        print(f"verified: the merged weights give the logits of base + LoRA adapter (max abs difference "
              f"{result['adapter_logit_diff']:.3g})")
    return 0
