"""Hugging Face engine: batched sampling of G completions per prompt with a KV cache (each prompt
prefilled once, finished rows dropped), EOS and stop strings, and each sampled token's log-prob
under logits / temperature.

Partial rollouts (`rollout.partial`): `generate(..., refresh=fn)` asks `fn` at every token boundary whether newer
weights have arrived; if they have (`fn` loaded them and returned their version), the live sequences go on from
where they are: their KV cache is recomputed with the new weights (one forward over prompt + tokens so far), so
every later token is sampled from, and its log-prob taken under, the new policy; `Completion.versions` records the
version behind each token."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import StoppingCriteria

from actors.lora import load_sync_state, sync_state, wrap
from actors.modeling import cache_argument, hf_model, load_causal_lm, load_tokenizer, position_ids, token_logprobs
from actors.precision import autocast, choose, rollout_dtype
from actors.records import Completion, SamplingParams
from actors.weights import state_checksum, unpack_state_dict

SAMPLERS = ("loop", "generate")


class HFEngine:
    """Holds one model and its tokenizer; `generate` takes prompts' token ids and returns completions.
    `sampler`: "loop" (our cache loop, falls back to "generate" for caches it cannot reshape) or
    "generate" (Hugging Face `model.generate`). `lora` (`model.lora` of the config): the base is wrapped with
    adapters, and weight updates carry the adapters only (applied unmerged, as the trainer computes). `autocast`
    (`rollout.autocast`: off, bf16, auto): the forward passes of `generate` under bf16 autocast
    (`actors.precision`); the weights stay in `dtype` and sampling and log-probs in float32. `weights_dtype`
    (`rollout.dtype`: model, a dtype, or auto: bfloat16 where bf16 is native): the dtype the weights are held in."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu",
                 sampler: str = "loop", lora: dict | None = None, autocast: str = "off", weights_dtype: str = "model"):
        model = load_causal_lm(model_path, dtype, trust_remote_code, device)
        model = (wrap(model, lora) if lora else model).eval()
        self._serve(model, load_tokenizer(model_path, trust_remote_code), device, sampler)
        self.bf16 = choose(autocast, device, "HFEngine")
        self._hold(rollout_dtype(weights_dtype, dtype, device), weights_dtype, dtype)

    def _hold(self, held: str, mode: str, dtype: str) -> None:
        """Keep the weights in `held` (`rollout.dtype`, e.g. bfloat16 where bf16 is native: no per-matmul casts, half
        the bytes per decode step) when it differs from `dtype`, the trainer's. Weight syncs still carry `dtype`;
        `checksum` then answers for what was sent (the initial weights', or the last sync's), as the trainer's does."""
        if held == dtype:
            return
        self._initial = state_checksum(sync_state(self.model))  # what the first syncs' checksum compares with
        self.model.to(getattr(torch, held))
        print(f"raylhf HFEngine: weights held in {held} (rollout.dtype {mode}; the trainer's are {dtype})", flush=True)

    @classmethod
    def from_model(cls, model, tokenizer, sampler: str = "loop") -> HFEngine:
        """An engine around a model already in memory (nothing loaded or copied), for in-process evaluation.
        The tokenizer is switched to left padding; the caller restores it if it pads otherwise."""
        engine = cls.__new__(cls)
        engine._serve(model, tokenizer, str(next(model.parameters()).device), sampler)
        return engine

    def _serve(self, model, tokenizer, device: str, sampler: str) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.tokenizer, self.model = tokenizer, model
        self.tokenizer.padding_side = "left"
        self.device, self.sampler = device, sampler
        self.bf16 = False  # `__init__` sets `rollout.autocast`'s choice
        # Weights held in another dtype than syncs carry (`_hold`): the initial weights' checksum, and the last
        # sync's packed state (kept for `checksum`); None otherwise.
        self._sent: dict | None = None
        self._initial: str | None = None
        # Prefill needs only the last position's logits; not every remote-code model takes the argument.
        self._keep_last = "logits_to_keep" in inspect.signature(hf_model(self.model).forward).parameters
        self._cache_kw = cache_argument(self.model)

    def _pad(self, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        """The prompts' ids left-padded into `input_ids` and `attention_mask`, `[B, P]` each."""
        return self.tokenizer.pad({"input_ids": prompt_ids}, padding=True, return_tensors="pt")

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int,
                 refresh: Callable[[], int | None] | None = None, version: int = 0) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt (its token ids, `actors.modeling.encode_prompts`),
        deterministic for a given seed and batch. `refresh` (partial rollouts, loop sampler only): called at each
        token boundary; it loads newer weights into this engine and returns their version, or returns None.
        `version`: the weights' version at the start (each completion's `versions` say which sampled each token)."""
        with autocast(self.bf16, self.device):  # one context per call: each weight is cast to bf16 once per call
            if self.sampler == "generate":
                return self._generate_hf(prompt_ids, sampling, seed)
            return self._generate_loop(prompt_ids, sampling, seed, refresh, version)

    def _generate_loop(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int,
                       refresh: Callable[[], int | None] | None = None, version: int = 0
                       ) -> list[list[Completion]]:
        """Prefill each prompt once, repeat its cache n times, then decode only the rows still live. Samples
        softmax(logits / T) with top-p only: a checkpoint's other generation defaults (repetition penalty, ...)
        are not applied, as in the vLLM engine's SamplingParams. With `refresh`, see the module's docstring."""
        tok, n = self.tokenizer, sampling.n
        enc = self._pad(prompt_ids)
        mask = enc["attention_mask"].to(self.device)  # [B, P]
        pos = position_ids(mask)  # [B, P]
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=enc["input_ids"].to(self.device), attention_mask=mask, position_ids=pos,
                         use_cache=True, **extra)
        cache = getattr(out, self._cache_kw, None)
        if not (hasattr(cache, "batch_repeat_interleave") and hasattr(cache, "batch_select_indices")):
            return self._generate_hf(prompt_ids, sampling, seed)
        cache.batch_repeat_interleave(n)
        logits = out.logits[:, -1].repeat_interleave(n, dim=0)  # [R, V], R = B*n
        mask, pos = mask.repeat_interleave(n, dim=0), pos[:, -1].repeat_interleave(n, dim=0)  # [R, P], [R]
        rows = logits.shape[0]
        tokens = torch.full((rows, sampling.max_new_tokens), tok.pad_token_id, dtype=torch.long, device=self.device)
        logps = torch.zeros(rows, sampling.max_new_tokens, device=self.device)
        lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        live = torch.arange(rows, device=self.device)  # row index of each row still in the batch
        versions = torch.full((rows, sampling.max_new_tokens), version, dtype=torch.long, device=self.device)  # [R, T]
        prompts = enc["input_ids"].to(self.device).repeat_interleave(n, dim=0) if refresh else None  # [R, P]
        stop = StopOnStrings(tok, sampling.stop, 0) if sampling.stop else None
        eos = -1 if tok.eos_token_id is None else tok.eos_token_id  # -1: no EOS, never sampled
        gen = torch.Generator(device=self.device).manual_seed(seed)
        running = torch.ones(rows, dtype=torch.bool, device=self.device)  # per batch row: still sampling
        for t in range(sampling.max_new_tokens):
            if refresh is not None and t > 0 and (loaded := refresh()) is not None:  # new weights: same sequences
                version = loaded
                cache, logits = self._recompute(prompts[live], tokens[live, :t], mask)
            new, logp = _sample(logits, sampling.temperature, sampling.top_p, gen)  # [r], [r]
            at = live[running]  # the batch's finished rows (kept on a GPU, see `batch_rows`) write nothing
            tokens[at, t], logps[at, t], lengths[at], versions[at, t] = new[running], logp[running], t + 1, version
            done = new == eos
            if stop is not None:
                done |= stop(tokens[live, : t + 1], None)
            if t + 1 == sampling.max_new_tokens or not bool((running & ~done).any()):
                break
            if bool((done & running).any()):
                running &= ~done
                size = batch_rows(int(running.sum()), running.shape[0], self.device)
                if size < running.shape[0]:
                    keep = torch.argsort((~running).to(torch.int8), stable=True)[:size]  # running rows first
                    cache.batch_select_indices(keep)
                    live, new, mask, pos, running = live[keep], new[keep], mask[keep], pos[keep], running[keep]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            pos = pos + 1
            out = self.model(input_ids=new[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True,
                             **{self._cache_kw: cache})
            logits = out.logits[:, -1]
        tokens, logps, lengths = tokens.cpu(), logps.cpu(), lengths.tolist()
        flat = [self._completion(tokens[i, : lengths[i]], logps[i, : lengths[i]], sampling.stop) for i in range(rows)]
        if refresh is not None:
            for i, c in enumerate(flat):
                c.versions = versions[i, : len(c.token_ids)].tolist()
        return [flat[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _recompute(self, prompts: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
        """(KV cache, next-token logits `[r, V]`) of the live rows under the weights now loaded: one forward over
        each row's left-padded prompt `[r, P]` and its tokens so far `[r, t]`, `mask` `[r, P+t]`."""
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=torch.cat([prompts, tokens], dim=1), attention_mask=mask,
                         position_ids=position_ids(mask), use_cache=True, **extra)
        return getattr(out, self._cache_kw), out.logits[:, -1]

    def _generate_hf(self, prompt_ids: list[list[int]], sampling: SamplingParams, seed: int
                     ) -> list[list[Completion]]:
        """The same sampling through Hugging Face `model.generate` on prompts repeated n times."""
        tok = self.tokenizer
        enc = self._pad(prompt_ids)
        input_ids = enc["input_ids"].repeat_interleave(sampling.n, dim=0).to(self.device)  # [B*n, P]
        attention = enc["attention_mask"].repeat_interleave(sampling.n, dim=0).to(self.device)  # [B*n, P]
        greedy = sampling.temperature == 0
        torch.manual_seed(seed)
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # 0 disables a checkpoint's default top-k: sample the full distribution
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            stopping_criteria=[StopOnStrings(tok, sampling.stop, input_ids.shape[1])] if sampling.stop else None,
            output_logits=True,
            return_dict_in_generate=True,
            use_cache=True,
        )
        new = out.sequences[:, input_ids.shape[1] :]  # [B*n, T]
        logits = torch.stack(out.logits, dim=1)  # [B*n, T, V], raw (before temperature / top-p)
        logp = token_logprobs(logits, new, 1.0 if greedy else sampling.temperature)  # [B*n, T]
        flat = [self._completion(new[i], logp[i], sampling.stop) for i in range(new.shape[0])]
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompt_ids))]

    def _completion(self, ids: torch.Tensor, logp: torch.Tensor, stop: tuple[str, ...]) -> Completion:
        tok = self.tokenizer
        ids_list = ids.tolist()
        end, reason = len(ids_list), "length"
        if tok.eos_token_id in ids_list:
            end, reason = ids_list.index(tok.eos_token_id) + 1, "stop"
        # `generate` pads rows finished by a stop string; the cut below drops that tail.
        # A pad token sampled mid-row is an ordinary token: its log-prob is part of the policy.
        if stop:
            end, reason = _cut_at_stop(tok, ids_list, end, reason, stop)
        text = tok.decode(ids_list[:end], skip_special_tokens=True)
        return Completion(ids_list[:end], text, logp[:end].tolist(), reason)

    def load_weights(self, packed: dict, version: int | None = None) -> None:
        """Replace the model's weights in place (under LoRA: its adapters), cast to the dtype they are held in."""
        load_sync_state(self.model, unpack_state_dict(packed))
        if self._initial is not None:
            self._sent = packed  # a reference (object-store views): hashed only if `checksum` is asked

    def checksum(self) -> str:
        """SHA-256 of what weight syncs replace (`actors.lora.sync_state`): the trainer's checksum of the same. With
        the weights held in another dtype (`rollout.dtype`), the checksum of what the last sync sent, or of the
        initial weights before they were cast."""
        if self._initial is None:
            return state_checksum(sync_state(self.model))
        return self._initial if self._sent is None else state_checksum(unpack_state_dict(self._sent))


def batch_rows(running: int, current: int, device: str) -> int:
    """How many rows the decoding batch keeps when `running` of its `current` rows still sample. On a CPU exactly the
    running ones (finished rows would cost compute). On a GPU a power of two (finished rows filling it): every new
    batch shape costs kernel and attention-plan selection (cuDNN's SDPA builds a plan per shape, tens of ms), and
    dropping rows one by one made nearly every token a new shape (the loop ran 7x slower than `generate` on an H200)."""
    if not str(device).startswith("cuda"):
        return running
    return min(current, 1 << max(running - 1, 0).bit_length())


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(token `[r]`, its log-prob `[r]`): greedy at T = 0, else a draw from softmax(logits / T) after
    top-p filtering; the log-prob is of the full distribution at T (1 for greedy), in float32."""
    greedy = temperature == 0
    logp = F.log_softmax(logits.float() / (1.0 if greedy else temperature), dim=-1)  # [r, V]
    if greedy:
        new = logp.argmax(dim=-1)
    else:
        kept = _top_p(logp, top_p) if top_p < 1.0 else logp
        new = torch.multinomial(kept.softmax(dim=-1), 1, generator=gen).squeeze(1)
    return new, logp.gather(-1, new[:, None]).squeeze(1)


def _top_p(logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) all but the smallest set of most likely tokens whose mass reaches `top_p`, at least
    one (Hugging Face's TopPLogitsWarper)."""
    sorted_logp, order = logp.sort(dim=-1)  # ascending
    drop = sorted_logp.exp().cumsum(dim=-1) <= 1 - top_p
    drop[:, -1] = False
    return logp.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def _cut_at_stop(tok, ids: list[int], end: int, reason: str, stop: tuple[str, ...]) -> tuple[int, str]:
    """Shorten to the first token whose prefix text contains a stop string (the stop is kept)."""
    if not any(s in tok.decode(ids[:end], skip_special_tokens=True) for s in stop):
        return end, reason
    k = first_stop_end(tok, ids[:end], stop)
    return (end, reason) if k is None else (k, "stop")


def first_stop_end(tokenizer, ids: list[int], stops: Sequence[str]) -> int | None:
    """The fewest leading tokens of `ids` whose text holds a stop string; None when none does (also what the vLLM
    engine cuts a resumed partial rollout at)."""
    for k in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops):
            return k
    return None


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text ends in a stop string (works for any tokenizer,
    unlike `generate(stop_strings=...)`, which needs a tokenizer that can spell arbitrary text)."""

    def __init__(self, tokenizer, stops: tuple[str, ...], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len
        self.window = max(len(s) for s in stops)  # every token spells at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        tails = input_ids[:, max(self.prompt_len, input_ids.shape[1] - self.window) :].tolist()
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], device=input_ids.device)
