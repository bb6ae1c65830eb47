"""Config validation: every mistake exits 2 before Ray starts, with a message naming the field."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.config import apply_overrides, load_config
from tests.conftest import base_config


def write(tmp_path, cfg: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


BAD = [
    # (description, overrides to a valid config, text the error must contain)
    ("wrong type", ["trainer.lr=fast"], "trainer.lr"),
    ("unknown key", ["trainer.learning_rate=1e-5"], "trainer.learning_rate"),
    ("unknown section", ["optimiser.lr=1"], "optimiser"),
    ("zero group size", ["rollout.group_size=0"], "rollout.group_size"),
    ("negative workers", ["trainer.num_workers=-1"], "trainer.num_workers"),
    ("zero steps", ["loop.steps=0"], "loop.steps"),
    ("group size 1 with std normalization", ["rollout.group_size=1"], "rollout.group_size"),
    ("reward that cannot be imported", ["reward.functions=[{name: 'no_such_module:fn'}]"], "reward.functions.0.name"),
    ("reward attribute missing", ["reward.functions=[{name: 'rewards.final_answer:nope'}]"], "reward.functions.0.name"),
    ("reward file missing", ["reward.functions=[{name: 'missing/file.py:fn'}]"], "reward.functions.0.name"),
    ("missing model path", ["model.path=/nonexistent/model"], "model.path"),
    ("bad estimator", ["algorithm.estimator=ppo2"], "algorithm.estimator"),
    ("clip_low of 1", ["algorithm.clip_low=1.0"], "algorithm.clip_low"),
    ("batch does not split over ranks", ["trainer.num_workers=3"], "trainer"),
    ("bad aggregation", ["algorithm.agg=sum"], "algorithm.agg"),
    ("top_p above 1", ["rollout.top_p=1.5"], "rollout.top_p"),
    ("data file missing", ["data.train={source: nothere.jsonl}"], "data.train.source"),
    ("missing reward section", ["reward=null"], "reward"),
    ("TIS with the rollout's own log-probs", ["algorithm.tis_cap=2", "algorithm.old_logprobs=rollout"],
     "algorithm.tis_cap"),
    ("negative staleness", ["loop.max_staleness=-1"], "loop.max_staleness"),
    ("bad stale-group policy", ["loop.stale_groups=keep"], "loop.stale_groups"),
    ("partial rollouts on-policy", ["rollout.partial=true"], "rollout.partial"),
    ("decoupled PPO with a scoring pass", ["algorithm.decoupled=true", "algorithm.old_logprobs=recompute"],
     "algorithm.decoupled"),
    ("partial rollouts scored again at one version",
     ["rollout.partial=true", "loop.max_staleness=2", "algorithm.old_logprobs=recompute"], "rollout.partial"),
    ("bad policy loss", ["algorithm.policy_loss=grpo"], "algorithm.policy_loss"),
    ("clip_low of 1 with gspo", ["algorithm.policy_loss=gspo", "algorithm.clip_low=1.0"], "algorithm.clip_low"),
    ("dual clip with cispo", ["algorithm.policy_loss=cispo", "algorithm.dual_clip=3"], "algorithm.dual_clip"),
    ("bad rollout correction", ["algorithm.rollout_correction={kind: is}"], "algorithm.rollout_correction.kind"),
    ("correction with the rollout's own log-probs",
     ["algorithm.rollout_correction={kind: icepop}", "algorithm.old_logprobs=rollout"], "algorithm.rollout_correction"),
    ("icepop bounds reversed", ["algorithm.rollout_correction={kind: icepop, low: 2, high: 1}"],
     "algorithm.rollout_correction"),
    ("tis with a lower bound", ["algorithm.rollout_correction={kind: tis, low: 0.5}"], "algorithm.rollout_correction"),
    ("bounds without a correction", ["algorithm.rollout_correction={high: 2}"], "algorithm.rollout_correction"),
    ("tis_cap next to rollout_correction", ["algorithm.tis_cap=2", "algorithm.rollout_correction={kind: seq_mask}"],
     "algorithm.tis_cap"),
    ("top-entropy quantile 0", ["algorithm.top_entropy_quantile=0"], "algorithm.top_entropy_quantile"),
    ("top-entropy quantile above 1", ["algorithm.top_entropy_quantile=1.5"], "algorithm.top_entropy_quantile"),
    ("teacher missing", ["distill.teacher=/nonexistent/teacher"], "distill.teacher"),
    ("distillation weight 0", ["distill.coef=0"], "distill.coef"),
]


def test_tis_cap_alone_recomputes_old_logprobs_and_any_staleness_is_valid():
    from orchestrator.config import AlgorithmConfig, LoopConfig

    assert AlgorithmConfig().old_logprobs == "rollout" and AlgorithmConfig().tis_cap is None
    assert AlgorithmConfig(tis_cap=2.0).old_logprobs == "recompute"
    assert LoopConfig(max_staleness=1).max_staleness == 1
    assert LoopConfig(max_staleness=5).max_staleness == 5 and LoopConfig().stale_groups == "drop"


def test_deprecated_tis_cap_becomes_a_tis_correction_with_one_message(capsys, monkeypatch):
    from orchestrator import config

    monkeypatch.setattr(config, "_SHOWN", set())
    first, second = config.AlgorithmConfig(tis_cap=2.0), config.AlgorithmConfig(tis_cap=3.0)
    assert first.rollout_correction.model_dump() == {"kind": "tis", "low": None, "high": 2.0}
    assert second.rollout_correction.high == 3.0 and first.tis_cap is None and first.old_logprobs == "recompute"
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1 and "rollout_correction: {kind: tis, high: 2}" in err, err


def test_objective_and_correction_defaults():
    """gspo and cispo take their papers' clip ranges (and gspo its sequence mean) unless the config sets them;
    each correction takes its documented bounds, and any correction recomputes pi_old."""
    from orchestrator.config import AlgorithmConfig

    ppo, gspo, cispo = (AlgorithmConfig(policy_loss=p) for p in ("ppo", "gspo", "cispo"))
    assert (ppo.clip_low, ppo.clip_high, ppo.agg) == (0.2, 0.2, "token-mean")
    assert (gspo.clip_low, gspo.clip_high, gspo.agg) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert (cispo.clip_low, cispo.clip_high, cispo.agg) == (1.0, 0.28, "token-mean")
    mine = AlgorithmConfig(policy_loss="gspo", clip_low=1e-3, clip_high=2e-3, agg="token-mean")
    assert (mine.clip_low, mine.clip_high, mine.agg) == (1e-3, 2e-3, "token-mean")
    assert AlgorithmConfig(policy_loss="gspo", estimator="dr_grpo").agg == "seq-mean-token-sum-norm"
    bounds = {k: AlgorithmConfig(rollout_correction={"kind": k}) for k in ("tis", "icepop", "seq_mask")}
    assert [(b.rollout_correction.low, b.rollout_correction.high) for b in bounds.values()] == [
        (None, 2.0), (0.5, 5.0), (0.999, 1.001)]
    assert all(b.old_logprobs == "recompute" for b in bounds.values())
    assert AlgorithmConfig().rollout_correction.kind == "none" and AlgorithmConfig().top_entropy_quantile == 1.0


@pytest.mark.parametrize("desc,overrides,field", BAD, ids=[b[0] for b in BAD])
def test_invalid_config_exits_2_and_names_field(tmp_path, tiny_model, capsys, desc, overrides, field):
    path = write(tmp_path, base_config(tiny_model))
    args = ["train", path] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert field in err, err
    assert "Traceback" not in err


def test_cli_process_exits_2_before_ray_starts(tmp_path, tiny_model):
    """The installed console script, as a user runs it: exit code 2, field named, no Ray started."""
    path = write(tmp_path, base_config(tiny_model))
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", path, "--set", "rollout.group_size=zero"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "rollout.group_size" in proc.stderr
    assert "Ray" not in proc.stderr and "ray" not in proc.stdout.lower()


def test_missing_config_file_exits_2(capsys):
    assert main(["train", "/no/such/job.yaml"]) == 2
    assert "not found" in capsys.readouterr().err


def test_valid_config_and_overrides(tmp_path, tiny_model):
    cfg = load_config(write(tmp_path, base_config(tiny_model)), ["trainer.lr=3e-4", "rollout.stop=[\"\\n\"]"])
    assert cfg.trainer.lr == 3e-4
    assert cfg.rollout.stop == ["\n"]
    assert cfg.trainer.zero_stage == 2  # the default the issue asks for


def test_apply_overrides_creates_nested_keys_without_touching_input():
    raw = {"a": {"b": 1}}
    out = apply_overrides(raw, ["a.c.d=2", "a.b=x"])
    assert out == {"a": {"b": "x", "c": {"d": 2}}}
    assert raw == {"a": {"b": 1}}


def test_config_show_prints_resolved_values_and_descriptions(tmp_path, tiny_model, capsys):
    assert main(["config", "show", write(tmp_path, base_config(tiny_model)), "--set", "loop.steps=7"]) == 0
    out = capsys.readouterr().out
    assert "steps: 7" in out
    assert "# Training steps" in out
    assert yaml.safe_load(out)["loop"]["steps"] == 7  # the printed config is itself valid YAML


def test_example_config_is_valid():
    cfg = load_config("examples/arith_grpo.yaml", check_paths=False)
    assert cfg.rollout.group_size >= 2


@pytest.mark.parametrize("rows,expected", [
    ([{"prompt": "1+2=", "answer": "3"}, {"question": "no prompt"}], "line 2"),
    ([{"prompt": "", "answer": "3"}], "line 1"),
    ([{"prompt": 12, "answer": "3"}], "line 1"),
    ([{"prompt": "1+2=" * 100, "answer": "3"}], "max_prompt_tokens"),
], ids=["missing prompt", "empty prompt", "wrong type", "too long"])
def test_bad_data_rows_exit_2_before_ray_starts(tmp_path, tiny_model, capsys, rows, expected):
    import json

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = base_config(tiny_model, data={"train": {"source": str(data)}, "max_prompt_tokens": 64})
    assert main(["train", write(tmp_path, cfg), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "data error" in err and expected in err, err


def test_a_logging_backend_that_is_not_installed_exits_2_naming_it(tmp_path, tiny_model, capsys):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = base_config(tiny_model, logging={"wandb": True})
    assert main(["train", write(tmp_path, cfg), "--run-dir", str(tmp_path / "run")]) == 2
    assert "logging.wandb: true, but wandb is not installed (pip install wandb" in capsys.readouterr().err


# ----------------------------------------------------------------------------- non-finite numbers


def _float_fields(model: type, prefix: str = "") -> list[tuple[str, type]]:
    """(dotted path, owning model) of every float-valued field reachable from `model`: nested sections,
    list-of-section fields (path segment `0`), optional sections, tuples and dicts of floats."""
    import types
    import typing

    from pydantic import BaseModel

    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        todo, floats = [info.annotation], False
        while todo:
            t = todo.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                out += _float_fields(t, f"{path}.0." if typing.get_origin(info.annotation) is list else f"{path}.")
            elif t is float:
                floats = True
            elif typing.get_origin(t) in (list, tuple, dict, typing.Union, types.UnionType):
                todo += [a for a in typing.get_args(t) if a is not Ellipsis]
        if floats:
            out.append((path, model))
    return out


def _schema_floats() -> list[tuple[str, type]]:
    from orchestrator.config import JobConfig
    from orchestrator.offline.config import DPOConfig, RewardModelConfig

    return [(f"{kind.__name__}:{path}", owner) for kind in (JobConfig, RewardModelConfig, DPOConfig)
            for path, owner in _float_fields(kind)]


def test_the_schema_walk_finds_the_float_fields():
    """The walk below reaches nested, optional, tuple, dict and list-of-section floats."""
    paths = {p for p, _ in _schema_floats()}
    for expected in ("JobConfig:trainer.lr", "JobConfig:trainer.betas", "JobConfig:rollout.resources",
                     "JobConfig:reward.functions.0.weight", "JobConfig:algorithm.tis_cap",
                     "JobConfig:rollout.vllm.gpu_memory_utilization", "DPOConfig:beta", "DPOConfig:trainer.lr"):
        assert expected in paths, sorted(paths)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path, owner", _schema_floats(), ids=[p for p, _ in _schema_floats()])
def test_every_float_field_of_every_config_rejects_nan_and_inf(path, owner, bad):
    """Set each float field (wherever it sits) to NaN or +-inf on its own section: a validation error naming it."""
    import typing

    from pydantic import ValidationError

    name = path.rpartition(".")[2].rpartition(":")[2]
    annotation = owner.model_fields[name].annotation
    args = {a for t in (annotation, *typing.get_args(annotation)) for a in (t, typing.get_origin(t))}
    value = (bad, bad) if tuple in args else {"node": bad} if dict in args else [bad] if list in args else bad
    required = {"RewardFunction": {"name": "m:f"}, "DataSource": {}, "OptimConfig": {"lr": 1e-3}}
    data = {**required.get(owner.__name__, {}), name: value}
    with pytest.raises(ValidationError) as err:
        owner.model_validate(data)
    assert any(e["loc"][0] == name and e["type"] == "finite_number" for e in err.value.errors()), err.value


NON_FINITE = [
    ["trainer.lr=.inf"], ["reward.failure_score=.nan"], ["reward.functions=[{name: rewards.final_answer:hash_answer, "
    "weight: .nan}]"], ["reward.functions=[{name: rewards.final_answer:hash_answer, weight: .inf}]"],
    ["reward.accuracy_threshold=.nan"], ["algorithm.entropy_coef=.inf"], ["algorithm.kl_target=.inf"],
    ["trainer.betas=[0.9, .nan]"], ["rollout.resources={rollout_node: .inf}"], ["reward.timeout_s=-.inf"],
]


@pytest.mark.parametrize("overrides", NON_FINITE, ids=[o[0] for o in NON_FINITE])
def test_config_show_exits_2_on_a_non_finite_number_naming_the_field(tmp_path, tiny_model, capsys, overrides):
    """`raylhf config show` with `--set key=.inf/.nan`: exit 2, the field named, no traceback."""
    path = write(tmp_path, base_config(tiny_model))
    assert main(["config", "show", path] + [a for o in overrides for a in ("--set", o)]) == 2
    err = capsys.readouterr().err
    field = overrides[0].split("=")[0].replace("reward.functions", "reward.functions.0.weight")
    assert field in err and "finite" in err, err
    assert "Traceback" not in err


def test_a_non_finite_number_in_the_yaml_file_is_rejected(tmp_path, tiny_model):
    """YAML's own .inf / .nan in the file, in a list-of-section field."""
    cfg = base_config(tiny_model)
    text = yaml.safe_dump(cfg).replace("name: rewards.final_answer:hash_answer",
                                       "name: rewards.final_answer:hash_answer\n    weight: .inf")
    (tmp_path / "job.yaml").write_text(text)
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"reward\.functions\.0\.weight: .*finite"):
        load_config(str(tmp_path / "job.yaml"))


def test_partial_rollouts_take_the_vllm_engine_with_object_store_sync_only(tiny_model):
    """rollout.partial with vllm: valid when the weights reach busy workers through the object store (the board);
    refused, naming rollout.partial, under an NCCL broadcast (which waits for the generate call to end)."""
    from pydantic import ValidationError

    from orchestrator.config import JobConfig

    partial = {"rollout": {"engine": "vllm", "num_gpus": 1, "partial": True}, "loop": {"max_staleness": 2}}
    cfg = JobConfig.model_validate(base_config(tiny_model, **partial))
    assert cfg.rollout.partial and cfg.rollout.vllm.weight_sync == "object_store"
    nccl = base_config(tiny_model, **partial, trainer={"num_gpus": 1})
    nccl["rollout"]["vllm"] = {"weight_sync": "nccl"}
    with pytest.raises(ValidationError, match="rollout.partial: .*weight_sync: object_store"):
        JobConfig.model_validate(nccl)
