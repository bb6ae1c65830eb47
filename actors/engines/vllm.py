"""vLLM generation engine (GPU), behind the same interface as the `hf` engine: `generate`,
`load_weights`, `checksum`; plus both ends of an optional NCCL weight-update group.

Written against vLLM 0.33.0 (the version `deploy/Dockerfile` pins). `vllm` is imported only when an engine is
built, so the CPU install never needs it; a missing `vllm` is an ImportError that says how to install it.

**Log-probs and temperature.** The trainer scores the policy as log softmax(logits / T) of each sampled token
(`actors.modeling.token_logprobs`), and so does the `hf` engine. vLLM's `SamplingParams(logprobs=0)` returns
the sampled token's log-prob at every position, but by default (`logprobs_mode="raw_logprobs"`) from the raw
model distribution, before temperature: with T != 1 those differ from ours on every token (TRL #4159,
prime-rl #697). The engine is therefore built with `logprobs_mode="processed_logprobs"`, which vLLM documents
as "the values after applying all processors, including temperature and top_k/top_p" (vLLM ModelConfig /
engine args `--logprobs-mode`; checked in 0.33.0's `v1/sample/sampler.py`: temperature, then top-k/top-p, then
log_softmax). With `top_p = 1` and top-k off (we always pass `top_k=-1`) and no penalties (none are set), that
is exactly log softmax(logits / T). With `top_p < 1` vLLM's value is the log-prob under the renormalised
nucleus (the distribution actually sampled), which exceeds the trainer's full-softmax value by -log(nucleus
mass) per token; verl and the vLLM-team's vime make the same choice and the same caveat. Greedy decoding
(T = 0) reports log softmax(logits), as the `hf` engine does.

**Weight updates.** Two paths:

* Object store (default, any setup): `load_weights(packed)` receives what the `hf` engine receives (trainer
  rank 0's state dict, one object-store put), writes it as `model.safetensors` into a staging directory on this
  node and has every vLLM worker reload it in place with `collective_rpc("reload_weights", weights_path=...)`,
  the in-place reload vLLM documents with sleep mode for RL weight updates (docs.vllm.ai, features/sleep_mode).
  A file rather than tensors in the RPC keeps large state dicts out of vLLM's control-message channel.
* NCCL broadcast (`weight_sync="nccl"`, for large models): vLLM's weight-transfer API (docs.vllm.ai,
  training/weight_transfer; examples/rl/rlhf_nccl.py). Trainer rank 0 (`NCCLWeightSender`) and every vLLM
  worker form one NCCL group (`weight_group_ranks` gives the ranks); each sync runs concurrently
  `engine.receive_weights(meta, version)` on every rollout worker and `sender.send(named_tensors)` on rank 0,
  tensor by tensor (`packed=False`) or in ~1 GB packed buckets (`packed=True`). `receive_weights` returns the
  version vLLM reports serving after `finish_weight_update`, the handshake the orchestrator checks.

**Partial rollouts** (`rollout.partial`; object-store weight sync): `generate(..., refresh=fn, version=v)` drives
`LLM.llm_engine` itself, one `step()` at a time (`add_request` / `step` / `abort_request`, vLLM's LLMEngine API;
each of the n samples its own request, seeded `seed + i` as vLLM seeds a request's n children), with
`RequestOutputKind.DELTA` outputs so every step hands over only the new tokens, which are tagged with the version then
served. Between steps it asks `fn`; when newer weights come, `load_weights` first aborts every request in flight
(vLLM's engine core runs ahead of `step()`: the tokens it made that `step()` had not handed over are dropped, and
every token kept was made by the old weights), reloads, resets the prefix cache (vLLM keeps KV blocks computed by
the old weights otherwise; it does not reset it on a weight update, vllm#9744) and each unfinished sequence is added
again as a new request whose prompt is the prompt + its tokens so far, `max_tokens` the rest of its budget and a
fresh seed. This is the abort-and-resume scheme of AReaL and slime. A stop string split across a resume (vLLM sees
only the new part) is found here and the sequence cut after it. Checked against a fake `vllm` module only: not run on
vLLM itself.

**LoRA** (`model.lora`; object-store path only): the engine is built with `enable_lora=True` and serves the base
plus one adapter. Each `load_weights` receives the adapters only (trainer rank 0's `actors.lora.sync_state`), writes
them in peft's format (`actors.lora.save_adapter`) to a directory of their own and from then on passes a
`LoRARequest(name, int_id, path)` with every generate call, a new int id per load, as vLLM documents for
offline LoRA inference (docs.vllm.ai, features/lora: `LLM(enable_lora=True, max_lora_rank=...)`,
`llm.generate(..., lora_request=LoRARequest(...))`); vLLM loads an adapter on first use and evicts the least
recently used one beyond `max_loras`. Before the first sync no adapter is passed: version 0 is the base, which
is what a fresh adapter computes (B = 0). This path is written against vLLM's documented API and checked against
a fake `vllm` module only: it has not run on vLLM itself.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.engines.hf import first_stop_end
from actors.records import Completion, SamplingParams

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
VLLM_VERSION = "0.33.0"  # what this module is written against; deploy/Dockerfile pins it (with torch 2.14.0)
INSTALL_HINT = (f"pip install vllm=={VLLM_VERSION} on a Linux machine with a CUDA GPU (it installs its own "
                "matching torch), or use rollout.engine: hf")


def import_vllm():
    """The `vllm` module, imported on first use; an ImportError that says what to install when it is missing."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine: vllm needs the vllm package, which cannot be imported ({e}). "
                          f"Install it: {INSTALL_HINT}.") from e
    return vllm


# ----------------------------------------------------------------------------- sampling and results


def vllm_sampling_params(vllm: Any, sampling: SamplingParams, seed: int, **overrides: Any) -> Any:
    """`vllm.SamplingParams` for our `SamplingParams`: the same sampling as the `hf` engine, each sampled
    token's log-prob (`logprobs=0`), stop strings kept in the text (our contract), `seed` for the request
    (vLLM seeds its n samples `seed`, `seed + 1`, ...). `overrides`: other fields (partial rollouts: n, max_tokens,
    output_kind)."""
    greedy = sampling.temperature == 0
    return vllm.SamplingParams(**{**dict(
        n=sampling.n,
        temperature=0.0 if greedy else sampling.temperature,
        top_p=1.0 if greedy else sampling.top_p,
        top_k=-1,  # the full distribution, like the hf engine (-1 and 0 both mean "off" in vLLM 0.33)
        max_tokens=sampling.max_new_tokens,
        stop=list(sampling.stop) or None,
        include_stop_str_in_output=True,
        logprobs=0,  # only the sampled token's log-prob (with processed_logprobs: under logits / T)
        seed=seed,
        skip_special_tokens=True,
    ), **overrides})


def request_seeds(seed: int, num_prompts: int, n: int) -> list[int]:
    """One seed per prompt, `n` apart, so no two of the batch's samples share a random stream."""
    return [seed + i * n for i in range(num_prompts)]


def completion_from_output(output: Any) -> Completion:
    """Our `Completion` from one vLLM `CompletionOutput` (`token_ids`, `text`, `logprobs` as one
    {token_id: Logprob} per position, `finish_reason`)."""
    ids, logps = sampled_logprobs(output)
    return Completion(ids, output.text, logps, checked_finish_reason(output.finish_reason))


def checked_finish_reason(reason: str | None) -> str:
    """A finished request's `finish_reason`, which must be "stop" or "length" (else vLLM aborted it)."""
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ended with finish_reason={reason!r} (expected 'stop' or 'length'): it was "
                           "aborted, e.g. the engine ran out of KV-cache memory or was stopped")
    return reason


def sampled_logprobs(output: Any) -> tuple[list[int], list[float]]:
    """(token ids, each one's log-prob) of a `CompletionOutput` (or, streamed as DELTA, of its new tokens)."""
    ids = [int(t) for t in output.token_ids]
    if output.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; the engine must request them with SamplingParams(logprobs=0)")
    if len(output.logprobs) != len(ids):
        raise RuntimeError(f"vLLM returned {len(output.logprobs)} log-prob positions for {len(ids)} tokens")
    logps = []
    for pos, (token, candidates) in enumerate(zip(ids, output.logprobs)):
        if candidates is None or token not in candidates:
            raise RuntimeError(f"vLLM returned no log-prob for sampled token {token} at position {pos}")
        logps.append(float(candidates[token].logprob))
    return ids, logps


def completions_from_outputs(outputs: Sequence[Any], n: int) -> list[list[Completion]]:
    """Per prompt, its `n` completions in sample order, from vLLM's `RequestOutput`s (one per prompt, in order)."""
    groups = []
    for request in outputs:
        samples = sorted(request.outputs, key=lambda o: o.index)
        if len(samples) != n:
            raise RuntimeError(f"vLLM returned {len(samples)} completions for a prompt; asked for {n}")
        groups.append([completion_from_output(o) for o in samples])
    return groups


# ----------------------------------------------------------------------------- the engine


@dataclass
class PartialRow:
    """One sample of a partial rollout: what vLLM has handed over so far and the policy version behind each token."""

    prompt: list[int]
    seed: int  # the seed a plain generate gives this sample (its request's seed + its index)
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # None while unfinished
    resumes: int = 0  # times it was added again after a weight update
    text_start: int = 0  # len(text) when its current request began: a stop string may straddle it

    def completion(self) -> Completion:
        return Completion(self.ids, self.text, self.logprobs, self.finish_reason or "length", self.versions)


def stop_across(text: str, start: int, stops: Sequence[str]) -> bool:
    """Whether a stop string in `text` begins before `start` and ends after it (one vLLM could not see: it saw
    only the text from `start` on)."""
    for stop in stops:
        at = text.find(stop, max(0, start - len(stop) + 1))
        if at != -1 and at < start < at + len(stop):
            return True
    return False


@dataclass(frozen=True)
class WeightMeta:
    """What the receivers of an NCCL weight broadcast allocate: names, dtypes ("bfloat16") and shapes, in send order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]

    @classmethod
    def of(cls, named_tensors: Iterable[tuple[str, Any]]) -> "WeightMeta":
        pairs = list(named_tensors)
        return cls([n for n, _ in pairs], [str(t.dtype).removeprefix("torch.") for _, t in pairs],
                   [list(t.shape) for _, t in pairs])


class VLLMEngine:
    """One `vllm.LLM` (tensor-parallel over this actor's GPUs), fed the prompts' token ids."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                 device: str = "cuda", *, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 enable_sleep_mode: bool = False, enforce_eager: bool = False, max_model_len: int | None = None,
                 seed: int = 0, weight_sync: str = "object_store", lora: dict | None = None):
        """`gpu_memory_utilization` is the share of each GPU vLLM may take (weights + KV cache); lower it when the
        rollout worker shares its GPU with trainer or scoring actors. `weight_sync`: "object_store" or "nccl".
        `lora` (`model.lora`): serve base + adapter, each sync a new adapter (see the module docstring)."""
        if device != "cuda":
            raise ValueError("rollout.engine: vllm runs on CUDA GPUs; give each rollout worker "
                             "rollout.num_gpus >= its tensor-parallel size (or use rollout.engine: hf on CPU)")
        if weight_sync not in ("object_store", "nccl"):
            raise ValueError(f"weight_sync: {weight_sync!r}; allowed: 'object_store', 'nccl'")
        if lora and weight_sync == "nccl":
            raise ValueError("model.lora: LoRA adapters reach vLLM through the object store; set weight_sync to "
                             "object_store")
        vllm = import_vllm()
        self._vllm = vllm
        self.model_path, self.dtype, self.trust_remote_code = model_path, dtype, trust_remote_code
        kwargs: dict[str, Any] = dict(
            model=model_path, trust_remote_code=trust_remote_code, dtype=dtype, seed=seed,
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode, enforce_eager=enforce_eager, max_model_len=max_model_len,
            logprobs_mode="processed_logprobs",  # log-probs under logits / T (see the module docstring)
        )
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "mp"  # the GPUs Ray gave this actor, not a new placement
        if weight_sync == "nccl":
            from vllm.config import WeightTransferConfig

            kwargs["weight_transfer_config"] = WeightTransferConfig(backend="nccl")
        if lora:
            kwargs |= dict(enable_lora=True, max_lora_rank=vllm_lora_rank(lora["r"]), max_loras=1)
        self.llm = vllm.LLM(**kwargs)
        self.lora = lora
        self._lora_request = None  # the adapter every generate call names (None: the base)
        self._staging = Path(tempfile.mkdtemp(prefix="raylhf-vllm-weights-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._staging), True)
        self._checksum: str | None = None
        self._asleep = False
        self._request_ids = itertools.count()  # partial rollouts: a new request id per (sample, resume)
        self._in_flight: dict[str, int] = {}  # partial rollouts: request id -> its row, until finished or aborted

    @property
    def tokenizer(self):
        """The engine's tokenizer (`LLM.get_tokenizer()`): multi-turn rollouts tokenize prompts and observations with
        it (`actors.turn_format`). Each turn's context extends the last one, and vLLM's automatic prefix caching (on
        by default) serves that shared prefix from its KV cache."""
        return self.llm.get_tokenizer()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int,
                 refresh: Callable[[], int | None] | None = None, version: int = 0) -> list[list[Completion]]:
        """`sampling.n` completions per prompt (its token ids, `actors.modeling.encode_prompts`), with each sampled
        token's log-prob under logits / T. `refresh` (partial rollouts): asked between engine steps; it loads newer
        weights (`load_weights`) and returns their version, or returns None. `version`: the weights' version at the
        start; each completion's `versions` then say which version sampled each token (module docstring)."""
        self.wake_up()
        if refresh is not None:
            return self._generate_partial(prompt_ids, sampling, seed, refresh, version)
        params = [vllm_sampling_params(self._vllm, sampling, s)
                  for s in request_seeds(seed, len(prompt_ids), sampling.n)]
        lora = {"lora_request": self._lora_request} if self.lora else {}
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in prompt_ids], params, use_tqdm=False, **lora)
        return completions_from_outputs(outputs, sampling.n)

    def _generate_partial(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int,
                          refresh: Callable[[], int | None], version: int) -> list[list[Completion]]:
        """Partial rollouts: the engine stepped by hand, each sample its own request; after new weights, every
        unfinished sample goes on from its tokens so far (see the module docstring)."""
        n = sampling.n
        rows = [PartialRow(list(p), s + i) for p, s in zip(prompt_ids, request_seeds(seed, len(prompt_ids), n))
                for i in range(n)]
        engine = self.llm.llm_engine
        try:
            for j in range(len(rows)):
                self._submit(rows, j, sampling)
            while self._in_flight:
                for out in engine.step():
                    j = self._in_flight.get(out.request_id)
                    if j is not None:  # else: aborted since (its last tokens were made by replaced weights)
                        self._take(rows, j, out, version, sampling.stop)
                if self._in_flight and (loaded := refresh()) is not None:  # load_weights aborted what was in flight
                    version = loaded
                    for j, row in enumerate(rows):
                        if row.finish_reason is None:
                            row.resumes += 1
                            self._submit(rows, j, sampling)
        finally:  # an error leaves nothing of this call running in the engine
            self._abort_in_flight()
        flat = [row.completion() for row in rows]
        return [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _submit(self, rows: list[PartialRow], j: int, sampling: SamplingParams) -> None:
        """Add row `j` as a new request: its prompt + tokens so far, the rest of its token budget, and a seed of its
        own per resume (`row.seed + resumes * len(rows)`: no two requests of the call share a random stream)."""
        from vllm.sampling_params import RequestOutputKind

        row = rows[j]
        left = sampling.max_new_tokens - len(row.ids)
        if left <= 0:
            row.finish_reason = "length"
            return
        params = vllm_sampling_params(self._vllm, sampling, row.seed + row.resumes * len(rows), n=1, max_tokens=left,
                                      output_kind=RequestOutputKind.DELTA)
        request_id = f"raylhf-partial-{next(self._request_ids)}"
        lora = {"lora_request": self._lora_request} if self.lora else {}
        self.llm.llm_engine.add_request(request_id, {"prompt_token_ids": row.prompt + row.ids}, params, **lora)
        self._in_flight[request_id] = j
        row.text_start = len(row.text)

    def _take(self, rows: list[PartialRow], j: int, out: Any, version: int, stops: Sequence[str]) -> None:
        """Append one DELTA `RequestOutput`'s new tokens to row `j`, each tagged `version`; finish the row when vLLM
        finished it, or when a stop string straddles its last resume (the request is then aborted)."""
        row, (completion,) = rows[j], out.outputs
        ids, logps = sampled_logprobs(completion)
        row.ids += ids
        row.logprobs += logps
        row.versions += [version] * len(ids)
        row.text += completion.text
        if out.finished:
            del self._in_flight[out.request_id]
            row.finish_reason = checked_finish_reason(completion.finish_reason)
        if row.resumes and stops and stop_across(row.text, row.text_start, stops):
            k = first_stop_end(self.tokenizer, row.ids, stops) or len(row.ids)  # one straddles: found
            row.ids, row.logprobs, row.versions = row.ids[:k], row.logprobs[:k], row.versions[:k]
            row.text, row.finish_reason = self.tokenizer.decode(row.ids, skip_special_tokens=True), "stop"
            if not out.finished:
                del self._in_flight[out.request_id]
                self.llm.llm_engine.abort_request([out.request_id])

    def _abort_in_flight(self) -> None:
        """Partial rollouts: abort the requests of a generate call in progress before its weights change (their rows
        keep the tokens handed over so far; `_generate_partial` adds them again)."""
        if self._in_flight:
            self.llm.llm_engine.abort_request(list(self._in_flight))
            self._in_flight.clear()

    # -- object-store weight updates

    def load_weights(self, packed: dict, version: int | None = None) -> None:
        """Serve the packed state dict (`actors.weights.pack_state_dict`) from now on, reloaded in place (under
        LoRA: the packed adapters, served as a new LoRA adapter)."""
        from safetensors.torch import save_file

        from actors.weights import unpack_state_dict

        self.wake_up()
        self._abort_in_flight()
        if self.lora:
            self._load_adapter(unpack_state_dict(packed), version)
            self._checksum = packed_checksum(packed)
            return
        state = {name: t.contiguous() for name, t in unpack_state_dict(packed).items()}
        tmp = self._staging / "model.safetensors.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, self._staging / "model.safetensors")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self._staging),
                                                          "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached KV blocks are the old weights' (vLLM keeps them: vllm#9744)
        if version is not None:
            self.llm.update_weight_version(str(version))
        self._checksum = packed_checksum(packed)

    def _load_adapter(self, state: dict, version: int | None) -> None:
        """Write the adapters in peft's format to a directory of their own and name it in every generate call from
        now on, with a new LoRA int id (vLLM caches adapters by id); the previous adapter's files are removed."""
        from vllm.lora.request import LoRARequest

        from actors.lora import save_adapter

        previous = self._lora_request
        lora_id = (previous.lora_int_id + 1) if previous is not None else 1
        path = save_adapter(self._staging / f"adapter-{lora_id}", state, self.lora, self.model_path)
        self._lora_request = LoRARequest(f"raylhf-policy-v{version}", lora_id, str(path))
        if previous is not None:
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def checksum(self) -> str:
        """SHA-256 of the weights last loaded, as `actors.weights.weights_checksum` computes it on the trainer
        (vLLM's own tensors are fused and sharded, so they cannot be hashed alike). Before any load: of the
        checkpoint, read once on CPU. After an NCCL sync: the checksum the sender declared, if any."""
        if self._checksum is None and self.lora:
            return "the base model (no adapter loaded yet)"
        if self._checksum is None:
            from actors.modeling import load_causal_lm
            from actors.weights import weights_checksum

            self._checksum = weights_checksum(load_causal_lm(self.model_path, self.dtype, self.trust_remote_code))
        return self._checksum

    # -- NCCL weight updates (engine built with weight_sync="nccl")

    def init_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          packed: bool = False) -> None:
        """Join trainer rank 0's NCCL weight-update group as ranks `rank_offset` .. `rank_offset + TP - 1`.
        Call together with `NCCLWeightSender(...)` on the trainer: both block until every rank has joined."""
        self.llm.init_weight_transfer_engine({"init_info": dict(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, packed=packed)})

    def receive_weights(self, meta: WeightMeta, version: int, checksum: str | None = None) -> int:
        """Receive one broadcast (`meta` in send order) while the trainer runs `NCCLWeightSender.send`; returns the
        version vLLM now reports serving (the handshake)."""
        self.wake_up()
        self.llm.start_weight_update()
        self.llm.update_weights({"update_info": dict(names=meta.names, dtype_names=meta.dtype_names,
                                                     shapes=meta.shapes)})
        self.llm.finish_weight_update(weight_version=str(version))
        self.llm.reset_prefix_cache()  # cached KV blocks are the old weights' (vLLM keeps them: vllm#9744)
        self._checksum = checksum or f"unverified (NCCL broadcast of version {version})"
        return int(self.llm.get_weight_version())

    # -- sleep mode (engine built with enable_sleep_mode=True): free the GPU for a colocated trainer

    def sleep(self, level: int = 1) -> None:
        """Release the KV cache (level 1 also offloads the weights to CPU; level 2 drops them: reload next)."""
        self.llm.sleep(level=level)
        self._asleep = True

    def wake_up(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False


def vllm_lora_rank(r: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds rank `r`."""
    for rank in LORA_RANKS:
        if rank >= r:
            return rank
    raise ValueError(f"model.lora.r: {r} is above vLLM's largest LoRA rank ({LORA_RANKS[-1]})")


def packed_checksum(packed: dict) -> str:
    """`actors.weights.weights_checksum` computed on a packed state dict, whose arrays already hold the raw bytes
    (bfloat16 travels as int16 bits), so the trainer's checksum and this one agree for the same weights."""
    h = hashlib.sha256()
    for name in sorted(packed):
        h.update(name.encode())
        h.update(packed[name][0].tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- trainer rank 0's end of NCCL sync


def weight_group_ranks(tensor_parallel_sizes: Sequence[int]) -> tuple[int, list[int]]:
    """(world size, rank offset of each rollout engine) of the weight-update group: the trainer is rank 0 and
    engine i's TP workers take the next `tensor_parallel_sizes[i]` ranks."""
    offsets, next_rank = [], 1
    for tp in tensor_parallel_sizes:
        offsets.append(next_rank)
        next_rank += tp
    return next_rank, offsets


class NCCLWeightSender:
    """Trainer rank 0's end of the weight-update group (a vLLM `StatelessProcessGroup` + `PyNcclCommunicator` on
    the current CUDA device, separate from DeepSpeed's process group). Full tensors only: gather ZeRO-3 shards
    (`deepspeed.zero.GatheredParameters`) before `send`."""

    def __init__(self, master_address: str, master_port: int, world_size: int, packed: bool = False):
        import_vllm()
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        self.packed = packed
        self.group = trainer_init(dict(master_address=master_address, master_port=master_port,
                                       world_size=world_size))

    def send(self, named_tensors: Iterable[tuple[str, Any]]) -> None:
        """Broadcast the tensors (CUDA, in the order of the `WeightMeta` the receivers got) from rank 0."""
        import torch

        if self.packed:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(iterator=iter(named_tensors), group=self.group, src=0,
                                           post_iter_func=lambda item: item[1])
        else:
            stream = torch.cuda.current_stream()
            for _, tensor in named_tensors:
                self.group.broadcast(tensor.contiguous(), src=0, stream=stream)
        torch.cuda.current_stream().synchronize()
