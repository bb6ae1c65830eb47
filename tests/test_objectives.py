"""Every policy objective and correction the config offers (algorithm.policy_loss, algorithm.rollout_correction,
algorithm.top_entropy_quantile, distill) trains the example's model for 50 steps.

In-process, to stay cheap: each step samples real groups from the example's prompts with the hf engine, rewards
them, scores them with a `ScoringWorker` (old policy, teacher), builds the batch and shards as the loop does
(`orchestrator.batching`), and runs `PolicyTrainer.train_step` (2 epochs, so the ratio leaves 1) with a plain
AdamW standing in for the DeepSpeed engine. The same choices through Ray and DeepSpeed: test_objectives_through_the
_real_pools (slow).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from actors.batch import compact
from actors.engines.hf import HFEngine
from actors.modeling import encode_prompts, load_causal_lm, load_tokenizer
from actors.records import PromptRequest
from actors.rollout import RolloutWorker
from actors.scoring import ScoringWorker
from actors.trainer import PolicyTrainer
from actors.weights import pack_state_dict
from examples.arith.task import make_rows
from orchestrator.batching import build_batch, shard
from orchestrator.collect import sampling_params
from orchestrator.config import JobConfig
from orchestrator.metrics import batch_metrics
from orchestrator.pool_specs import needs_scoring

from tests.conftest import base_config, save_tiny_reward_model
from tests.data.toy_rewards import char_hash_reward

STEPS = 50
CHOICES = {  # name: (config sections, a stat the trainer or the batch must report for it)
    "ppo": ({}, "clip_frac"),
    "gspo": ({"algorithm": {"policy_loss": "gspo"}}, "clip_frac"),
    "cispo": ({"algorithm": {"policy_loss": "cispo"}}, "clip_frac"),
    "tis": ({"algorithm": {"rollout_correction": {"kind": "tis"}}}, "tis_clip_frac"),
    "icepop": ({"algorithm": {"rollout_correction": {"kind": "icepop"}}}, "icepop_mask_frac"),
    "seq_mask": ({"algorithm": {"rollout_correction": {"kind": "seq_mask"}}}, "seq_mask_frac"),
    "top_entropy": ({"algorithm": {"top_entropy_quantile": 0.2}}, "entropy/selected_frac"),
    "distill": ({"distill": {"coef": 1.0}}, "distill/reverse_kl"),
}


class PlainEngine:
    """What `PolicyTrainer.train_step` asks of its DeepSpeed engine, over a plain model and AdamW (one rank, no
    gradient accumulation): forward, backward, step with gradient clipping, the norm and the LR."""

    def __init__(self, model: torch.nn.Module, lr: float, grad_clip: float):
        self.module, self.lr, self.grad_clip = model, lr, grad_clip
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.norm = 0.0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self) -> None:
        self.module.train()

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()

    def is_gradient_accumulation_boundary(self) -> bool:
        return True

    def step(self) -> None:
        self.norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> float:
        return self.norm

    def get_lr(self) -> list[float]:
        return [self.lr]


@pytest.fixture(scope="module")
def teacher(tiny_model, tmp_path_factory) -> str:
    """Another causal LM with the example's tokenizer (random, peaked): what the student is pulled towards."""
    return save_tiny_reward_model(tmp_path_factory.mktemp("teacher") / "teacher", causal=True)


def train_in_process(cfg: JobConfig, model_path: str, teacher: str | None, steps: int) -> list[dict[str, float]]:
    """`steps` steps of the loop's data flow in this process; each step's batch and trainer metrics."""
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    model = load_causal_lm(model_path)
    tokenizer = load_tokenizer(model_path)
    worker = RolloutWorker.serving(HFEngine.from_model(model, load_tokenizer(model_path)), seed=0)
    alg, r = cfg.algorithm, cfg.rollout
    scorer = None
    if needs_scoring(cfg):
        scorer = ScoringWorker(model_path, with_reference=alg.kl_coef > 0, temperature=r.temperature,
                               with_policy=alg.old_logprobs == "recompute", teacher_model=teacher)
    trainer = PolicyTrainer(0, 1, cfg.model.model_dump(), cfg.trainer.model_dump(), alg.model_dump(),
                            r.temperature, r.max_new_tokens, grad_accum=1, total_steps=steps)
    trainer.engine = PlainEngine(model, cfg.trainer.lr, cfg.trainer.grad_clip)
    rows = make_rows("train", steps * cfg.loop.prompts_per_step, seed=3)
    ids = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    sampling = sampling_params(cfg)
    out = []
    try:
        for step in range(steps):
            lo = step * cfg.loop.prompts_per_step
            requests = [PromptRequest(str(i), rows[i]["prompt"], ids[i], rows[i])
                        for i in range(lo, lo + cfg.loop.prompts_per_step)]
            groups = worker.generate(requests, sampling)
            for g in groups:
                for s in g.samples:
                    s.add_reward("char_hash", cfg.reward.functions[0].weight, char_hash_reward(g.prompt, s.text))
            if scorer is not None:
                if scorer.policy is not None:
                    scorer.load_weights(pack_state_dict(model), worker.version)
                groups = scorer.score(groups)
            batch = build_batch(groups, alg, tokenizer.pad_token_id, 0.0, cfg.distill.coef if teacher else 0.0)
            shards = shard(batch, cfg.trainer.num_minibatches, 1, alg.agg)
            m = batch_metrics(groups, groups, batch, 1, shards, 1.0, None, False)
            m |= trainer.train_step([compact(s) for s in shards[0]], 0.0)
            out.append(m)
            worker.version += 1  # the engine serves the trained model itself: the next step samples anew
    finally:
        torch.set_num_threads(threads)  # the trainer set this process's threads to trainer.threads
    return out


def choice_config(model_path: str, sections: dict, teacher: str | None) -> JobConfig:
    cfg = base_config(model_path, model={"share_prompt_forward": False},  # one forward: fewer calls, tiny prompts
                      rollout={"group_size": 4, "max_new_tokens": 8},
                      trainer={"lr": 2e-3, "micro_batch_size": 8, "epochs": 2},
                      loop={"steps": STEPS, "prompts_per_step": 2})
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    if "distill" in sections:
        cfg["distill"]["teacher"] = teacher
    return JobConfig.model_validate(cfg)


@pytest.mark.parametrize("name", list(CHOICES))
def test_each_objective_trains_the_example_for_50_steps(name, tiny_model, teacher):
    sections, stat = CHOICES[name]
    cfg = choice_config(tiny_model, sections, teacher)
    metrics = train_in_process(cfg, tiny_model, teacher if name == "distill" else None, STEPS)
    assert len(metrics) == STEPS
    for step, m in enumerate(metrics):
        assert m["nonfinite_microbatches"] == 0 and math.isfinite(m["loss"]), (name, step, m)
        assert math.isfinite(m[stat]), (name, step, stat)
    assert sum(m["grad_norm"] > 0 for m in metrics) >= STEPS // 2, name
    assert max(m["epoch2/approx_kl"] for m in metrics) > 0, name  # the second epoch ran off-policy


# ---- the choices, each against the algorithms function it must call -------------------------------------------


def _micro(seed: int = 0):
    """A micro-batch of 3 responses (lengths 4, 2, 3) with old, rollout and reference log-probs and logits."""
    from actors.batch import collate
    from actors.records import TrainBatch

    gen = torch.Generator().manual_seed(seed)
    batch = collate([[2, 5], [2, 6, 7], [2, 8]], [[9, 10, 11, 12], [13, 14], [15, 16, 17]], pad_id=0)
    mask = batch["response_mask"]  # [3, 4]
    rollout = -torch.rand(mask.shape, generator=gen) * 2 * mask
    old = (rollout + 0.3 * torch.randn(mask.shape, generator=gen)) * mask  # far from rollout: corrections bite
    micro = TrainBatch(**batch, rollout_logp=rollout, old_logp=old, ref_logp=old - 0.1,
                       advantages=torch.tensor([[1.0], [-0.5], [2.0]]).expand_as(mask) * mask)
    logits = torch.randn(3, 4, 22, generator=gen)  # [b, t, V]
    logp = (old + 0.1 * torch.randn(mask.shape, generator=gen)).requires_grad_(True)  # [b, t]
    return micro, logp, logits


def _alg(**fields) -> dict:
    from orchestrator.config import AlgorithmConfig

    return AlgorithmConfig(**fields).model_dump()


def test_the_objective_calls_the_loss_and_weights_the_config_names():
    from actors.objectives import policy_objective
    from algorithms.losses import (cispo_loss, icepop_weights, policy_loss, seq_mask_weights, tis_weights,
                                   token_entropy, top_entropy_mask)

    micro, logp, logits = _micro()
    mask, old, adv = micro.response_mask, micro.old_logp, micro.advantages

    def objective(**fields):
        return policy_objective(_alg(**fields), logp, logits, micro, 0.0, 1.0, 4)

    def same(got, want):
        assert got[0].item() == pytest.approx(want[0].item(), rel=1e-6), fields

    fields = {}
    same(objective(), policy_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean"))
    fields = {"policy_loss": "gspo"}
    same(objective(**fields), policy_loss(logp, old, adv, mask, 3e-4, 4e-4, "seq-mean-token-mean",
                                          ratio_level="sequence"))
    fields = {"policy_loss": "cispo"}
    same(objective(**fields), cispo_loss(logp, old, adv, mask, 1.0, 0.28, "token-mean"))
    for kind, weights in (("tis", tis_weights(old, micro.rollout_logp, mask, 2.0)[0]),
                          ("icepop", icepop_weights(old, micro.rollout_logp, mask, 0.5, 5.0)[0]),
                          ("seq_mask", seq_mask_weights(old, micro.rollout_logp, mask, 0.9, 1.1)[0])):
        fields = {"rollout_correction": {"kind": kind, **({"low": 0.9, "high": 1.1} if kind == "seq_mask" else {})}}
        loss, stats = objective(**fields)
        same((loss,), policy_loss(logp, old, adv, mask, 0.2, 0.2, "token-mean", token_weights=weights))
        assert f"{kind}_weight_mean" in stats
    assert 0 < stats["seq_mask_frac"] < 1  # the bounds drop some responses of this batch, not all
    selected = top_entropy_mask(token_entropy(logits), mask, 0.5)
    fields = {"top_entropy_quantile": 0.5, "policy_loss": "cispo", "rollout_correction": {"kind": "icepop"}}
    loss, stats = objective(**fields)
    icepop = icepop_weights(old, micro.rollout_logp, mask, 0.5, 5.0)[0]
    same((loss,), cispo_loss(logp, old, adv, mask, 1.0, 0.28, "token-mean", token_weights=icepop * selected))
    assert stats["entropy/selected_frac"].item() == pytest.approx(5 / 9)  # ⌈0.5 · 9⌉ of 9 valid tokens


def test_the_objective_adds_the_kl_and_entropy_terms_to_every_loss():
    from actors.objectives import policy_objective
    from algorithms.losses import add_kl_penalty, cispo_loss, entropy

    micro, logp, logits = _micro(1)
    mask = micro.response_mask
    alg = _alg(policy_loss="cispo", entropy_coef=0.01)
    loss, stats = policy_objective(alg, logp, logits, micro, 0.05, 1.0, 4)
    base, _ = cispo_loss(logp, micro.old_logp, micro.advantages, mask, 1.0, 0.28, "token-mean")
    with_kl, kl_stats = add_kl_penalty(base, {}, logp, micro.ref_logp, mask, 0.05)
    assert loss.item() == pytest.approx((with_kl - 0.01 * entropy(logits, mask)).item(), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(kl_stats["kl"].item()) and stats["kl"] > 0


def test_distillation_adds_coef_times_teacher_minus_old_to_each_tokens_advantage():
    """Two groups of 2; rewards 1, 0 | 1, 1 give GRPO advantages ±0.7071 | 0, 0; distill.coef 0.5 adds
    0.5 · (teacher − old) per token, padding untouched. Without teacher log-probs the batch is refused."""
    from actors.records import Group, Sample
    from orchestrator.config import AlgorithmConfig

    def sample(reward, old, teacher):
        return Sample([5] * len(old), "x", old, "stop", reward=reward, old_logp=old, teacher_logp=teacher)

    groups = [Group("a", "p", {}, [2], [sample(1.0, [-1.0, -2.0], [-0.5, -1.0]), sample(0.0, [-3.0], [-1.0])], 0),
              Group("b", "p", {}, [2], [sample(1.0, [-1.0], [-2.0]), sample(1.0, [-0.5, -0.5], [-0.5, 0.0])], 0)]
    alg = AlgorithmConfig(old_logprobs="rollout")
    batch = build_batch(groups, alg, pad_id=0, distill_coef=0.5)
    g = 1 / math.sqrt(2)  # (1 − 0.5) / std([1, 0]) with Bessel's correction
    want = [[g + 0.25, g + 0.5], [-g + 1.0, 0.0], [-0.5, 0.0], [0.0, 0.25]]
    torch.testing.assert_close(batch.advantages, torch.tensor(want), rtol=0, atol=1e-5)
    plain = build_batch(groups, alg, pad_id=0)
    assert plain.advantages[1, 0].item() == pytest.approx(-g, abs=1e-5)
    groups[1].samples[0].teacher_logp = None
    with pytest.raises(ValueError, match="teacher"):
        build_batch(groups, alg, pad_id=0, distill_coef=0.5)


def test_the_scoring_worker_gives_each_sampled_token_its_teacher_log_prob(tiny_model, teacher):
    from actors.batch import collate_groups
    from actors.modeling import response_logprobs
    from actors.records import Group, Sample

    groups = [Group("a", "1+2=", {}, [2, 5, 14, 6, 17], [Sample([16, 16, 6], "x", [0.0] * 3, "stop"),
                                                            Sample([7], "y", [0.0], "stop")], 0)]
    scorer = ScoringWorker(tiny_model, with_reference=False, with_policy=False, teacher_model=teacher)
    scored = scorer.score(groups)
    with torch.no_grad():
        want = response_logprobs(load_causal_lm(teacher), collate_groups(groups, 0), 1.0)[0]  # [2, 3]
    assert scored[0].samples[0].teacher_logp == pytest.approx(want[0].tolist(), abs=1e-5)
    assert scored[0].samples[1].teacher_logp == pytest.approx(want[1, :1].tolist(), abs=1e-5)
    assert scored[0].samples[0].old_logp is None and scored[0].samples[0].ref_logp is None


def test_a_teacher_with_another_vocabulary_exits_2_before_ray(tmp_path, tiny_model, capsys):
    import shutil

    import yaml

    from orchestrator.cli import main

    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_model, other)
    tok = load_tokenizer(str(other))
    tok.add_tokens(["@"])
    tok.save_pretrained(other)
    cfg = base_config(tiny_model, distill={"teacher": str(other)}, logging={"run_dir": str(tmp_path / "run")})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert "distill.teacher" in err and "vocabular" in err and "Traceback" not in err, err


def test_config_show_explains_each_objective_key():
    from orchestrator.config import dump_config, load_config

    text = dump_config(load_config(Path(__file__).parent.parent / "examples" / "arith_grpo.yaml", check_paths=False))
    for key, words in (("policy_loss", "GSPO"), ("kind", "icepop"), ("low", "icepop"), ("high", "tis cap"),
                       ("tis_cap", "Deprecated"), ("top_entropy_quantile", "80/20"), ("teacher", "distillation"),
                       ("coef", "distil"), ("rollout_correction", "mismatch")):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"{key}:"))
        assert words in line.split("#", 1)[1], line


@pytest.mark.slow
def test_objectives_through_the_real_pools(ray_local, tiny_model, teacher):
    """GSPO with ICEPOP, top-entropy tokens and distillation together, two real steps through Ray: the scoring pool
    holds the old policy and the teacher, the DeepSpeed rank the objective; each part reports its metric."""
    from orchestrator.batching import kl_controller
    from orchestrator.data import load_data
    from orchestrator.loop import Run, train_step
    from orchestrator.pools import Pools

    cfg = choice_config(tiny_model, {"algorithm": {"policy_loss": "gspo", "rollout_correction": {"kind": "icepop"},
                                                   "top_entropy_quantile": 0.5}, "distill": {"coef": 0.5}}, teacher)
    toy = Path(__file__).parent / "data" / "toy_rewards.py"
    pools = Pools(cfg, tiny_model, [("char_hash", f"{toy}:char_hash_reward", 1.0)])
    try:
        run = Run(cfg, pools, load_data(cfg, tiny_model), kl_controller(cfg.algorithm), sampling_params(cfg))
        for version in (1, 2):
            m, _ = train_step(run, version=version)
            assert math.isfinite(m["loss"]) and m["grad_norm"] > 0, m
            assert m["distill/reverse_kl"] > 0 and m["icepop_mask_frac"] >= 0 and m["clip_frac"] >= 0, m
            assert 0.5 <= m["entropy/selected_frac"] < 0.75, m
    finally:
        pools.shutdown()


# ---- the distillation example and the comparison table -----------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def test_the_distillation_example_is_the_grpo_example_with_a_teacher_that_make_builds():
    import re

    from examples.arith import warmstart
    from orchestrator.config import read_config

    grpo = read_config(JobConfig, REPO / "examples" / "arith_grpo.yaml").model_dump()
    distill = read_config(JobConfig, REPO / "examples" / "arith_distill.yaml").model_dump()
    assert distill["distill"] == {"teacher": "checkpoints/arith-teacher", "coef": 1.0}
    differs = {k for k in grpo if grpo[k] != distill[k]}
    assert differs == {"distill", "loop", "logging"}, differs
    make = (REPO / "Makefile").read_text()
    rule = re.search(r"^arith-distill: (.+)\n\t(.+)$", make, re.M)
    assert rule and rule.group(1).strip() == "checkpoints/arith-teacher/config.json"
    assert rule.group(2).endswith("raylhf train examples/arith_distill.yaml")
    build = re.search(r"^checkpoints/arith-teacher/config.json:.*\n\t(.+)$", make, re.M)
    assert build and "prepare_teacher('checkpoints/arith-teacher')" in build.group(1)
    # The teacher's recipe records its size; the policy's recipe is unchanged, so its cached build stays valid.
    assert warmstart.recipe(size=warmstart.TEACHER_SIZE)["size"] == warmstart.TEACHER_SIZE
    assert "size" not in warmstart.recipe()


def test_the_docs_table_is_the_benchmark_scripts_output():
    """docs/algorithms.md holds the table benchmarks/objectives.py writes: its header and one row per run, in order."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location("bench_objectives", REPO / "benchmarks" / "objectives.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = (REPO / "docs" / "algorithms.md").read_text()
    assert bench.HEADER in doc
    rows = doc.split(bench.HEADER, 1)[1].strip().split("\n\n", 1)[0].splitlines()
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == list(bench.ROWS)
    cell = r"\d+\.\d% → \d+\.\d% \((\d+) steps\)"
    steps = {re.search(cell, row).group(1) for row in rows}
    assert len(steps) == 1, rows  # every run the same number of steps
    fake = {name: {"config": config, "overrides": overrides, "steps": 3, "eval_before": 0.4, "eval_after": 0.5,
                   "step_s": 0.3} for name, (config, overrides) in bench.ROWS.items()}
    assert [len(row.split(" | ")) for row in bench.table(fake).splitlines()[2:]] == [len(r.split(" | ")) for r in rows]
