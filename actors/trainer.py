"""PolicyTrainer (and the shared DeepSpeedRank): data-parallel DeepSpeed ranks that update the policy.

Each rank receives its slice of every mini-batch. Micro-batch losses are weighted by their share of
the mini-batch's aggregation units (tokens or sequences, across all ranks), so the accumulated,
all-reduced gradient equals the gradient of the loss over the whole mini-batch: M ranks give the same
update as one rank with the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import resource
import socket
import time

import torch

from actors.batch import collate_groups, expand
from actors.deepspeed_ops import load_shm_comm
from actors.lora import load_sync_state, save_merged_policy, state_bytes, sync_state, trainable_names, wrap
from actors.modeling import load_causal_lm, load_tokenizer, response_logprobs, set_threads
from actors.objectives import policy_objective
from actors.precision import autocast, choose
from actors.records import Group, Shard, TrainBatch
from actors.scoring import per_token
from actors.weights import pack_state, state_checksum


def free_port() -> int:
    """A TCP port free on this host right now (for the rendezvous of rank 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lr_lambda(schedule: str, warmup: int, total: int):
    """Multiplier of the peak LR at optimizer step k: linear warm-up, then constant/linear/cosine decay."""

    def f(k: int) -> float:
        if warmup and k < warmup:
            return (k + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        frac = min(1.0, (k - warmup) / max(1, total - warmup))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def effective_zero_stage(zero_stage: int, world: int) -> int:
    """The ZeRO stage a trainer runs: with one rank, stages 1 and 2 shard nothing but still copy every gradient into
    flat fp32 partitions and keep an fp32 master copy of the weights (about 20 ms a step for 3.4M parameters on one
    CPU thread, more than the AdamW update itself, `benchmarks/optimizer_step.py`), so one rank runs stage 0:
    the same update. Stage 3 and any stage on several ranks run as configured."""
    return 0 if world == 1 and zero_stage in (1, 2) else zero_stage


def clips_itself(zero_stage: int, dtype: str) -> bool:
    """Whether the trainer clips gradients itself (before `engine.step()`) instead of DeepSpeed: under stage 0 in
    float32 DeepSpeed clips tensor by tensor and does not report the norm; torch's multi-tensor clip does both."""
    return zero_stage == 0 and dtype == "float32"


def ds_config(micro: int, grad_accum: int, world: int, zero_stage: int, grad_clip: float, dtype: str) -> dict:
    """The DeepSpeed config for one policy trainer (`zero_stage` as it runs, `effective_zero_stage`)."""
    return {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro * grad_accum * world,
        "gradient_clipping": 0.0 if clips_itself(zero_stage, dtype) else grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def make_optimizer(params: list[torch.nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float,
                   impl: str = "for") -> torch.optim.AdamW:
    """torch's AdamW over `params`. `impl`: "for" (a loop over tensors, torch's default on CPU), "foreach"
    (multi-tensor ops) or "fused" (one kernel per parameter group): the same update up to rounding."""
    kw = {"for": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}[impl]
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, **kw)


EPOCH_STATS = ("approx_kl", "clip_frac")  # also reported per epoch when K > 1: they grow as the policy moves


def micro_slices(n: int, grad_accum: int) -> list[slice]:
    """`grad_accum` contiguous slices of `n` rows, as equal as can be: DeepSpeed counts one backward per
    micro-batch to find the optimizer step, so a rank's share always makes exactly that many."""
    if n < grad_accum:
        raise ValueError(f"{n} rows cannot make {grad_accum} micro-batches; shard gives each rank at least that many")
    return [slice(i * n // grad_accum, (i + 1) * n // grad_accum) for i in range(grad_accum)]


def micro_parts(shard: Shard, grad_accum: int) -> list[tuple[slice, bool]]:
    """(rows, filler) of each micro-batch of a shard, in order: its planned sizes (`Shard.micro`, from
    `orchestrator.micro_batches`; a 0 is a filler pass over row 0 whose loss is multiplied by zero, for a rank with
    fewer rows than the others have micro-batches) or, without a plan, `micro_slices`."""
    if shard.micro is None:
        return [(rows, False) for rows in micro_slices(shard.rows.rows, grad_accum)]
    out, lo = [], 0
    for size in shard.micro:
        out.append((slice(lo, lo + size), False) if size else (slice(0, 1), True))
        lo += size
    return out


def optimizer_state_bytes(optimizer, module: torch.nn.Module) -> int:
    """Bytes the optimizer holds on this rank besides the model's own weights: AdamW's moments and, under ZeRO,
    its fp32 master copy of the trained parameters (its own tensors, a shard of them per rank)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO optimizer wraps the torch one
    own = {id(p) for p in module.parameters()}
    tensors = [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [p for group in inner.param_groups for p in group["params"] if id(p) not in own]
    return sum(t.numel() * t.element_size() for t in tensors)


def zero_loss(output: torch.Tensor) -> torch.Tensor:
    """A loss with exactly zero gradient, through the same graph as the real loss (the model's `output`):
    a NaN/inf micro-batch still takes its backward pass, so ZeRO's gradient hooks fire in the same order
    on every rank (a different order would pair different buckets in the all-reduce), but adds nothing."""
    return torch.nan_to_num(output, 0.0, 0.0, 0.0).sum() * 0.0


class DeepSpeedRank:
    """One data-parallel DeepSpeed rank of a model trained on the step's mini-batches (policy or critic).

    Construct all ranks, then call `setup` on all of them together. Subclasses give the model
    (`build_model`) and the loss of one micro-batch (`_micro_loss`).

    With `model["lora"]` (`model.lora` of the config) the model is wrapped with peft adapters and DeepSpeed
    optimizes only what trains (the adapters; a critic's value head too, `value_head`): the optimizer state,
    weight syncs (`state_dict`) and checkpoints cover only that.
    """

    value_head = False  # the critic's head trains whole under LoRA

    def __init__(self, rank: int, world_size: int, model: dict, trainer: dict, grad_accum: int, total_steps: int,
                 seed: int = 0, device: str = "cpu"):
        self.rank, self.world_size = rank, world_size
        self.model_cfg, self.cfg = model, trainer
        self.lora: dict | None = model.get("lora")
        self.grad_accum, self.total_steps, self.seed, self.device = grad_accum, total_steps, seed, device
        self._store_listener: socket.socket | None = None  # rank 0 on CPU: see `rendezvous`
        self._clip: float | None = None  # set in `setup` where the trainer clips itself (`clips_itself`)
        self._trained: list[torch.nn.Parameter] = []
        self.bf16 = choose(trainer.get("autocast", "off"), device,  # forward passes under bf16 autocast
                           type(self).__name__ if rank == 0 else None)
        set_threads(trainer.get("threads"))

    def rendezvous(self) -> tuple[str, int]:
        """(address, port) for the process group; called on rank 0. On CPU (ranks on one machine) rank 0 binds the
        store's listening socket to 127.0.0.1 here and hands it to torch in `setup`: a TCPStore that binds its own
        port listens on every interface."""
        if self.device == "cpu":
            self._store_listener = socket.create_server(("127.0.0.1", 0))
            return "127.0.0.1", self._store_listener.getsockname()[1]
        return socket.gethostbyname(socket.gethostname()), free_port()

    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the DeepSpeed engine; returns the parameter count."""
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        import deepspeed

        load_shm_comm()  # else DeepSpeed JIT-loads it behind a lock file a killed process leaves (deepspeed_ops)
        if self.device == "cpu" and not torch.distributed.is_initialized():  # (tests in one process start it once)
            # every rank on the store rank 0 serves on 127.0.0.1 (DeepSpeed then uses this group)
            listener = self._store_listener.detach() if self._store_listener else None  # the store owns it now
            store = torch.distributed.TCPStore(master_addr, master_port, self.world_size, is_master=self.rank == 0,
                                               wait_for_workers=False, master_listen_fd=listener)
            torch.distributed.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size)
        deepspeed.init_distributed("gloo" if self.device == "cpu" else "nccl")
        torch.manual_seed(self.seed)
        m, c = self.model_cfg, self.cfg
        model = self.build_model()
        if self.lora:
            model = wrap(model, self.lora, self.value_head)
        self.tokenizer = load_tokenizer(m["path"], m["trust_remote_code"])
        trained = [p for p in model.parameters() if p.requires_grad]  # all of them without LoRA
        optimizer = make_optimizer(trained, c["lr"], tuple(c["betas"]), c["weight_decay"], impl="fused")
        total_updates = self.total_steps * c["epochs"] * c["num_minibatches"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda(c["lr_schedule"], c["warmup_steps"], total_updates))
        self.zero_stage = effective_zero_stage(c["zero_stage"], self.world_size)
        self._clip = c["grad_clip"] if clips_itself(self.zero_stage, m["dtype"]) else None  # else DeepSpeed clips
        self._trained = trained
        config = ds_config(c["micro_batch_size"], self.grad_accum, self.world_size, self.zero_stage,
                           c["grad_clip"], m["dtype"])
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=config)
        if self.lora:  # checkpoints hold what trains; DeepSpeed's exclude_frozen_parameters misses a tied weight's
            full, names = self.engine.module_state_dict, trainable_names(model)  # second name (lm_head = embeddings)
            self.engine.module_state_dict = lambda *a, **k: {n: t for n, t in full(*a, **k).items() if n in names}
        gc.freeze()  # the modules and libraries live on: Python's collector stops re-walking them every step
        return sum(p.numel() for p in model.parameters())

    def train_step(self, shards: list[dict]) -> dict[str, float]:
        """K epochs over this rank's shards of the step's mini-batches (compacted for the trip,
        `actors.batch.compact`); one optimizer step per mini-batch."""
        engine = self.engine
        engine.train()
        minibatches = self.prepare([expand(wire) for wire in shards])
        sums: dict[str, float] = {}
        ratio_max: float | None = None  # policy only
        weight_total, skipped = 0.0, 0
        t_fwd_bwd = t_opt = 0.0
        positions = real = passes = 0  # token positions the micro-batches ran ([b, p+t] after trim), real tokens
        epochs = self.cfg["epochs"]
        per_epoch: list[dict[str, float]] = [{} for _ in range(epochs)]  # how far each epoch has moved the policy
        for epoch in range(epochs):
            for i, shard in enumerate(minibatches):
                parts = micro_parts(shard, self.grad_accum)
                for j, (rows, filler) in enumerate(parts):
                    self.before_update = epoch == 0 and i == 0 and not filler  # no optimizer step yet in this train_step
                    micro = shard.rows.select(rows).trim()
                    positions, passes = positions + micro.input_ids.numel(), passes + 1
                    real += 0 if filler else int(micro.attention_mask.sum())
                    t0 = time.perf_counter()
                    with self.autocast():  # the forward only; logits are cast to float32 before the loss
                        loss, stats, weight, output = self._micro_loss(micro, shard.global_units)
                    if filler:  # a pass so this rank makes as many backwards as the others, adding nothing
                        loss, stats, weight = zero_loss(output), {}, 0.0
                    elif not torch.isfinite(loss.detach()).all():  # skip it here; the other ranks' data still count
                        skipped += 1
                        loss, stats = zero_loss(output), {}
                    if shard.micro is not None:  # planned: the step falls on the last, however many there are
                        engine.set_gradient_accumulation_boundary(j == len(parts) - 1)
                    engine.backward(loss * weight * self.world_size, scale_wrt_gas=False)
                    t1 = time.perf_counter()
                    t_fwd_bwd += t1 - t0
                    if engine.is_gradient_accumulation_boundary():
                        gn = self._clip_gradients()  # None where DeepSpeed clips (and reports the norm)
                        engine.step()
                        gn = engine.get_global_grad_norm() if gn is None else gn
                        sums["grad_norm"] = sums.get("grad_norm", 0.0) + (float(gn) if gn is not None else 0.0)
                        sums["optimizer_steps"] = sums.get("optimizer_steps", 0.0) + 1
                    else:
                        engine.step()
                    t_opt += time.perf_counter() - t1
                    for k, v in stats.items():
                        if k == "ratio_max":
                            ratio_max = max(ratio_max or 0.0, float(v))
                        else:
                            sums[k] = sums.get(k, 0.0) + float(v) * weight
                            if epochs > 1 and k in EPOCH_STATS:
                                per_epoch[epoch][k] = per_epoch[epoch].get(k, 0.0) + float(v) * weight
                    weight_total += weight if stats else 0.0
        steps = max(1.0, sums.pop("optimizer_steps", 1.0))
        out = {k: v / max(weight_total, 1e-12) for k, v in sums.items() if k != "grad_norm"}
        out["nonfinite_microbatches"] = float(skipped)
        for e, stats in enumerate(per_epoch if epochs > 1 else []):
            out |= {f"epoch{e + 1}/{k}": v * epochs / max(weight_total, 1e-12) for k, v in stats.items()}
        out["grad_norm"] = sums.get("grad_norm", 0.0) / steps
        if ratio_max is not None:
            out["ratio_max"] = ratio_max
        out["lr"] = engine.get_lr()[0]
        out["time/train_forward_backward"] = t_fwd_bwd  # forward, loss and backward of every micro-batch
        out["train/micro_batches"] = float(passes)  # forward/backward passes, every mini-batch and epoch
        out["train/padding_frac"] = 1.0 - real / max(positions, 1)  # padded share of the positions they ran
        out["time/optimizer"] = t_opt  # engine.step(): gradient clipping, the AdamW update, ZeRO's gathers
        out["optimizer/state_bytes"] = float(optimizer_state_bytes(engine.optimizer, engine.module))
        out["memory/peak_rss_bytes"] = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
        out["train/autocast_bf16"] = float(self.bf16)
        return out

    def autocast(self):
        """The context of this rank's forward passes: bf16 autocast where `trainer.autocast` chose it
        (`actors.precision`), else nothing; parameters, gradients and optimizer state stay in model.dtype."""
        return autocast(self.bf16, self.device)

    def prepare(self, minibatches: list[Shard]) -> list[Shard]:
        """This step's mini-batches before the first update (a hook: as they are, unless a subclass recomputes)."""
        return minibatches

    def _micro_loss(self, micro: TrainBatch, global_units: float) -> tuple[torch.Tensor, dict, float, torch.Tensor]:
        """(loss, detached stats, the micro-batch's share of the mini-batch's aggregation units, the model output
        the loss was computed from)."""
        raise NotImplementedError

    def _clip_gradients(self) -> float | None:
        """Clip the (already all-reduced) gradients to `trainer.grad_clip` with torch's multi-tensor kernels and return
        their global norm, where the trainer clips itself (`clips_itself`); None where DeepSpeed does it in `step`."""
        if self._clip is None:
            return None
        return float(torch.nn.utils.clip_grad_norm_(self._trained, self._clip, foreach=True))

    def full_parameters(self, trained_only: bool = False):
        """A context holding the full parameters on this rank (`trained_only`: those that train): ZeRO-3 gathers
        its shards (a collective, so every rank must enter it together); other stages keep them whole already."""
        if self.zero_stage == 3:
            import deepspeed

            params = [p for p in self.engine.module.parameters() if p.requires_grad or not trained_only]
            return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        return contextlib.nullcontext()

    def state_dict(self, pack: bool = True) -> dict | None:
        """What a weight sync sends (`actors.lora.sync_state`: the full weights, or under LoRA the adapters), packed
        for one object-store put. Under ZeRO-3 every rank must be called together (see `full_parameters`): the
        ranks whose result is not needed pass `pack=False` and return None."""
        with self.full_parameters(trained_only=True):
            return pack_state(sync_state(self.engine.module)) if pack else None

    def sync_bytes(self) -> int:
        """Bytes of one weight sync's payload (what `state_dict` packs; every rank is called under ZeRO-3)."""
        with self.full_parameters(trained_only=True):
            return state_bytes(sync_state(self.engine.module))

    def weights_checksum(self) -> str:
        """SHA-256 of what weight syncs send (every rank is called): the receivers report the same checksum."""
        with self.full_parameters(trained_only=True):
            return state_checksum(sync_state(self.engine.module))

    def pid(self) -> int:
        """This rank's process id (for tests that kill it from outside)."""
        return os.getpid()

    def save_checkpoint(self, path: str) -> None:
        """Weights, optimizer and LR-scheduler state under `path` (a collective call: every rank, same path). Under
        LoRA the weights are the adapters (and a critic's head) only; the driver records the base's identity."""
        self.engine.save_checkpoint(path, tag="ds", save_latest=False, exclude_frozen_parameters=bool(self.lora))

    def load_checkpoint(self, path: str) -> None:
        """Restore what `save_checkpoint` wrote (same number of ranks)."""
        load_fn = None
        if self.lora:  # the checkpoint holds the trained tensors only: load exactly those, strictly
            load_fn = lambda src, dst: load_sync_state(dst, {k: v for k, v in src.items() if k in trainable_names(dst)})
        loaded, _ = self.engine.load_checkpoint(path, tag="ds", load_optimizer_states=True,
                                                load_lr_scheduler_states=True, custom_load_fn=load_fn)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {path!r}")


class PolicyTrainer(DeepSpeedRank):
    """A policy rank: the objective `algorithm.policy_loss` names (PPO/GRPO's clipped surrogate, GSPO or CISPO;
    survey 3.14, A.10) with its corrections and optional KL and entropy terms (`actors.objectives`)."""

    def __init__(self, rank: int, world_size: int, model: dict, trainer: dict, algorithm: dict,
                 temperature: float, max_new_tokens: int, grad_accum: int, total_steps: int, seed: int = 0,
                 device: str = "cpu"):
        """`max_new_tokens` is the constant length L of the `seq-mean-token-sum-norm` aggregation (Dr.GRPO, A.3.1)."""
        super().__init__(rank, world_size, model, trainer, grad_accum, total_steps, seed, device)
        self.alg, self.temperature, self.max_new_tokens = algorithm, temperature, max_new_tokens
        self.kl_coef = 0.0  # β of this step's KL-in-loss term: an argument of `train_step`
        self._mismatch = [0.0, 0.0, 0.0]  # sum |logp - rollout_logp|, tokens, max over this step's first mini-batch

    def train_step(self, shards: list[dict], kl_coef: float) -> dict[str, float]:
        """`DeepSpeedRank.train_step` with β = `kl_coef` in the loss (3.14; 0 when the KL is in the reward or off,
        set by the driver's KL controller), plus the rollout/trainer log-prob mismatch of the sampled tokens:
        `mismatch/logprob_abs_mean` and `_max` of |log π_trainer − log π_rollout| over the response tokens of
        this rank's first mini-batch, measured in its forward passes before the step's first optimizer step
        (so at the weights the rollout workers serve in strict on-policy mode; with loop.max_staleness N it
        includes up to N updates of policy lag), and `mismatch/tokens`, the token count, for merging ranks."""
        self._mismatch, self.kl_coef = [0.0, 0.0, 0.0], kl_coef
        out = super().train_step(shards)
        total, tokens, worst = self._mismatch
        if shards:
            out |= {"mismatch/logprob_abs_mean": total / max(tokens, 1.0), "mismatch/logprob_abs_max": worst,
                    "mismatch/tokens": tokens}
        return out

    def build_model(self) -> torch.nn.Module:
        m = self.model_cfg
        return load_causal_lm(m["path"], m["dtype"], m["trust_remote_code"], self.device)

    @torch.no_grad()
    def prepare(self, minibatches: list[Shard]) -> list[Shard]:
        """Decoupled PPO (`algorithm.decoupled`; AReaL, Fu et al. 2025): every row's `old_logp` becomes the log-probs
        of the current weights, before this step's first update (the proximal policy pi_prox, which the ratio clips
        against, survey 2.4.3); the rollout's log-probs stay the behaviour policy of the pi_prox / pi_behaviour weight
        (`actors.objectives.policy_objective`). Micro-batches as the update cuts them (one forward each, on every rank
        alike, as ZeRO-3 needs)."""
        if not self.alg.get("decoupled"):
            return minibatches
        out = []
        for shard in minibatches:
            rows = shard.rows
            prox = torch.zeros_like(rows.rollout_logp)  # [B, T]
            for part, filler in micro_parts(shard, self.grad_accum):
                micro = rows.select(part).trim()
                with self.autocast():  # pi_prox in the numerics of the update's own forward
                    logp, _ = response_logprobs(self.engine, micro, self.temperature,
                                                self.model_cfg["share_prompt_forward"])  # [b, t]
                if not filler:
                    prox[part, : logp.shape[1]] = logp
            prox = torch.where(rows.response_mask.bool(), prox, 0)  # [B, T]
            out.append(dataclasses.replace(shard, rows=dataclasses.replace(rows, old_logp=prox)))
        return out

    def _micro_loss(self, micro: TrainBatch, global_units: float) -> tuple[torch.Tensor, dict, float, torch.Tensor]:
        """The loss of one micro-batch, its stats, its share of the mini-batch's aggregation units, the logits."""
        alg = self.alg
        mask = micro.response_mask
        logp, logits = response_logprobs(self.engine, micro, self.temperature,
                                         self.model_cfg["share_prompt_forward"])  # [b, t], [b, t, V]
        if self.before_update:
            with torch.no_grad():
                gap = torch.where(mask.bool(), (logp - micro.rollout_logp).abs(), 0)  # [b, t]
                self._mismatch[0] += float(gap.sum())
                self._mismatch[1] += float(mask.sum())
                self._mismatch[2] = max(self._mismatch[2], float(gap.max()))
        loss, stats = policy_objective(self.alg, logp, logits, micro, self.kl_coef, self.temperature,
                                       self.max_new_tokens)
        units = float(mask.sum()) if alg["agg"] == "token-mean" else float(mask.shape[0])
        return loss, stats, units / global_units, logits

    def save_pretrained(self, path: str) -> str | None:
        """Write the policy as a Hugging Face checkpoint (safetensors) with its tokenizer, from rank 0 (under
        ZeRO-3 every rank must be called: the parameters are gathered first). Under LoRA: the adapters merged
        into a copy of the base, and the adapter alone in peft's format at `path`/adapter."""
        m = self.model_cfg
        with self.full_parameters(trained_only=bool(self.lora)):
            if self.rank == 0 and self.lora:
                save_merged_policy(path, m["path"], self.lora, sync_state(self.engine.module), self.tokenizer,
                                   m["dtype"], m["trust_remote_code"])
            elif self.rank == 0:
                self.engine.module.save_pretrained(path, safe_serialization=True)
                self.tokenizer.save_pretrained(path)
        return path if self.rank == 0 else None

    @torch.no_grad()
    def score_reference(self, groups: list[Group]) -> list[Group]:
        """Fill `ref_logp` of every sample with the reference policy's log-probs: under LoRA (`model.lora.reference:
        trainer`) the reference is this rank's own base model with the adapters disabled, so no second copy of the
        base is held anywhere. Any rank can do it alone (ZeRO <= 2 keeps the parameters whole on each)."""
        if not self.lora:
            raise RuntimeError("the trainer holds the reference only under LoRA (model.lora)")
        start = time.perf_counter()
        module, m = self.engine.module, self.model_cfg
        batch = collate_groups(groups, self.tokenizer.pad_token_id)
        was_training = module.training
        module.eval()
        try:
            with module.disable_adapter(), self.autocast():
                rows = per_token(lambda mb: response_logprobs(module, mb, self.temperature, m["share_prompt_forward"])[0],
                                 batch, self.cfg["micro_batch_size"])
        finally:
            module.train(was_training)
        for s, row in zip((s for g in groups for s in g.samples), rows):
            s.ref_logp = row
        Group.spread_time(groups, "score", time.perf_counter() - start)
        return groups

    # -- NCCL weight sync into vLLM (rollout.vllm.weight_sync: nccl; GPU only)

    def init_weight_sender(self, world_size: int) -> tuple[str, int]:
        """Rank 0: (address, port) of a new weight-update group of `world_size` ranks; join it with
        `join_weight_group` while the vLLM engines join with `init_weight_group`."""
        self._weight_group = (socket.gethostbyname(socket.gethostname()), free_port(), world_size)
        return self._weight_group[:2]

    def join_weight_group(self) -> None:
        """Rank 0: block until every vLLM worker has joined the group `init_weight_sender` named."""
        from actors.engines.vllm import NCCLWeightSender

        addr, port, world = self._weight_group
        self._sender = NCCLWeightSender(addr, port, world)

    def weight_meta(self):
        """Names, dtypes and shapes of the full parameters, in send order (what the vLLM receivers allocate)."""
        from actors.engines.vllm import WeightMeta

        with self.full_parameters():
            return WeightMeta.of(self.engine.module.state_dict().items())

    def send_weights(self) -> None:
        """Broadcast the full parameters from rank 0 over the weight-update group (under ZeRO-3 every rank is
        called, to gather them)."""
        with self.full_parameters():
            if self.rank == 0:
                self._sender.send(self.engine.module.state_dict().items())
