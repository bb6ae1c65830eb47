"""LoRA (`model.lora`): real DeepSpeed ranks (in this process, world size 1), real peft adapters, a tiny Llama.

Only the adapters (and a critic's value head) train; the merged policy is base + (alpha / r) B A, computed here
by hand; a rank restored from an adapter-only checkpoint continues exactly as the uninterrupted one; a weight sync
carries exactly the adapters' bytes; the reference is the base with the adapters disabled; the export reloads
with the trainer's logits. The run-level path (Ray pools, resume through the CLI) is in `test_lora_run`.
"""

from __future__ import annotations

import json

import pytest
import torch

from actors.batch import compact
from actors.records import Group, Sample, Shard
from orchestrator.config import AlgorithmConfig, LoraConfig, ModelConfig, TrainerConfig
from tests.conftest import in_process_ranks
from tests.test_trainer_dp import synthetic_batch

LORA = LoraConfig(r=4, alpha=8.0).model_dump()  # all-linear: q, k, v, o, gate, up, down of both layers


def adapter_bytes(model_path: str, r: int) -> int:
    """Bytes of the adapters, from the base's shapes: r x in (A) and out x r (B) float32s per linear layer."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    return sum(4 * r * (m.in_features + m.out_features) for m in linears)


@pytest.fixture(scope="module")
def ranks():
    """Build trainer ranks in this process; the process group (world size 1) is made once and removed after."""
    def make(cls, model_path: str, *args, trainer: dict | None = None):
        model = ModelConfig(path=model_path, lora=LoraConfig(**LORA)).model_dump()
        cfg = TrainerConfig(**{"lr": 2e-2, "micro_batch_size": 8, "grad_clip": 1e9, **(trainer or {})}).model_dump()
        rank = cls(0, 1, model, cfg, *args)
        rank.setup("127.0.0.1", 0) if torch.distributed.is_initialized() else rank.setup(*rank.rendezvous())
        return rank

    with in_process_ranks():
        yield make


def _wire(batch) -> list[dict]:
    return [compact(Shard(batch, float(batch.response_mask.sum())))]


def _policy(ranks, model_path):
    from actors.trainer import PolicyTrainer

    return ranks(PolicyTrainer, model_path, AlgorithmConfig().model_dump(), 1.0, 8, 2, 2, 0)


@pytest.fixture(scope="module")
def trained(ranks, tiny_model, tmp_path_factory):
    """A LoRA policy rank after two steps, its checkpoint after the first, and the weights before it all."""
    tr = _policy(ranks, tiny_model)
    before = {k: v.clone() for k, v in tr.engine.module.state_dict().items()}
    batches = [synthetic_batch(16, vocab=before["base_model.model.model.embed_tokens.weight"].shape[0], seed=s)
               for s in (1, 2)]
    ckpt = tmp_path_factory.mktemp("lora") / "ckpt"
    stats = [tr.train_step(_wire(batches[0]), 0.0)]
    tr.save_checkpoint(str(ckpt))
    stats.append(tr.train_step(_wire(batches[1]), 0.0))
    return dict(rank=tr, before=before, batches=batches, ckpt=ckpt, stats=stats)


def test_only_the_adapters_train_and_the_optimizer_holds_only_them(trained, tiny_model):
    tr, before = trained["rank"], trained["before"]
    after = tr.engine.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert any(".lora_A." in k for k in changed) and any(".lora_B." in k for k in changed)  # A moves from step 2
    size = adapter_bytes(tiny_model, LORA["r"])
    # AdamW's two moments of the adapters only (the base has ~10x more weights), and a step count per tensor; one
    # rank runs ZeRO stage 0 (`actors.trainer.effective_zero_stage`), so there is no fp32 master copy
    n_tensors = sum(p.requires_grad for p in tr.engine.module.parameters())
    assert 2 * size <= trained["stats"][-1]["optimizer/state_bytes"] <= 2 * size + 8 * n_tensors
    assert sum(p.numel() for p in tr.engine.module.parameters() if p.requires_grad) * 4 == size


def test_a_weight_sync_carries_exactly_the_adapters(trained, tiny_model):
    tr = trained["rank"]
    packed = tr.state_dict()
    assert all(".lora_" in name for name in packed)
    assert sum(a.nbytes for a, _ in packed.values()) == tr.sync_bytes() == adapter_bytes(tiny_model, LORA["r"])


def test_an_adapter_only_checkpoint_resumes_to_the_same_weights(trained, ranks, tiny_model):
    """A fresh rank restored from the checkpoint after step 1 and given step 2's batch ends where the uninterrupted
    rank ended; the checkpoint holds the adapters and their optimizer state, not the base."""
    ckpt, tr = trained["ckpt"], trained["rank"]
    states = torch.load(next(ckpt.rglob("*model_states.pt")), map_location="cpu", weights_only=False)
    assert set(states["module"]) == {k for k, p in tr.engine.module.named_parameters() if p.requires_grad}
    resumed = _policy(ranks, tiny_model)
    resumed.load_checkpoint(str(ckpt))
    stats = resumed.train_step(_wire(trained["batches"][1]), 0.0)
    assert stats["loss"] == pytest.approx(trained["stats"][1]["loss"], abs=1e-6)
    want, got = tr.engine.module.state_dict(), resumed.engine.module.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-7)


def test_the_reference_is_the_base_with_the_adapters_disabled(trained, tiny_model):
    """The trainer's reference log-probs equal a separately loaded base model's, while its policy has moved."""
    from actors.batch import collate_groups
    from actors.modeling import load_causal_lm, response_logprobs

    tr, batch = trained["rank"], trained["batches"][0]
    lengths = batch.response_mask.sum(1).long().tolist()
    p = batch.input_ids.shape[1] - batch.response_mask.shape[1]
    prompts = [ids[am.bool()].tolist() for ids, am in zip(batch.input_ids[:, :p], batch.attention_mask[:, :p])]
    groups = [Group(str(i), "", {}, prompts[i], [Sample(batch.input_ids[i, p : p + n].tolist(), "", [0.0] * n, "stop")],
                    0) for i, n in enumerate(lengths)]
    groups = tr.score_reference(groups)
    assert tr.engine.module.training  # left as it was found
    collated = collate_groups(groups, tr.tokenizer.pad_token_id)
    with torch.no_grad():
        base = response_logprobs(load_causal_lm(tiny_model).eval(), collated, 1.0)[0]  # [B, T]
        policy = response_logprobs(tr.engine.module.eval(), collated, 1.0)[0]
    mask = collated.response_mask.bool()
    got = torch.zeros_like(base)
    for i, g in enumerate(groups):
        got[i, : lengths[i]] = torch.tensor(g.samples[0].ref_logp)
    torch.testing.assert_close(got[mask], base[mask], rtol=0, atol=1e-5)
    assert (policy - base)[mask].abs().max() > 1e-3  # the adapters really change the policy
    tr.engine.module.train()


def test_merged_policy_is_base_plus_scaled_BA_and_exports_with_the_trainers_logits(trained, tiny_model, tmp_path):
    """final_policy/ holds W0 + (alpha / r) B A for every adapted layer (computed here from the adapter state) and
    the other weights unchanged; `raylhf export` writes it (and, --adapter-only, the adapter in peft's format) and
    both reload to the logits the trainer's own (unmerged) model gives."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from orchestrator.cli import main
    from orchestrator.export import PROBE_TEXT

    tr = trained["rank"]
    run = tmp_path / "run"
    tr.save_pretrained(str(run / "final_policy"))
    merged = load_file(str(run / "final_policy" / "model.safetensors"))
    base = load_file(f"{tiny_model}/model.safetensors")
    adapter = {k.removeprefix("base_model.model."): v for k, v in tr.engine.module.state_dict().items()}
    scale = LORA["alpha"] / LORA["r"]
    adapted = 0
    for name, w0 in base.items():
        layer = name.removesuffix(".weight")
        if f"{layer}.lora_A.default.weight" in adapter:
            a = adapter[f"{layer}.lora_A.default.weight"]  # [r, in]
            b = adapter[f"{layer}.lora_B.default.weight"]  # [out, r]
            torch.testing.assert_close(merged[name], w0 + scale * (b @ a), rtol=0, atol=1e-6)
            assert (merged[name] - w0).abs().max() > 1e-4
            adapted += 1
        else:
            assert torch.equal(merged[name], w0), name
    assert adapted == 14  # 7 linear layers in each of 2 blocks

    tok = tr.tokenizer
    ids = tok(PROBE_TEXT, return_tensors="pt")["input_ids"]
    module = tr.engine.module.eval()
    with torch.no_grad():
        want = module(input_ids=ids).logits  # [1, L, V]
    module.train()
    assert main(["export", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", str(run), str(tmp_path / "adapter"), "--adapter-only"]) == 0
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
    with torch.no_grad():
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        base_model = AutoModelForCausalLM.from_pretrained(tiny_model)
        via_peft = PeftModel.from_pretrained(base_model, str(tmp_path / "adapter"))
        from_adapter = via_peft.eval()(input_ids=ids).logits
    torch.testing.assert_close(exported, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_adapter, want, rtol=1e-5, atol=1e-5)


def test_the_hf_engine_and_vllm_adapter_files_serve_the_trainers_adapters(trained, tiny_model, tmp_path):
    """The hf engine takes the adapters alone and then reports the trainer's checksum and samples with the trainer's
    log-probs; the adapter directory the vLLM engine writes for its LoRARequest is one peft loads to the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from actors.engines.hf import HFEngine
    from actors.lora import save_adapter
    from actors.modeling import encode_prompts, response_logprobs
    from actors.records import SamplingParams
    from actors.weights import unpack_state_dict
    from tests.conftest import as_batch

    tr = trained["rank"]
    engine = HFEngine(tiny_model, lora=LORA)
    engine.load_weights(tr.state_dict(), version=2)
    assert engine.checksum() == tr.weights_checksum()
    prompts = encode_prompts(tr.tokenizer, ["12+34=", "7+8="])
    groups = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_new_tokens=6), seed=3)
    from actors.batch import collate

    rows = [(p, c) for p, g in zip(prompts, groups) for c in g]
    batch = as_batch(collate([p for p, _ in rows], [c.token_ids for _, c in rows], tr.tokenizer.pad_token_id))
    module = tr.engine.module.eval()
    with torch.no_grad():
        logp = response_logprobs(module, batch, 1.0)[0]
    module.train()
    for i, (_, c) in enumerate(rows):
        assert logp[i, : len(c.logprobs)].tolist() == pytest.approx(c.logprobs, abs=1e-5)

    path = save_adapter(tmp_path / "vllm-adapter", unpack_state_dict(tr.state_dict()), LORA, tiny_model)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(path)).eval()
        torch.testing.assert_close(loaded(input_ids=ids).logits, module.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)
    module.train()


def test_a_lora_critic_trains_its_adapters_and_its_whole_value_head(ranks, tiny_model):
    from actors.critic import CriticTrainer
    from tests.test_ppo import _synthetic

    critic = ranks(CriticTrainer, tiny_model, None, "token-mean", 2, 2, 0, trainer={"lr": 3e-2})
    before = {k: v.clone() for k, v in critic.engine.module.state_dict().items()}
    batch = _synthetic(16, vocab=20, seed=0)
    for _ in range(3):  # the head starts at zero: B moves from step 2, A from step 3
        critic.train_step(_wire(batch))
    after = critic.engine.module.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    head = {k for k in changed if ".score.modules_to_save." in k}
    assert head == {"base_model.model.score.modules_to_save.default.weight",
                    "base_model.model.score.modules_to_save.default.bias"}
    body = changed - head
    assert all(".lora_" in k for k in body) and {".lora_A.", ".lora_B."} <= {k[k.index(".lora_"):][:8] for k in body}
    assert set(critic.state_dict()) == {k for k, p in critic.engine.module.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- config and resume checks (no model)


def test_lora_config_errors_name_the_field():
    from orchestrator.config import JobConfig
    from tests.conftest import base_config

    lora = {"model": {"path": "unused", "lora": {"r": 4}}}
    with pytest.raises(ValueError, match="rollout.vllm.weight_sync"):
        JobConfig.model_validate(base_config("unused", **lora, rollout={"engine": "vllm", "num_gpus": 1, "vllm": {
            "weight_sync": "nccl"}}, trainer={"num_gpus": 1}))
    with pytest.raises(ValueError, match="model.lora.reference: trainer .* ZeRO-3"):
        JobConfig.model_validate(base_config("unused", **lora, algorithm={"kl_coef": 0.1}, trainer={"zero_stage": 3}))
    ok = JobConfig.model_validate(base_config("unused", **lora, algorithm={"kl_coef": 0.1}))
    from orchestrator.pool_specs import needs_scoring, pool_specs

    assert not needs_scoring(ok)  # the trainers hold the reference: no scoring pool
    specs = {s.name: s for s in pool_specs(ok, "unused", [])}
    assert specs["scoring"].needs == [] and specs["rollout"].kwargs[0]["lora"]["r"] == 4
    cfg = JobConfig.model_validate(base_config("unused", model={"path": "unused", "lora": {"reference": "scoring"}},
                                               algorithm={"kl_coef": 0.1}))
    (spec,) = [s for s in pool_specs(cfg, "unused", []) if s.name == "scoring"]
    assert spec.kwargs[0]["with_reference"] and spec.kwargs[0]["lora"]["reference"] == "scoring"


def test_a_resume_against_another_base_or_other_lora_settings_is_refused(tiny_model, tmp_path):
    import shutil

    from actors.lora import base_checksum
    from orchestrator.checkpoint import LoopState, ResumeMismatch, check_resume

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    assert base_checksum(other) == base_checksum(tiny_model)  # a copy is the same base
    from safetensors.torch import load_file, save_file

    weights = load_file(str(other / "model.safetensors"))
    weights["model.norm.weight"][0] += 1e-3
    save_file(weights, str(other / "model.safetensors"))
    saved = {"policy": {"path": tiny_model, "sha256": base_checksum(tiny_model)}}
    state = LoopState(step=3, lora=LORA, bases=saved)
    check_resume(state, LORA, saved, tmp_path)  # the same base and settings: fine
    with pytest.raises(ResumeMismatch, match=r"trained on the policy base model .* Set model.path to the original"):
        check_resume(state, LORA, {"policy": {"path": str(other), "sha256": base_checksum(other)}}, tmp_path)
    with pytest.raises(ResumeMismatch, match=r"model.lora \{r: 4.*but the config has \{r: 8"):
        check_resume(state, {**LORA, "r": 8}, saved, tmp_path)
    with pytest.raises(ResumeMismatch, match="null \\(full fine-tuning\\)"):
        check_resume(state, None, {}, tmp_path)


def test_raylhf_train_refuses_to_resume_adapters_on_another_base_before_ray_starts(tiny_model, tmp_path, capsys):
    """Exit 2 with both bases named; the run directory's config and metrics are left as they were."""
    import yaml

    from orchestrator import checkpoint
    from orchestrator.cli import main
    from tests.conftest import base_config

    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, model={"lora": {"r": 4, "alpha": 8.0}})))
    run_dir = tmp_path / "run"
    state = checkpoint.LoopState(step=1, version=1, lora=LORA,
                                 bases={"policy": {"path": "/models/other-base", "sha256": "ab" * 32}})
    checkpoint.save(run_dir, state, lambda d: None, keep=2)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run_dir / "config.yaml").write_text("the run's own\n")
    assert main(["train", str(config), "--run-dir", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "/models/other-base" in err and tiny_model in err and "model.path" in err
    assert (run_dir / "config.yaml").read_text() == "the run's own\n"
    assert (run_dir / "metrics.jsonl").read_text().count("step") == 2


# ----------------------------------------------------------------------------- a whole run (Ray)


@pytest.mark.slow
def test_a_lora_run_resumed_from_its_checkpoint_ends_where_the_uninterrupted_run_ends(ray_local, tiny_model, tmp_path):
    """The real loop with LoRA and a KL reference held by the trainer (no scoring pool): every sync carries exactly
    the adapters' bytes, the rollout engine samples with the trainer's log-probs, and a second run resumed from the
    first run's step-1 checkpoint logs the same step 2 and writes the same final policy and adapter."""
    import shutil

    from safetensors.torch import load_file

    from orchestrator import checkpoint
    from orchestrator.config import JobConfig
    from orchestrator.data import load_data
    from orchestrator.loop import train
    from orchestrator.references import reward_specs
    from tests.conftest import base_config
    from tests.test_resume import _records

    from tests.test_resume import TOY

    raw = base_config(tiny_model, model={"lora": {"r": 4, "alpha": 8.0}}, algorithm={"kl_coef": 0.05},
                      reward={"functions": [{"name": f"{TOY}:char_hash_reward"}]}, trainer={"lr": 1e-2},
                      loop={"steps": 2, "prompts_per_step": 4}, checkpoint={"every": 1, "keep": 2})
    del raw["data"]["eval"]
    cfg = JobConfig.model_validate(raw)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir in (straight, resumed):
        run_dir.mkdir()
    train(cfg, straight, tiny_model, reward_specs(cfg), load_data(cfg, tiny_model))
    step1 = checkpoint.checkpoints_dir(straight) / "step-000001"
    assert checkpoint.load_state(step1).bases["policy"]["path"] == tiny_model
    # no base weights: the adapters and (one rank runs ZeRO stage 0, which keeps it there) their AdamW moments
    states = list((step1 / "policy").rglob("*model_states.pt"))
    assert sum(f.stat().st_size for f in states) < 100_000 + 3 * adapter_bytes(tiny_model, 4)  # the base: 1.7 MB
    assert all(".lora_" in k for f in states for k in torch.load(f, weights_only=False)["module"])
    shutil.copytree(step1, checkpoint.checkpoints_dir(resumed) / step1.name)
    (resumed / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                                   (straight / "metrics.jsonl").read_text().splitlines()[:2]))
    train(cfg, resumed, tiny_model, reward_specs(cfg), load_data(cfg, tiny_model),
          resume=checkpoint.checkpoints_dir(resumed) / step1.name)

    records = _records(straight)
    assert [r["step"] for r in records] == [0, 1, 2] and _records(resumed) == records
    for r in records[1:]:
        assert r["sync/bytes"] == adapter_bytes(tiny_model, 4) and r["kl"] >= 0 and r["grad_norm"] > 0
        assert r["mismatch/logprob_abs_max"] < 1e-4  # the hf engine applies the trainer's adapters exactly
    from orchestrator.metrics import read_metrics

    # the reference, scored by the trainer rank: there is no scoring pool
    assert all(r["time/score"] > 0 and "utilization/scoring" in r for r in read_metrics(straight)[1:])
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(straight / "final_policy" / name)), load_file(str(resumed / "final_policy" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
