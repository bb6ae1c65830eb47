"""The job config: pydantic v2 models, loaded from YAML with `--set a.b=value` overrides.

Every field carries a one-line description so `raylhf config show` explains itself. Validation
happens before Ray starts; a bad value becomes a `ConfigError` naming the field path.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from orchestrator.references import UnresolvedReference, check_model_dir, check_source, resolve_callable


class ConfigError(Exception):
    """A config mistake, phrased for a person: names the field path and what is allowed."""


class Section(BaseModel):
    """A config section: unknown keys, invalid assignments and NaN or infinite numbers are errors (every float
    field of every section, nested, listed or in a dict, must be finite)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _resources_field(pool: str) -> Any:
    """`resources`: custom Ray resources each worker of `pool` asks for (its node type)."""
    return Field(default_factory=dict, description=(
        f"Custom Ray resources per {pool} worker, e.g. {{{pool}_node: 1}}: the worker is placed only on nodes "
        f"that offer them (`ray start --resources '{{\"{pool}_node\": 8}}'` makes a node for 8 such workers). "
        "An embedded Ray offers whatever the pools ask for."))


def _autocast_field(pool: str, where: str) -> Any:
    """`autocast`: whether `pool`'s forward passes (`where`) run in bf16 (`actors.precision`)."""
    return Field("off", description=(
        f"bf16 autocast of the forward passes of the {pool} ({where}): the weights, gradients and optimizer state stay "
        "float32 (model.dtype float32) and log-probs and losses are computed in float32; only the matmuls run in "
        "bf16. off; bf16 (always, also on a CPU that emulates it, often far slower); auto (a CUDA GPU with bf16, or "
        "a CPU whose /proc/cpuinfo flags have avx512_bf16 or amx_bf16; else float32); under auto or bf16 each actor "
        "prints its choice. Set rollout, scoring and trainer alike: numerics that differ show in "
        "mismatch/logprob_abs_*."))


def _check_threads(value: Any) -> Any:
    """A pool's `threads`: a positive int or "auto" (one message for both forms)."""
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f'a positive int or "auto", got {value!r}')


Threads = Annotated[int | Literal["auto"], BeforeValidator(_check_threads)]  # torch intra-op threads per actor


def _threads_field(actor: str) -> Any:
    """`threads`: torch intra-op threads per `actor`, "auto" (the default) following the placement."""
    return Field("auto", description=(
        f'torch intra-op threads per {actor}; "auto": strict on-policy (loop.max_staleness 0), the cores of its '
        "node shared by the actors that compute at the same time there (generation and training take turns); "
        "asynchronous, its own num_cpus (at least 1). An int fixes it (docs/performance.md, Threads)."))


def _check_resources(field: str, resources: dict[str, float]) -> dict[str, float]:
    for key, amount in resources.items():
        if key in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{field}: {key!r} is set by num_cpus / num_gpus, not resources")
        if not amount > 0:
            raise ValueError(f"{field}: {key} must be > 0, got {amount!r}")
    return resources


class LoraConfig(Section):
    """LoRA (peft): the policy (and the critic's body) train low-rank adapters; the base weights stay frozen."""

    r: int = Field(8, gt=0, description="Rank of each adapter (A: r x in, B: out x r; B starts at zero).")
    alpha: float = Field(16.0, gt=0, description="Scale: an adapter adds (alpha / r) * B @ A to its weight.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input while training (0 keeps "
                           "the trainer's log-probs equal to the rollout's).")
    target_modules: str | list[str] = Field(
        "all-linear", description='Modules that get adapters: "all-linear" (every linear layer but the output '
        "head) or a list of module names, e.g. [q_proj, v_proj].")
    reference: Literal["trainer", "scoring"] = Field(
        "trainer", description="Where the KL reference (algorithm.kl_coef > 0) runs: trainer (the trainer ranks' "
        "own base model with the adapters disabled, so no second copy of the base and no scoring pool for it; "
        "trainer.zero_stage <= 2) or scoring (a ScoringWorker holds a copy of the base, as in full fine-tuning).")


class ModelConfig(Section):
    path: str = Field(description="Hugging Face model directory (config.json + safetensors + tokenizer).")
    prepare: str | None = Field(
        None,
        description='Optional "module:function" called with `path` that builds the checkpoint there '
        "when it is missing (the tiny example's cached warm-start).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the checkpoint.")
    share_prompt_forward: bool = Field(
        True, description="Trainer and scoring passes run each distinct prompt of a micro-batch once and continue "
        "its G samples from copies of its KV cache (the same logits and gradients, less compute); false: one full "
        "forward per row, for a model whose cache cannot be copied row-wise.")
    lora: LoraConfig | None = Field(
        None, description="LoRA adapters instead of full fine-tuning (null): DeepSpeed optimizes only the adapters "
        "(and a PPO critic's value head), weight syncs send only them, checkpoints hold only them plus the base "
        "model's identity, and the final policy is written merged (with the adapter alone in final_policy/adapter).")


class DataSource(Section):
    source: str = Field(description='A .jsonl or .parquet file, "datasets:<builder or dir>" (datasets.load_dataset, '
                        'e.g. "datasets:json"), or a "module:function" returning a list of row dicts.')
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for a function or datasets "
                                   "source (datasets: split defaults to train).")


class DataConfig(Section):
    train: DataSource = Field(description="Training prompts.")
    eval: DataSource | None = Field(None, description="Held-out prompts for greedy-accuracy evaluation.")
    prompt_key: str = Field("prompt", description="Row field holding the prompt text.")
    max_prompt_tokens: int = Field(256, gt=0, description="Longer prompts are an error.")
    shuffle: bool = Field(True, description="Shuffle the training rows each epoch (seeded).")
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="A row without a usable prompt, with bad chat messages or a prompt over "
        "max_prompt_tokens: error (exit 2, naming the row) or skip (left out, counted, reported at start).")


class VLLMConfig(Section):
    tensor_parallel_size: int = Field(1, gt=0, description="GPUs one vLLM engine shards the model over (each "
                                      "rollout worker then needs rollout.num_gpus = this).")
    gpu_memory_utilization: float = Field(
        0.5, gt=0, le=1, description="Share of each GPU vLLM takes for weights and KV cache; leave room for "
        "actors sharing the GPU.")
    enable_sleep_mode: bool = Field(False, description="Let vLLM free its GPU memory between rollouts (for a "
                                    "trainer colocated on the same GPU).")
    enforce_eager: bool = Field(False, description="Skip CUDA-graph capture (faster start, slower decode).")
    max_model_len: int | None = Field(None, gt=0, description="Context length vLLM reserves KV cache for "
                                      "(default: the model's).")
    weight_sync: Literal["object_store", "nccl"] = Field(
        "object_store", description="How new policy weights reach vLLM: object_store (one put, a file reload on "
        "each worker; any setup) or nccl (a broadcast from trainer rank 0 over a NCCL group; GPU trainers).")


class RolloutConfig(Section):
    engine: Literal["hf", "vllm"] = Field("hf", description="Generation engine: hf (CPU/GPU) or vllm (GPU).")
    num_workers: int = Field(1, gt=0, description="Number of RolloutWorker actors.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved per rollout worker.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per rollout worker (vllm: >= vllm.tensor_parallel_size).")
    resources: dict[str, float] = _resources_field("rollout")
    threads: Threads = _threads_field("rollout worker")
    group_size: int = Field(8, gt=0, description="G: completions sampled per prompt.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (the trained policy is logits/T).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(32, gt=0, description="Longest completion, in tokens.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (the stop string is kept).")
    prompts_per_call: int = Field(4, gt=0, description="Prompts per generate call: the streaming granularity.")
    partial: bool = Field(
        False, description="Partial rollouts (needs loop.max_staleness > 0; vllm: weight_sync object_store): when "
        "new weights arrive, generations in flight load them at the next token boundary and continue the same "
        "sequences; each token records the policy version that sampled it (async/lag_* count per token) and its "
        "rollout log-prob is that version's. Long completions no longer hold back a weight update.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="rollout.engine: vllm only.")
    autocast: Literal["off", "bf16", "auto"] = _autocast_field("rollout workers", "generation and held-out "
                                                                "evaluation; engine hf only: vLLM has its own dtype")
    dtype: Literal["model", "float32", "bfloat16", "float16", "auto"] = Field(
        "model", description="The dtype the hf engine holds its weights in (vLLM serves model.dtype): model (the "
        "default: model.dtype, as the trainer); bfloat16 (where bf16 is native, generation without autocast's casts: "
        "1.52x float32's tokens/s on the 20.5M policy of examples/arith_scratch_grpo.yaml at 2 threads of an EPYC "
        "with avx512_bf16, benchmarks/autocast.py, docs/performance.md); auto (bfloat16 on a CUDA GPU with bf16 or a CPU whose /proc/cpuinfo "
        "flags have avx512_bf16 or amx_bf16, else model.dtype). Weight syncs still carry model.dtype and each "
        "token's log-prob is the held weights' (the behaviour policy's): the gap to the trainer shows in "
        "mismatch/logprob_abs_*. Not with rollout.autocast, which needs float32 weights.")


_LABEL = re.compile(r"[\w.:-]+")
_RESERVED_LABELS = ("mean", "std")  # reward/mean and reward/std are the totals


def _default_label(entry: dict) -> str | None:
    """The function's name ("pkg.mod:fn" -> "fn"), else the model directory's name."""
    if isinstance(entry.get("name"), str):
        return entry["name"].rpartition(":")[2] or entry["name"]
    if isinstance(entry.get("model"), str):
        return re.sub(r"[^\w.:-]", "_", Path(entry["model"].rstrip("/")).name) or "reward_model"
    return None


class RewardFunction(Section):
    name: str | None = Field(
        None, description='Reward function: "package.module:function" or "path/to/file.py:function".')
    model: str | None = Field(
        None, description="Or a reward model: a sequence-classification checkpoint directory with num_labels=1.")
    weight: float = Field(1.0, description="Weight of this reward in the total score.")
    label: str | None = Field(
        None, description="Name in metrics (reward/<label>, reward/<label>/failures); default: the function's name or "
        "the model directory's name.")
    batched: bool = Field(
        False, description="The function takes lists: fn(prompts, completions, **columns) -> list of scores "
        "(a function may instead set fn.batched = True).")
    batch_size: int | None = Field(
        None, gt=0, description="Samples per call of a batched function (default: all of a chunk) or per "
        "reward-model forward pass (default 32).")
    num_gpus: float = Field(0.0, ge=0, description="Reward model: GPUs of its worker.")

    @model_validator(mode="before")
    @classmethod
    def _fill_label(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("label") is None and _default_label(data):
            data = {**data, "label": _default_label(data)}
        return data

    @model_validator(mode="after")
    def _one_kind(self) -> "RewardFunction":
        if (self.name is None) == (self.model is None):
            raise ValueError("give exactly one of name (a reward function, \"module:function\" or "
                             "\"file.py:function\") and model (a reward-model checkpoint directory)")
        if self.model is not None and self.batched:
            raise ValueError("batched: applies to reward functions; a reward model is always run in batches "
                             "of batch_size")
        if self.name is not None and self.num_gpus:
            raise ValueError("num_gpus: applies to reward models (model: ...), not to reward functions")
        if self.label is None or not _LABEL.fullmatch(self.label) or self.label in _RESERVED_LABELS:
            raise ValueError(f"label: {self.label!r} must be letters, digits, _ . : - (no '/'), and not 'mean' "
                             "or 'std' (reward/mean and reward/std are the totals)")
        return self


# The largest total reward a sample may get (sum of |weight| x reward.max_abs_score): rewards become float32
# tensors whose group std squares them, and float64 metrics sum them over a batch; 1e15 keeps both finite.
MAX_TOTAL_REWARD = 1e15


class RewardConfig(Section):
    functions: list[RewardFunction] = Field(
        default_factory=list, description="Reward functions and reward models, summed with weights (at least one, "
        "unless an env gives the rewards).")
    num_workers: int = Field(1, gt=0, description="Number of RewardWorker actors (groups are spread over them).")
    num_cpus: float = Field(
        0.5, ge=0, description="Logical CPUs per reward worker and reward-model worker (a RewardWorker's "
        "num_processes subprocesses use real cores: reserve them on a shared cluster).")
    resources: dict[str, float] = _resources_field("reward")
    num_processes: int = Field(
        2, gt=0, description="Subprocesses per RewardWorker running reward calls in parallel; a call past "
        "timeout_s has its process killed and replaced.")
    timeout_s: float = Field(
        60.0, gt=0, description="Seconds one reward call may take (one sample; one batch for a batched "
        "function) before it counts as failed.")
    failure_score: float = Field(
        0.0, description="Score of a sample whose reward raised, timed out, ran out of memory, or returned NaN, inf, "
        "a number beyond max_abs_score or a non-number; within +-max_abs_score.")
    max_abs_score: float = Field(
        1e6, gt=0, le=MAX_TOTAL_REWARD, description="Largest |value| a reward may return (its score, a dict's other "
        "numbers, a reward model's score); beyond it the sample fails like NaN. Times the sum of |weight| at most "
        f"{MAX_TOTAL_REWARD:g}, so totals and their statistics stay finite.")
    memory_mb: int | None = Field(
        None, gt=0, description="Address space (RLIMIT_AS) of each reward subprocess, in MiB: a reward allocating "
        "more gets a MemoryError (or its process dies) and its sample fails; null: a quarter of the memory of the "
        "machine the reward worker runs on.")
    accuracy_threshold: float = Field(
        1.0, description="A sample counts as correct for the accuracy metric when its score >= this."
    )
    accuracy_label: str | None = Field(
        None, description="Judge accuracy (training and held-out) by this reward's own score instead of the total: "
        "e.g. a rule verifier listed with weight 0 next to a reward model that alone drives training.")

    @model_validator(mode="after")
    def _bounded_scores(self) -> "RewardConfig":
        if abs(self.failure_score) > self.max_abs_score:
            raise ValueError(f"reward.failure_score: {self.failure_score:g} lies beyond reward.max_abs_score = "
                             f"{self.max_abs_score:g}; a failure must score like a possible reward")
        total = sum(abs(f.weight) for f in self.functions) * self.max_abs_score
        if not total <= MAX_TOTAL_REWARD:
            raise ValueError(f"reward.max_abs_score: {self.max_abs_score:g} x the sum of |weight| of reward.functions "
                             f"= {total:g}, above {MAX_TOTAL_REWARD:g}: a total reward that large overflows its "
                             "statistics; lower max_abs_score or the weights")
        return self

    @model_validator(mode="after")
    def _unique_labels(self) -> "RewardConfig":
        labels = [f.label for f in self.functions]
        if self.accuracy_label is not None and self.accuracy_label not in labels:
            raise ValueError(f"accuracy_label: {self.accuracy_label!r} is none of the reward labels {labels}")
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"label {twice[0]!r} names two entries of reward.functions; give them distinct "
                             "`label`s (metrics are logged per label)")
        return self


TOOL_ENV = "rewards.tool_env:ToolEnv"  # the environment behind env.tools


class EnvConfig(Section):
    name: str | None = Field(
        None, description='Multi-turn rollouts (off while neither name nor tools is set). Environment class, '
        '"module:Class" or "path/file.py:Class": reset(row) -> first prompt '
        "text, step(action) -> (observation or None, reward, done), `async def step` allowed; one instance per "
        "trajectory. Default with env.tools: the built-in tool environment (rewards.tool_env:ToolEnv).")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments each instance is built with.")
    tools: list[str] = Field(
        default_factory=list, description='Tools for the built-in tool environment, "module:function" each '
        "(fn(argument: str) -> str; rewards.tools:calculator, rewards.tools:python): the model calls one as "
        "<name>argument</name> (the closing tag is added to the stop strings) and reads <result>...</result>.")
    max_turns: int = Field(4, gt=0, description="Sampled turns per trajectory at most (the last one's observation "
                           "is not appended).")
    max_total_tokens: int | None = Field(
        None, gt=0, description="Response tokens per trajectory at most, sampled and observation ones together "
        "(default: max_turns x rollout.max_new_tokens).")
    timeout_s: float = Field(30.0, gt=0, description="Seconds one reset or step may take; past it the trajectory "
                             "ends with reward.failure_score (counted in reward/env/failures).")
    patience_s: float = Field(
        0.5, gt=0, description="How long a turn's steps are waited for together: past it, the trajectories whose "
        "steps are done go on to their next turn and the slower ones rejoin later (one slow step holds up only its "
        "own trajectory).")
    num_workers: int = Field(1, gt=0, description="Environment host actors; trajectories are spread over them and "
                             "their steps run concurrently.")
    num_cpus: float = Field(0.25, ge=0, description="Logical CPUs per environment host.")
    resources: dict[str, float] = _resources_field("env")
    max_concurrency: int = Field(64, gt=0, description="Synchronous steps one host runs at once (threads).")
    format: Literal["auto", "plain", "chat"] = Field(
        "auto", description="How turns are written: chat (the tokenizer's chat template; observations as tool "
        "messages), plain (observation text appended as is), auto (chat when the tokenizer has a template).")

    @model_validator(mode="after")
    def _one_env(self) -> "EnvConfig":
        if self.tools and self.name not in (None, TOOL_ENV):
            raise ValueError("env.tools: tools go to the built-in tool environment; for your own environment "
                             "pass them in env.kwargs")
        if len({t.rpartition(":")[2] for t in self.tools}) != len(self.tools):
            raise ValueError("env.tools: two tools share a function name (a tool is called by its name)")
        return self

    @property
    def enabled(self) -> bool:
        """Multi-turn rollouts are on: the config names an environment or tools."""
        return self.name is not None or bool(self.tools)

    @property
    def env_name(self) -> str:
        return self.name or TOOL_ENV

    def env_kwargs(self, prompt_key: str) -> dict[str, Any]:
        """The instances' keyword arguments (the tool environment's tools and prompt key added)."""
        return {"tools": self.tools, "prompt_key": prompt_key, **self.kwargs} if self.tools else dict(self.kwargs)

    def stop(self) -> list[str]:
        """Stop strings the tools add: each tool's closing tag."""
        return [f"</{t.rpartition(':')[2]}>" for t in self.tools]


class ScoringConfig(Section):
    num_workers: int = Field(1, gt=0, description="Number of ScoringWorker actors (reference / old policy).")
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs per scoring worker.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per scoring worker.")
    resources: dict[str, float] = _resources_field("scoring")
    threads: Threads = _threads_field("scoring worker")
    micro_batch_size: int = Field(64, gt=0, description="Sequences per scoring forward pass.")
    autocast: Literal["off", "bf16", "auto"] = _autocast_field("scoring workers", "reference, old-policy, teacher "
                                                                "and value scoring")


# Bounds each correction takes when the config gives none: TIS caps at 2 (Yao et al. 2025); IcePop keeps
# [0.5, 5] (Ring-1T report, Ling Team 2025); the geometric-mean sequence mask keeps [0.999, 1.001] (the bounds
# of verl's rollout-correction examples with rollout_is_level=geometric, rollout_is_mode=mask).
CORRECTION_BOUNDS = {"tis": (None, 2.0), "icepop": (0.5, 5.0), "seq_mask": (0.999, 1.001)}


class RolloutCorrection(Section):
    kind: Literal["none", "tis", "icepop", "seq_mask"] = Field(
        "none", description="none; tis: weight min(r, high) per token, r = pi_old / pi_rollout (truncated "
        "importance sampling, Yao et al. 2025; default high 2); icepop: weight r where low <= r <= high, else 0 "
        "(IcePop, Ring-1T 2025; default [0.5, 5]); seq_mask: weight 0 for every token of a response whose "
        "geometric-mean ratio exp(mean_t log r) leaves [low, high], else 1 (verl's geometric rollout mask; "
        "default [0.999, 1.001]). Logged: tis_clip_frac, icepop_mask_frac, seq_mask_frac.")
    low: float | None = Field(None, ge=0, description="Lower bound on the ratio (icepop, seq_mask); tis has none.")
    high: float | None = Field(None, gt=0, description="Upper bound on the ratio (icepop, seq_mask), or the tis cap.")

    @model_validator(mode="before")
    @classmethod
    def _default_bounds(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") in CORRECTION_BOUNDS:
            low, high = CORRECTION_BOUNDS[data["kind"]]
            data = {"low": low, "high": high, **data}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> "RolloutCorrection":
        if self.kind == "none" and (self.low is not None or self.high is not None):
            raise ValueError("low / high: apply to a correction (kind: tis, icepop or seq_mask); kind is none")
        if self.kind == "tis" and self.low is not None:
            raise ValueError("low: tis truncates the ratio at high only; remove low (or use kind: icepop)")
        if self.kind in ("icepop", "seq_mask") and not self.low <= self.high:
            raise ValueError(f"low ({self.low:g}) must be <= high ({self.high:g}) for {self.kind}")
        return self


class AlgorithmConfig(Section):
    estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] = Field(
        "grpo", description="Advantage estimator: grpo (3.12), dr_grpo (mean-only, A.3.1; its agg defaults to "
        "seq-mean-token-sum-norm), rloo, reinforce_pp (2.2.4), gae (PPO with a critic, 2.14-2.17; see `critic`)."
    )
    std_normalize: bool = Field(True, description="grpo: divide by the group std (3.12); dr_grpo never does.")
    gamma: float = Field(1.0, ge=0, le=1, description="gae: discount per token (2.14).")
    lam: float = Field(0.95, ge=0, le=1, description="gae: lambda (2.14); 0 is the TD residual, 1 the return - V.")
    whiten_advantages: bool = Field(
        True, description="gae: normalise advantages to mean 0, std 1 over the batch's valid tokens (as PPO codes do).")
    policy_loss: Literal["ppo", "gspo", "cispo"] = Field(
        "ppo", description="Policy objective: ppo (the clipped surrogate with a per-token ratio pi/pi_old, 2.4.3, "
        "3.9), gspo (GSPO, Zheng et al. 2025: every token of a response uses its length-normalized sequence ratio "
        "exp(mean_t log pi/pi_old), clipped; clip_low / clip_high default to the paper's 3e-4 / 4e-4 and agg to "
        "seq-mean-token-mean when not given) or cispo (CISPO, MiniMax-M1 2025: the detached ratio, clipped, "
        "weighs each token's log-prob gradient, so no token is dropped; clip_low defaults to 1.0, no lower bound, "
        "as the paper, and clip_high to 0.28). See docs/algorithms.md.")
    clip_low: float = Field(0.2, ge=0, description="Clip: ratio >= 1 - clip_low (2.4.3); below 1 for ppo and "
                            "gspo, while cispo takes >= 1 as no lower bound. Default 0.2 (gspo 3e-4, cispo 1.0).")
    clip_high: float = Field(0.2, ge=0, description="Clip: ratio <= 1 + clip_high; > clip_low is clip-higher. "
                             "Default 0.2 (gspo 4e-4, cispo 0.28).")
    dual_clip: float | None = Field(None, gt=1, description="Dual-clip bound c for negative advantages (ppo, gspo).")
    kl_coef: float = Field(0.0, ge=0, description="beta of the KL-to-reference penalty (its start, when adaptive).")
    kl_kind: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (survey 2.1).")
    kl_placement: Literal["loss", "reward"] = Field(
        "loss", description="Where beta*KL goes: the loss (GRPO, 3.14) or the per-token reward (PPO / InstructGPT, "
        "3.5.1; for sequence-level estimators the score minus beta times the summed KL).")
    kl_controller: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed beta, or adaptive: beta moves so the measured KL tracks kl_target (2.4.2).")
    kl_target: float = Field(0.1, gt=0, description="adaptive: target KL per sequence (summed over tokens).")
    kl_horizon: float = Field(10000, gt=0, description="adaptive: horizon, in samples, of the beta update.")
    agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token losses are averaged."
    )
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (2.18).")
    skip_zero_advantage: bool = Field(
        True, description="Rows whose advantage is 0 at every token (e.g. GRPO groups whose rewards are all equal) "
        "skip the trainer's forward/backward when the loss has no KL or entropy term: their gradient is exactly 0, "
        "and the token-mean still counts them, so the update is the same. The trainer's stats (entropy, "
        "clip_frac, mismatch) then cover the trained rows; train/skipped_rows_frac says how many were left out.")
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: drop groups whose rewards are all equal (no signal) and sample "
        "more prompts until the batch is full.")
    max_sampling_rounds: int = Field(
        4, gt=0, description="dynamic_sampling: generation rounds per step at most; a batch still short after them "
        "trains on the groups it has.")
    old_logprobs: Literal["rollout", "recompute"] = Field(
        "rollout", description="Where pi_old of the PPO ratio (2.4.3) comes from: rollout (the engine's log-probs "
        "of the sampled tokens, exactly the behaviour policy; no old-policy scoring pass) or recompute (a "
        "ScoringWorker re-scores with the policy copy; needed when the engine's numerics differ from the "
        "trainer's, e.g. vLLM in bf16). mismatch/logprob_abs_* in the metrics shows how far they are apart.")
    rollout_correction: RolloutCorrection = Field(
        default_factory=RolloutCorrection, description="Train/inference mismatch correction: token "
        "weights from pi_old / pi_rollout (needs old_logprobs: recompute, set by default when kind is not none).")
    decoupled: bool = Field(
        False, description="Decoupled PPO (AReaL, Fu et al. 2025) for asynchronous runs: the trainer recomputes pi_old "
        "with its current weights before the update (the proximal policy), the PPO ratio clips against it, and each "
        "token is weighted by pi_prox / pi_behaviour (the rollout's log-probs); rollout_correction, when set, "
        "truncates (tis) or masks (icepop, seq_mask) that weight instead. Needs no scoring pass.")
    tis_cap: float | None = Field(
        None, gt=0, description="Deprecated: use rollout_correction: {kind: tis, high: C}, which it becomes at "
        "load (a message says so once); always null after loading.")
    top_entropy_quantile: float = Field(
        1.0, gt=0, le=1, description="Train only on the highest-entropy tokens: the policy loss of each "
        "micro-batch keeps its top quantile of valid tokens by entropy of pi (the whole batch when one "
        "micro-batch holds it), the others weigh 0 but still count in the token-mean (Wang et al. 2025, \"Beyond "
        "the 80/20 Rule\", who keep 0.2); 1.0: off. entropy/selected_frac logs the share kept.")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = _tis_cap_to_correction(data)
        if data.get("estimator") == "dr_grpo" and "agg" not in data:
            data = {**data, "agg": "seq-mean-token-sum-norm"}  # Dr.GRPO: no 1/|o| length bias either
        # GSPO paper: clip ranges 3e-4 / 4e-4 on its sequence ratio, and the loss a mean over sequences.
        # CISPO (MiniMax-M1): no lower bound on the weight; 0.28 is the usual upper one (the paper tunes it).
        defaults = {"gspo": {"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq-mean-token-mean"},
                    "cispo": {"clip_low": 1.0, "clip_high": 0.28}}.get(data.get("policy_loss"), {})
        data = {**defaults, **data}
        correction = data.get("rollout_correction")
        kind = correction.get("kind") if isinstance(correction, dict) else getattr(correction, "kind", None)
        if kind not in (None, "none") and "old_logprobs" not in data and not data.get("decoupled"):
            data = {**data, "old_logprobs": "recompute"}  # corrections compare the trainer's pi_old with the rollout's
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "AlgorithmConfig":
        kind = self.rollout_correction.kind
        if self.decoupled and self.old_logprobs == "recompute":
            raise ValueError("algorithm.decoupled: the trainer recomputes pi_old itself; a scoring pass at the behaviour "
                             "version (old_logprobs: recompute) would be discarded; set algorithm.old_logprobs: rollout")
        if kind != "none" and self.old_logprobs == "rollout" and not self.decoupled:
            raise ValueError(f"algorithm.rollout_correction: {kind} weighs pi_old / pi_rollout, which is 1 when "
                             "pi_old is the rollout's own log-probs; set algorithm.old_logprobs: recompute")
        if self.clip_low >= 1 and self.policy_loss != "cispo":
            raise ValueError(f"algorithm.clip_low: {self.clip_low:g} would let the {self.policy_loss} ratio fall to 0 "
                             "or below; it must be < 1 (only policy_loss: cispo takes >= 1, as no lower bound)")
        if self.dual_clip is not None and self.policy_loss == "cispo":
            raise ValueError("algorithm.dual_clip: caps the clipped surrogate of ppo and gspo; cispo has no "
                             "surrogate to cap (its ratio is a bounded weight already)")
        return self


_SHOWN: set[str] = set()  # the deprecated keys whose message this process has printed


def _tis_cap_to_correction(data: dict) -> dict:
    """The deprecated `algorithm.tis_cap: C` as `rollout_correction: {kind: tis, high: C}` (a message, once per
    process). A value the field itself rejects (not a number, <= 0, NaN) stays, for its error to name tis_cap."""
    cap = data.get("tis_cap")
    if cap is None or isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < float("inf"):
        return data
    if data.get("old_logprobs") == "rollout":
        raise ValueError("algorithm.tis_cap: truncated importance sampling weighs pi_old / pi_rollout, which is 1 "
                         "when pi_old is the rollout's own log-probs; set algorithm.old_logprobs: recompute")
    if data.get("rollout_correction") not in (None, {}, {"kind": "none"}):
        raise ValueError("algorithm.tis_cap: deprecated, and algorithm.rollout_correction is set too; give only "
                         f"rollout_correction: {{kind: tis, high: {cap:g}}}")
    message = (f"algorithm.tis_cap is deprecated; it is read as algorithm.rollout_correction: {{kind: tis, high: "
               f"{cap:g}}} (write that instead)")
    if "tis_cap" not in _SHOWN:
        _SHOWN.add("tis_cap")
        print(f"raylhf: {message}", file=sys.stderr)
    return {**data, "tis_cap": None, "rollout_correction": {"kind": "tis", "high": cap}}


class DistillConfig(Section):
    teacher: str | None = Field(
        None, description="On-policy distillation (Agarwal et al. 2024; Thinking Machines 2025): a causal-LM "
        "checkpoint directory with the policy's tokenizer. The scoring pool scores every sampled token under it, "
        "and token t's advantage gains coef * (log pi_teacher - log pi_old), the per-token reverse KL signal, "
        "added to the reward estimator's advantage. null: off.")
    coef: float = Field(
        1.0, gt=0, description="Weight of the distillation advantage. To distil alone, give every reward weight 0 "
        "(all groups then tie and the estimator adds 0) and name a verifier in reward.accuracy_label for accuracy.")


class CriticConfig(Section):
    init: str | None = Field(
        None, description="Where the value model starts: a reward-model or causal-LM checkpoint directory "
        "(default: the policy's model.path).")
    num_workers: int = Field(1, gt=0, description="Data-parallel CriticTrainer ranks.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per critic rank.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per critic rank.")
    resources: dict[str, float] = _resources_field("critic")
    lr: float = Field(1e-5, gt=0, description="Critic peak learning rate (the rest of the schedule follows trainer).")
    value_clip: float | None = Field(0.2, gt=0, description="Clip of the value update around the old values (2.18).")
    warmup_steps: int = Field(0, ge=0, description="Steps at the start that train only the critic (the policy waits).")


class TrainerConfig(Section):
    num_workers: int = Field(1, gt=0, description="Data-parallel PolicyTrainer ranks.")
    num_cpus: float = Field(1.0, ge=0, description="Logical CPUs per trainer rank.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per trainer rank (0: CPU with gloo; > 0: CUDA with NCCL).")
    resources: dict[str, float] = _resources_field("trainer")
    threads: Threads = _threads_field("trainer rank (and critic rank)")
    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="DeepSpeed ZeRO stage: 2 shards optimizer state and gradients; 3 also the parameters "
        "(gathered on every rank for each weight sync and save). With one rank, 1 and 2 shard nothing and run as 0 "
        "(no flat fp32 copies: the same update, faster).")
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="Decay after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, in optimizer steps.")
    grad_clip: float = Field(1.0, gt=0, description="Global gradient-norm clip.")
    epochs: int = Field(1, gt=0, description="K: passes over each batch (PPO epochs).")
    num_minibatches: int = Field(1, gt=0, description="Optimizer steps per epoch; the batch is split evenly.")
    micro_batch_size: int = Field(16, gt=0, description="Sequences per forward/backward on one rank (at most).")
    micro_batch_split_tokens: int | None = Field(
        64, ge=0, description="No compute on padding: a rank's rows are ordered (by prompt, or by response length) "
        "and a micro-batch is cut in two wherever that saves more than this many padded token positions (rows x "
        "prompt+response width, a shared prompt counted once), so micro-batches vary in number and size, the same "
        "number on every rank; the update is the same. Set it to what one more forward/backward call costs in token "
        "positions (20-60 for a 20M-parameter model on one CPU thread; more on a GPU). "
        "None: equal slices of at most micro_batch_size rows, each padded to its longest (the layout before).")
    max_nonfinite_steps: int = Field(
        3, gt=0, description="Micro-batches whose loss is NaN or inf are skipped (zero gradient) and counted; "
        "this many steps in a row with such skips stop the run.")
    autocast: Literal["off", "bf16", "auto"] = _autocast_field(
        "trainer ranks", "the policy's and the critic's forward for the loss, decoupled PPO's proximal pass, the "
        "LoRA reference; the backward follows the forward's dtypes; train/autocast_bf16 logs the choice")


class LoopConfig(Section):
    steps: int = Field(20, gt=0, description="Training steps (one batch of prompt groups each).")
    prompts_per_step: int = Field(16, gt=0, description="Prompt groups per step; batch = this x group_size.")
    max_staleness: int = Field(
        0, ge=0, description="0: strict on-policy (generation waits for the new weights). N > 0: asynchronous; "
        "generation runs up to N steps ahead of training (N rounds of prompts_per_step prompts in flight or "
        "buffered, no more: admission control), so a step trains groups generated by weights up to N versions "
        "behind. The PPO ratio uses the behaviour policy's log-probs; async/lag_* in the metrics give the version "
        "lag per token. A checkpoint saves the prompts in flight, so a resumed run trains each prompt once.")
    stale_groups: Literal["drop", "train"] = Field(
        "drop", description="max_staleness > 0: a group whose oldest token is more than max_staleness versions "
        "behind the weights it would train is dropped and its prompt generated again by the current weights "
        "(counted in async/dropped_stale), or trained anyway (train: pair it with algorithm.rollout_correction "
        "or algorithm.decoupled to correct the off-policy gap).")
    seed: int = Field(0, description="Seeds data order, sampling and init.")
    eval_every: int = Field(0, ge=0, description="Held-out evaluation every N steps (0: before and after only).")
    eval_size: int = Field(200, gt=0, description="Held-out prompts per evaluation.")


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="Write a checkpoint every N steps (0: none); `raylhf train CONFIG "
                       "--resume` continues from the newest complete one.")
    keep: int = Field(2, gt=0, description="Checkpoints kept (the newest); older ones are deleted.")


class ProgressConfig(Section):
    """The logging fields every command shares (the job's and the offline trainers')."""

    progress: bool = Field(True, description="Show a progress bar.")


class LoggingConfig(ProgressConfig):
    run_dir: str = Field("runs/{name}-{time}", description="Output directory; {name} and {time} are filled in.")
    name: str = Field("run", description="Run name.")
    tensorboard: bool = Field(True, description="Write TensorBoard event files.")
    worker_logs: bool = Field(False, description="Stream the actors' stdout/stderr to the console.")
    sample_groups: int = Field(2, ge=0, description="Prompt groups per step written to samples.jsonl (every "
                               "completion with its rewards and advantage); 0: none.")
    print_samples_every: int = Field(50, ge=0, description="Print one prompt with a few completions every N "
                                     "steps (0: never).")
    wandb: bool = Field(False, description="Also log metrics to Weights & Biases (needs `pip install wandb`; "
                        "WANDB_MODE=offline works without a network).")
    mlflow: bool = Field(False, description="Also log metrics to MLflow (needs `pip install mlflow`; "
                         "MLFLOW_TRACKING_URI picks the server, default ./mlruns).")


class RayConfig(Section):
    address: str | None = Field(
        None, description='Ray cluster to join ("auto" or GCS host:port); None: the RAY_ADDRESS environment '
        "variable (set for a `ray job submit` driver), else an embedded Ray.")
    num_cpus: int | None = Field(None, gt=0, description="Logical CPUs for an embedded Ray (default: enough).")
    startup_timeout_s: float = Field(
        600.0, gt=0, description="How long the actors may take to be placed and load their models before the job "
        "stops with an error naming the pools still waiting and the resources they ask for.")


POOL_NAMES = ("rollout", "env", "reward", "reward_model", "scoring", "trainer", "critic")


class PlacementConfig(Section):
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for each pool's bundles (one bundle per worker): PACK "
        "fills few nodes, SPREAD spreads them; STRICT_ forms insist.")
    colocate: list[list[str]] = Field(
        default_factory=list, description="Sets of pools sharing bundles, e.g. [[rollout, scoring]]: worker i of "
        "each pool in a set goes on bundle i of one placement group (the same node), whose size is the sum of "
        f"their asks. Pools: {', '.join(POOL_NAMES)}.")

    @model_validator(mode="after")
    def _known_pools(self) -> "PlacementConfig":
        seen: set[str] = set()
        for group in self.colocate:
            for name in group:
                if name not in POOL_NAMES:
                    raise ValueError(f"colocate: unknown pool {name!r}; pools are {', '.join(POOL_NAMES)}")
                if name in seen:
                    raise ValueError(f"colocate: pool {name!r} is named twice (a pool shares bundles with one set)")
                seen.add(name)
        return self


class JobConfig(Section):
    model: ModelConfig
    data: DataConfig
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig
    env: EnvConfig = EnvConfig()
    scoring: ScoringConfig = ScoringConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    distill: DistillConfig = DistillConfig()
    trainer: TrainerConfig = TrainerConfig()
    critic: CriticConfig = CriticConfig()
    loop: LoopConfig = LoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    ray: RayConfig = RayConfig()
    placement: PlacementConfig = PlacementConfig()

    @model_validator(mode="after")
    def _placement(self) -> "JobConfig":
        r, v = self.rollout, self.rollout.vllm
        for pool in ("rollout", "reward", "scoring", "trainer", "critic"):
            _check_resources(f"{pool}.resources", getattr(self, pool).resources)
        if r.engine == "vllm":
            if r.num_gpus <= 0:
                raise ValueError("rollout.num_gpus: the vllm engine runs on GPUs; give each rollout worker "
                                 "num_gpus > 0 (a fraction shares a GPU), or use rollout.engine: hf")
            if v.tensor_parallel_size > 1 and r.num_gpus != v.tensor_parallel_size:
                raise ValueError(f"rollout.num_gpus: {r.num_gpus:g}, but rollout.vllm.tensor_parallel_size is "
                                 f"{v.tensor_parallel_size}: a tensor-parallel engine needs one whole GPU per shard")
        if r.partial:
            _check_partial(self)
        if v.weight_sync == "nccl" and (r.engine != "vllm" or self.trainer.num_gpus <= 0):
            raise ValueError("rollout.vllm.weight_sync: nccl broadcasts from a GPU trainer into vLLM; it needs "
                             "rollout.engine: vllm and trainer.num_gpus > 0")
        return self

    @model_validator(mode="after")
    def _autocast(self) -> "JobConfig":
        for pool in ("rollout", "scoring", "trainer"):
            if getattr(self, pool).autocast != "off" and self.model.dtype != "float32":
                raise ValueError(f"{pool}.autocast: bf16 autocast keeps float32 weights and casts for each matmul; "
                                 f"model.dtype is {self.model.dtype}, so set {pool}.autocast: off (or model.dtype: "
                                 "float32)")
        if self.rollout.autocast != "off" and self.rollout.engine == "vllm":
            raise ValueError("rollout.autocast: applies to the hf engine; vLLM runs in its own dtype (set "
                             "rollout.autocast: off)")
        if self.rollout.dtype != "model" and self.rollout.engine == "vllm":
            raise ValueError("rollout.dtype: applies to the hf engine; vLLM serves model.dtype (set rollout.dtype: "
                             "model)")
        if self.rollout.dtype not in ("model", "float32") and self.rollout.autocast != "off":
            raise ValueError(f"rollout.dtype {self.rollout.dtype} with rollout.autocast {self.rollout.autocast}: "
                             "autocast casts float32 weights for each matmul; choose one (rollout.autocast: off, "
                             "or rollout.dtype: model)")
        return self

    @model_validator(mode="after")
    def _rewards_given(self) -> "JobConfig":
        if not self.reward.functions and not self.env.enabled:
            raise ValueError("reward.functions: give at least one reward function or model (or an env whose steps "
                             "give rewards)")
        _check_resources("env.resources", self.env.resources)
        return self

    @model_validator(mode="after")
    def _lora(self) -> "JobConfig":
        lora = self.model.lora
        if lora is None:
            return self
        if not lora.target_modules:
            raise ValueError('model.lora.target_modules: name at least one module, or "all-linear"')
        if self.rollout.vllm.weight_sync == "nccl":
            raise ValueError("rollout.vllm.weight_sync: with model.lora only the adapters travel, and vLLM loads them "
                             "as a LoRA adapter from a file (a LoRARequest per version); set it to object_store")
        if lora.reference == "trainer" and self.algorithm.kl_coef > 0 and self.trainer.zero_stage == 3:
            raise ValueError("model.lora.reference: trainer runs the reference on each trainer rank alone, which "
                             "ZeRO-3's sharded parameters do not allow; use trainer.zero_stage <= 2 (LoRA's optimizer "
                             "state is small) or model.lora.reference: scoring")
        return self

    @model_validator(mode="after")
    def _batch_divides(self) -> "JobConfig":
        batch = self.loop.prompts_per_step * self.rollout.group_size
        per_step = self.trainer.num_minibatches * self.trainer.num_workers
        if batch % per_step:
            raise ValueError(
                f"trainer: batch of {batch} sequences (loop.prompts_per_step x rollout.group_size) "
                f"must split evenly into trainer.num_minibatches x trainer.num_workers = {per_step}"
            )
        return self

    @model_validator(mode="after")
    def _critic_and_kl(self) -> "JobConfig":
        alg = self.algorithm
        if alg.estimator == "gae":
            batch = self.loop.prompts_per_step * self.rollout.group_size
            per_step = self.trainer.num_minibatches * self.critic.num_workers
            if batch % per_step:
                raise ValueError(f"critic: batch of {batch} sequences must split evenly into trainer.num_minibatches "
                                 f"x critic.num_workers = {per_step}")
        elif self.critic.warmup_steps:
            raise ValueError("critic.warmup_steps: there is no critic unless algorithm.estimator is gae")
        if alg.kl_controller == "adaptive" and alg.kl_coef == 0:
            raise ValueError("algorithm.kl_coef: the adaptive controller scales beta, so it must start above 0")
        return self

    @model_validator(mode="after")
    def _group_std_needs_two(self) -> "JobConfig":
        needs_group = self.algorithm.estimator in ("grpo", "rloo") and (
            self.algorithm.estimator == "rloo" or self.algorithm.std_normalize
        )
        if needs_group and self.rollout.group_size < 2:
            raise ValueError(
                f"rollout.group_size: {self.algorithm.estimator} needs at least 2 samples per group "
                "(a group std or leave-one-out baseline of one sample is undefined)"
            )
        return self


def _check_partial(cfg: "JobConfig") -> None:
    """rollout.partial's requirements, in plain words."""
    if cfg.loop.max_staleness == 0:
        raise ValueError("rollout.partial: with loop.max_staleness 0 no new weights arrive while generating; "
                         "set loop.max_staleness >= 1 or rollout.partial: false")
    if cfg.rollout.engine == "vllm" and cfg.rollout.vllm.weight_sync != "object_store":
        raise ValueError("rollout.partial: a busy vLLM worker takes new weights from the object store mid-generation; "
                         "an NCCL broadcast waits for its generate call to end. Set rollout.vllm.weight_sync: "
                         "object_store or rollout.partial: false")
    if cfg.algorithm.old_logprobs == "recompute":
        raise ValueError("rollout.partial: a group's tokens come from several policy versions, which one scoring "
                         "pass at one version cannot reproduce; use algorithm.old_logprobs: rollout (the "
                         "per-token behaviour log-probs) without a rollout_correction")
    if cfg.env.enabled:
        raise ValueError("rollout.partial: not supported for multi-turn rollouts (env); set it to false")


# ----------------------------------------------------------------------------- loading


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.lr=1e-5")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ConfigError(f"--set {item!r}: empty key")
    return path, yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set `a.b.c=value` items (values parsed as YAML) into a nested dict, returned as a copy."""
    import copy

    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = _parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `raylhf config show` lists the valid keys)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] == "value_error" and msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        allowed = e.get("ctx", {}).get("expected")
        hint = f" (allowed: {allowed})" if allowed and allowed not in msg else ""
        # Cross-field checks run at the top level and name their fields in the message.
        lines.append(f"  {loc}: {msg}{hint}" if loc else f"  {msg}{hint}")
    return "invalid config:\n" + "\n".join(lines)


def read_config(kind: type[BaseModel], path: str | os.PathLike | None, overrides: list[str] | None = None):
    """A `kind` config from YAML at `path` (None: only the overrides) with `--set` overrides applied;
    ConfigError (naming the field path) on a missing file, bad YAML or an invalid value."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    raw = apply_overrides(raw, overrides or [])
    try:
        return kind.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, *, check_paths: bool = True) -> JobConfig:
    """Read YAML, apply overrides, validate, and check that named files and functions exist."""
    cfg = read_config(JobConfig, path, overrides)
    if check_paths:
        check_references(cfg)
    return cfg


def check_reference(field: str, check: Callable, *args):
    """`check(*args)` (a check of orchestrator.references); an unresolved name is a ConfigError naming `field`."""
    try:
        return check(*args)
    except UnresolvedReference as e:
        raise ConfigError(f"invalid config:\n  {field}: {e}") from None


def check_model(model: ModelConfig) -> None:
    """`model.prepare` must resolve; without one, `model.path` must be a model directory."""
    if model.prepare is not None:
        check_reference("model.prepare", resolve_callable, model.prepare)
    else:
        check_reference("model.path", check_model_dir, model.path)


def _check_reward_model(field: str, path: str) -> None:
    """A directory with a config.json of a one-output sequence classifier (read, not loaded)."""
    config = Path(path).expanduser() / "config.json"
    if not config.is_file():
        raise ConfigError(f"invalid config:\n  {field}: {path!r} is not a model directory (no config.json)")
    try:
        meta = json.loads(config.read_text())
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  {field}: {str(config)!r} is not valid JSON: {e}") from None
    archs = meta.get("architectures") or []
    if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(
            f"invalid config:\n  {field}: {path!r} holds a {archs[0]}; a reward model is an "
            "AutoModelForSequenceClassification checkpoint with num_labels=1")
    labels = meta.get("num_labels", len(meta["id2label"]) if "id2label" in meta else 2)
    if labels != 1:
        raise ConfigError(f"invalid config:\n  {field}: {path!r} has {labels} labels; a reward model has "
                          "exactly one output (num_labels=1)")


def check_references(cfg: JobConfig) -> None:
    """Files and "module:function" names must resolve, and logging backends asked for must be installed:
    fail now, not deep inside a Ray actor."""
    for field, module in (("logging.wandb", "wandb"), ("logging.mlflow", "mlflow")):
        if getattr(cfg.logging, field.split(".")[1]) and importlib.util.find_spec(module) is None:
            raise ConfigError(f"invalid config:\n  {field}: true, but {module} is not installed (pip install "
                              f"{module}, or set {field}: false)")
    for i, fn in enumerate(cfg.reward.functions):
        if fn.name is not None:
            loaded = check_reference(f"reward.functions.{i}.name", resolve_callable, fn.name)
            if fn.batch_size is not None and not (fn.batched or getattr(loaded, "batched", False)):
                raise ConfigError(f"invalid config:\n  reward.functions.{i}.batch_size: applies to batched "
                                  "functions (batched: true, or fn.batched = True) and reward models")
        else:
            _check_reward_model(f"reward.functions.{i}.model", fn.model)
    if cfg.env.enabled:
        check_reference("env.name", resolve_callable, cfg.env.env_name)
        for i, tool in enumerate(cfg.env.tools):
            check_reference(f"env.tools.{i}", resolve_callable, tool)
    for field, src in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if src is None or src.source.startswith("datasets:"):
            continue  # a datasets source is checked as it loads (orchestrator.data), still before Ray starts
        check_reference(f"{field}.source", check_source, src.source, (".jsonl", ".parquet"))
    check_model(cfg.model)
    if cfg.distill.teacher is not None:
        check_reference("distill.teacher", check_model_dir, cfg.distill.teacher)
    if cfg.rollout.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "invalid config:\n  rollout.engine: 'vllm' needs the vllm package (GPU only): pip install 'raylhf[gpu]'"
        )


def dump_config(cfg: JobConfig) -> str:
    """The resolved config as YAML, each field followed by its description as a comment."""
    return _dump_section(cfg, 0)


def _dump_section(section: BaseModel, indent: int) -> str:
    pad = "  " * indent
    out = []
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        comment = f"  # {info.description}" if info.description else ""
        if isinstance(value, BaseModel):
            out.append(f"{pad}{name}:{comment}")
            out.append(_dump_section(value, indent + 1))
        elif value is None and (sub := _optional_section(info.annotation)) is not None:
            out.append(f"{pad}{name}: null{comment}")  # unset: its fields are shown as comments, with defaults
            for field, f in sub.model_fields.items():
                default = "(required)" if f.is_required() else _flow(f.get_default(call_default_factory=True))
                out.append(f"{pad}  # {field}: {default}  # {f.description}")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            out.append(f"{pad}{name}:{comment}")
            for item in value:
                body = _dump_section(item, indent + 2).lstrip()
                out.append(f"{pad}  - {body}")
        else:
            out.append(f"{pad}{name}: {_flow(value)}{comment}")
    return "\n".join(out)


def _flow(value: Any) -> str:
    """A value as one line of flow-style YAML."""
    text = yaml.safe_dump(value if not isinstance(value, tuple) else list(value), default_flow_style=True).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    return text.removesuffix("...").strip()


def _optional_section(annotation: Any) -> type[BaseModel] | None:
    """The section class of an optional section field (`X | None`), else None."""
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None
