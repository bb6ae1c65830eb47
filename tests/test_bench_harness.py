"""The pure parts of benchmarks/grpo_vs_trl.py (settings mapping, ratios, thresholds), so the harness cannot
rot silently. Nothing here trains; the TRL checks are skipped when TRL is not installed."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "examples" / "arith_grpo.yaml")


def _load_harness():
    spec = importlib.util.spec_from_file_location("bench_grpo_vs_trl", REPO / "benchmarks" / "grpo_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench = _load_harness()


def settings(*overrides: str):
    return bench.settings_from_config(load_config(CONFIG, list(overrides)))


def harness_args(*argv: str):
    return bench.build_parser().parse_args(list(argv))


def test_settings_come_from_the_config_and_the_harness_flags():
    args = harness_args("--steps", "7", "--prompts-per-step", "16", "--group-size", "4", "--eval-every", "3",
                        "--eval-size", "50", "--set", "trainer.lr=1e-3")
    s = bench.settings_from_config(load_config(CONFIG, bench.config_overrides(args)))
    assert (s.steps, s.prompts_per_step, s.group_size, s.eval_every, s.eval_size) == (7, 16, 4, 3, 50)
    assert s.lr == 1e-3
    assert s.max_new_tokens == 10 and s.temperature == 1.0 and s.kl_coef == 0.0 and s.agg == "token-mean"
    assert s.model_path.endswith("checkpoints/arith-sft")


def test_raylhf_overrides_keep_the_shared_ones_and_silence_logging():
    shared = bench.config_overrides(harness_args("--steps", "5"))
    out = bench.raylhf_overrides(shared)
    assert out[: len(shared)] == shared and "loop.steps=5" in out
    assert "logging.progress=false" in out and "checkpoint.every=0" in out
    load_config(CONFIG, out)  # every override names a real field


def test_trl_config_runs_the_same_grpo():
    s = settings("loop.prompts_per_step=32", "rollout.group_size=8", "trainer.micro_batch_size=64",
                 "algorithm.clip_high=0.28")
    kw = bench.trl_config_kwargs(s, "out")
    assert kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] == 32 * 8
    assert kw["generation_batch_size"] == 32 * 8 and kw["num_generations"] == 8
    assert kw["max_steps"] == s.steps and kw["num_iterations"] == s.epochs == 1
    assert kw["beta"] == 0.0  # kl_coef 0: no reference model either side
    assert (kw["epsilon"], kw["epsilon_high"]) == (0.2, 0.28)
    assert kw["loss_type"] == "dapo" and kw["scale_rewards"] == "group"  # token-mean, std-normalised groups
    assert kw["max_completion_length"] == s.max_new_tokens and kw["temperature"] == s.temperature
    assert kw["learning_rate"] == s.lr and (kw["adam_beta1"], kw["adam_beta2"]) == s.betas
    assert kw["max_grad_norm"] == s.grad_clip and kw["warmup_steps"] == s.warmup_steps
    assert kw["bf16"] is False and kw["gradient_checkpointing"] is False and kw["top_k"] == 0


@pytest.mark.parametrize("overrides, loss, scale", [
    (["algorithm.agg=seq-mean-token-mean"], "grpo", "group"),
    (["algorithm.estimator=dr_grpo"], "dr_grpo", "none"),
    (["algorithm.std_normalize=false"], "dapo", "none"),
])
def test_aggregation_and_normalisation_map_to_trl_names(overrides, loss, scale):
    kw = bench.trl_config_kwargs(settings(*overrides), "out")
    assert (kw["loss_type"], kw["scale_rewards"]) == (loss, scale)


def test_epochs_and_minibatches_map_to_trl_iterations_and_steps():
    s = settings("trainer.epochs=2", "trainer.num_minibatches=2", "loop.steps=10", "loop.prompts_per_step=16",
                 "rollout.group_size=8", "trainer.micro_batch_size=48")
    kw = bench.trl_config_kwargs(s, "out")
    assert kw["num_iterations"] == 2 and kw["max_steps"] == 10 * 2 * 2
    micro, accum = bench.trl_batching(s)
    assert micro * accum == 16 * 8 // 2 and (16 * 8 // 2) % micro == 0 and micro <= 48


@pytest.mark.parametrize("override", ["algorithm.estimator=rloo", "algorithm.dual_clip=3",
                                      "algorithm.entropy_coef=0.01", "model.dtype=bfloat16"])
def test_settings_trl_cannot_match_are_refused(override):
    with pytest.raises(ValueError, match="cannot run identically in TRL"):
        settings(override)


def test_differences_name_every_gap_with_a_reason():
    diffs = bench.differences(settings(), trl_threads=2)
    assert len(diffs) >= 5
    for d in diffs:
        assert set(d) == {"what", "raylhf", "trl", "why"} and all(d.values())


def test_first_step_reaching_threshold():
    evals = [(10, 0.55), (0, 0.40), (5, 0.61), (15, 0.70)]
    assert bench.first_step_reaching(evals, 0.6) == 5  # in step order, not list order
    assert bench.first_step_reaching(evals, 0.70) == 15  # >= counts
    assert bench.first_step_reaching(evals, 0.9) is None
    assert bench.first_step_reaching([], 0.5) is None


def test_summarize_uses_step_time_tokens_and_evals():
    records = [{"step": 0, "eval/accuracy": 0.4},
               {"step": 1, "time/step": 2.0, "tokens/generated": 100.0},
               {"step": 2, "time/step": 1.0, "tokens/generated": 100.0, "eval/accuracy": 0.5},
               {"step": 3, "time/step": 3.0, "tokens/generated": 100.0, "eval/accuracy": 0.7}]
    out = bench.summarize(records, threshold=0.6)
    assert out["steps"] == 3 and out["generated_tokens"] == 300
    assert out["tokens_per_s"] == pytest.approx(300 / 6.0)
    assert out["step_seconds_median"] == 2.0
    assert out["steps_to_threshold"] == 3
    assert (out["eval_accuracy_start"], out["eval_accuracy_end"]) == (0.4, 0.7)
    assert out["overhead_share"] is None  # TRL's records have no breakdown
    for r, overhead in zip(records[1:], (0.1, 0.1, 0.3)):
        r["time/overhead"] = overhead  # 5%, 10%, 10% of the steps
    out = bench.summarize(records, threshold=0.6)
    assert out["overhead_frac_median"] == pytest.approx(0.1) and out["overhead_share"] == pytest.approx(0.5 / 6.0)


def test_ratios_and_goals():
    ours = {"tokens_per_s": 300.0, "step_seconds_median": 0.5, "steps_to_threshold": 20, "peak_rss_mb": 2000.0,
            "peak_pss_mb": 1000.0}
    theirs = {"tokens_per_s": 100.0, "step_seconds_median": 1.0, "steps_to_threshold": 25, "peak_rss_mb": 500.0,
              "peak_pss_mb": None}
    r = bench.ratios(ours, theirs)
    assert r["tokens_per_s"] == 3.0 and r["step_seconds_median"] == 0.5 and r["steps_to_threshold"] == 0.8
    assert r["peak_rss_mb"] == 4.0 and r["peak_pss_mb"] is None
    assert bench.goals({**ours, "overhead_share": 0.03}, theirs) == {
        "throughput_2x": True, "steps_to_threshold_not_more": True, "overhead_3pct": True}
    assert bench.goals({**ours, "tokens_per_s": 150.0, "steps_to_threshold": None, "overhead_share": 0.031}, theirs) == {
        "throughput_2x": False, "steps_to_threshold_not_more": False, "overhead_3pct": False}
    assert not bench.goals(ours, theirs)["overhead_3pct"]  # not measured is not met
    assert bench.goals(ours, {**theirs, "steps_to_threshold": None})["steps_to_threshold_not_more"]


def test_repeats_alternate_and_combine_to_medians():
    assert bench.run_order(["raylhf", "trl"], 3) == [("raylhf", 0), ("trl", 0), ("trl", 1), ("raylhf", 1),
                                                     ("raylhf", 2), ("trl", 2)]
    runs = [{"tokens_per_s": t, "step_seconds_median": 1.0, "peak_rss_mb": 1.0, "peak_pss_mb": 1.0, "wall_s": 1.0,
             "eval_accuracy_start": 0.4, "eval_accuracy_end": 0.6, "steps_to_threshold": n}
            for t, n in ((100.0, 10), (300.0, None), (200.0, 30))]
    out = bench.combine(runs)
    assert out["tokens_per_s"] == 200.0 and out["steps_to_threshold"] == 30 and out["repeats"] == 3
    assert bench.combine(runs[1:2])["steps_to_threshold"] is None


def test_trl_reward_wraps_the_configs_function_and_counts_tokens():
    from rewards.final_answer import hash_answer

    counter = [0]
    fn = bench.trl_reward(hash_answer, "hash_answer", ["answer"], counter)
    scores = fn(prompts=["1+2=", "1+2="], completions=["#### 3", "#### 4"], completion_ids=[[1, 2, 3], [4, 5]],
                answer=["3", "3"], trainer_state=None)
    assert scores == [1.0, 0.0] and counter == [5] and fn.__name__ == "hash_answer"


def test_readme_command_parses():
    readme = (REPO / "benchmarks" / "README.md").read_text()
    commands = re.findall(r"^(?:\$ )?python benchmarks/grpo_vs_trl\.py(.*)$", readme, flags=re.M)
    assert commands, "benchmarks/README.md shows no grpo_vs_trl.py command"
    for line in commands:
        bench.build_parser().parse_args(shlex.split(line))


def test_the_mapping_builds_a_real_grpo_config(tmp_path):
    trl = pytest.importorskip("trl")
    s = settings("loop.prompts_per_step=16", "rollout.group_size=4", "trainer.micro_batch_size=32")
    kw = bench.trl_config_kwargs(s, str(tmp_path))
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    assert set(kw) <= fields, f"fields TRL no longer has: {set(kw) - fields}"
    cfg = trl.GRPOConfig(**kw)
    assert cfg.generation_batch_size == 16 * 4
    assert cfg.steps_per_generation == cfg.gradient_accumulation_steps  # one generation per optimizer step
    assert cfg.beta == 0.0 and cfg.loss_type == "dapo" and cfg.scale_rewards == "group"


def test_fair_variants_give_each_framework_its_defaults_and_its_other_thread_and_precision_settings():
    """Each framework's defaults first (the "defaults" pair takes them), then its other threads x precision settings:
    raylhf's bf16 autocast only where the CPU has native bf16 (elsewhere autocast auto is the float32 run again)."""
    vs = bench.fair_variants(2, ["loop.max_staleness=1"], native_bf16=True)
    assert [(v.name, v.framework) for v in vs] == [
        ("raylhf", "raylhf"), ("raylhf-2threads", "raylhf"), ("raylhf-bf16", "raylhf"),
        ("raylhf-2threads-bf16", "raylhf"), ("trl", "trl"), ("trl-1thread", "trl"), ("trl-fp32", "trl"),
        ("trl-1thread-fp32", "trl")]
    by = {v.name: v for v in vs}
    assert vs[0].raylhf_sets == ("loop.max_staleness=1",)
    assert set(vs[1].raylhf_sets) >= {"rollout.threads=2", "trainer.threads=2", "loop.max_staleness=1"}
    assert not any("autocast" in x for x in vs[0].raylhf_sets + vs[1].raylhf_sets)  # raylhf's default: float32
    autocast = {"rollout.dtype=auto", "scoring.autocast=auto", "trainer.autocast=auto"}
    assert set(by["raylhf-bf16"].raylhf_sets) == autocast | {"loop.max_staleness=1"}
    assert set(by["raylhf-2threads-bf16"].raylhf_sets) == set(vs[1].raylhf_sets) | autocast
    assert [(v.trl_threads, v.trl_precision) for v in vs[4:]] == [(0, "default"), (1, "default"), (0, "fp32"),
                                                                  (1, "fp32")]  # threads 0: torch's default
    for v in vs[:4]:  # every override names a real field and validates
        load_config(CONFIG, bench.raylhf_overrides(list(v.raylhf_sets)))
    assert [v.name for v, _ in bench.variant_order(vs[:2] + vs[4:5], 2)] == [
        "raylhf", "raylhf-2threads", "trl", "trl", "raylhf-2threads", "raylhf"]
    plain = bench.fair_variants(2, native_bf16=False)  # no native bf16: no raylhf autocast runs; TRL's bf16 stays
    assert [v.name for v in plain] == ["raylhf", "raylhf-2threads", "trl", "trl-1thread", "trl-fp32",
                                       "trl-1thread-fp32"]


def test_trl_precision_default_leaves_bf16_to_trl_and_fp32_pins_it():
    s = settings()
    assert bench.trl_config_kwargs(s, "out")["bf16"] is False  # the legacy comparison: float32
    assert {"bf16", "fp16"}.isdisjoint(bench.trl_config_kwargs(s, "out", "default"))
    with pytest.raises(ValueError, match="TRL precision"):
        bench.trl_config_kwargs(s, "out", "bf16")
    trl = pytest.importorskip("trl")
    assert trl.GRPOConfig(**bench.trl_config_kwargs(s, "out", "default")).bf16 is True  # TRL's own default
    assert trl.GRPOConfig(**bench.trl_config_kwargs(s, "out", "fp32")).bf16 is False


def test_pairs_compare_the_defaults_and_each_frameworks_fastest_variant():
    vs = bench.fair_variants(2)
    results = {"raylhf": {"tokens_per_s": 300.0}, "raylhf-2threads": {"tokens_per_s": 400.0},
               "trl": {"tokens_per_s": 100.0}, "trl-1thread": {"tokens_per_s": 250.0}}
    p = bench.pairs(results, vs)
    assert (p["defaults"]["raylhf"], p["defaults"]["trl"]) == ("raylhf", "trl")
    assert p["defaults"]["ratios"]["tokens_per_s"] == 3.0 and p["defaults"]["goals"]["throughput_2x"]
    assert (p["best"]["raylhf"], p["best"]["trl"]) == ("raylhf-2threads", "trl-1thread")
    assert p["best"]["ratios"]["tokens_per_s"] == 1.6 and p["best"]["goals"]["throughput_1.5x"]
    assert bench.pairs({"raylhf": {}}, vs[:1]) == {}


def test_fair_differences_describe_both_thread_settings_once():
    diffs = bench.differences(settings(), 1, ["loop.max_staleness=1"], fair=True)
    whats = [d["what"] for d in diffs]
    assert whats[0].startswith("processes and threads (--fair") and "processes and threads" not in whats
    assert whats[1].startswith("precision (--fair") and "bf16" in diffs[1]["raylhf"] + diffs[1]["trl"]
    # the rest is the plain comparison's list: threads and precision replace its threads entry
    assert "raylhf-only settings (--raylhf-set)" in whats
    assert len(whats) == len(bench.differences(settings(), 1, ["x"])) + 1
    plain = [d["what"] for d in bench.differences(settings(), 1)]
    trl_bf16 = [d["what"] for d in bench.differences(settings(), 1, trl_precision="default")]
    assert "precision (--trl-precision)" not in plain and "precision (--trl-precision)" in trl_bf16


def test_report_of_one_framework_says_no_goal_is_met():
    """`--frameworks trl` (one framework, no ratios): the report prints, every goal "no" (it raised a KeyError)."""
    result = {"frameworks": {"trl": {"tokens_per_s": 500.0}}, "ratios": {}, "threshold": 0.5, "variants": {},
              "goals": bench.goals({}, {"tokens_per_s": 500.0}), "differences": []}
    text = bench.report(result)
    assert "throughput >= 2x TRL: no" in text and "overhead <= 3% of the step: no" in text and "500" in text


def test_default_threads_follow_the_example_jobs_placement_on_this_machine():
    """The example (one rollout worker, one trainer rank, no scoring) on a 2-core machine: on-policy each actor takes
    both cores in its turn; asynchronous each its one reserved CPU; an explicit int stays."""
    assert bench.default_threads(load_config(CONFIG, []), 2) == [2, 2]
    assert bench.default_threads(load_config(CONFIG, []), 6) == [6, 6]
    assert bench.default_threads(load_config(CONFIG, ["loop.max_staleness=1"]), 2) == [1, 1]
    assert bench.default_threads(load_config(CONFIG, ["rollout.threads=3"]), 2) == [2, 3]


def test_fair_variants_run_one_thread_as_raylhfs_other_setting_when_its_default_is_a_thread_per_core(monkeypatch):
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)  # `differences` names the machine's cores
    vs = bench.fair_variants(2, None, native_bf16=False, default=[2, 2])  # `threads: auto` on an idle 2-core box, on-policy
    assert [v.name for v in vs] == ["raylhf", "raylhf-1thread", "trl", "trl-1thread", "trl-fp32", "trl-1thread-fp32"]
    assert vs[0].raylhf_sets == () and set(vs[1].raylhf_sets) == {"rollout.threads=1", "trainer.threads=1",
                                                                   "scoring.threads=1"}
    assert [v.name for v in bench.fair_variants(2, None, native_bf16=False, default=[1, 1])][1] == "raylhf-2threads"  # async default
    first = bench.differences(settings(), 1, fair=True, raylhf_threads=[2, 2])[0]
    assert "2 each" in first["raylhf"] and "raylhf = raylhf-2threads" in first["why"], first
    assert "raylhf = " not in bench.differences(settings(), 1, fair=True, raylhf_threads=[1, 1])[0]["why"]
