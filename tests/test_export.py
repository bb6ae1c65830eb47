"""`raylhf export`: a verified Hugging Face model directory from a run or a checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.export import VerificationError, verify_copy


def _logits(path: str, text: str = "12+34=") -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits  # [1, L, V]


def test_export_from_a_run_directory(tmp_path, tiny_model, capsys):
    shutil.copytree(tiny_model, tmp_path / "run" / "final_policy")
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    out = tmp_path / "exported" / "policy"
    assert main(["export", str(tmp_path / "run"), str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".jsonl"))]
    assert torch.equal(_logits(str(out)), _logits(tiny_model))
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_export_refuses_a_non_empty_output_unless_forced(tmp_path, tiny_model, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", tiny_model, str(out)]) == 2
    assert "not empty; pass --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["export", tiny_model, str(out), "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing", "not_a_model", "inside_source"])
def test_export_bad_paths_exit_2(tmp_path, tiny_model, capsys, case):
    src, out = {"missing": (str(tmp_path / "nope"), str(tmp_path / "o")),
                "not_a_model": (str(tmp_path), str(tmp_path / "o")),
                "inside_source": (tiny_model, f"{tiny_model}/copy")}[case]
    assert main(["export", src, out, "--force"]) == 2
    assert "raylhf: " in capsys.readouterr().err


def test_verification_catches_a_changed_weight(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert verify_copy(model, tok, Path(tiny_model)) == 0.0
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    with pytest.raises(VerificationError, match="differs after reloading"):
        verify_copy(model, tok, Path(tiny_model))
