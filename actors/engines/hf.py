"""Hugging Face `generate` engine: batched sampling with KV cache, G samples per prompt, EOS and
stop strings, returning each sampled token's log-prob under logits / temperature."""

from __future__ import annotations

import torch
from transformers import StoppingCriteria

from actors.engines import Completion, SamplingParams
from actors.modeling import load_causal_lm, load_tokenizer, token_logprobs
from actors.weights import load_packed, weights_checksum


class HFEngine:
    """Holds one model and its tokenizer; `generate` takes prompt strings and returns completions."""

    def __init__(self, model_path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"):
        self.tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.tokenizer.padding_side = "left"
        self.model = load_causal_lm(model_path, dtype, trust_remote_code, device).eval()
        self.device = device

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt as the engine feeds them to the model."""
        return [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]

    @torch.no_grad()
    def generate(self, prompts: list[str], sampling: SamplingParams, seed: int) -> list[list[Completion]]:
        """`sampling.n` completions for each prompt, deterministic for a given seed and batch."""
        tok = self.tokenizer
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True)
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
        return [flat[i * sampling.n : (i + 1) * sampling.n] for i in range(len(prompts))]

    def _completion(self, ids: torch.Tensor, logp: torch.Tensor, stop: tuple[str, ...]) -> Completion:
        tok = self.tokenizer
        ids_list = ids.tolist()
        end, reason = len(ids_list), "length"
        if tok.eos_token_id in ids_list:
            end, reason = ids_list.index(tok.eos_token_id) + 1, "stop"
        # Rows finished by a stop string are padded by `generate`; the cut below drops that tail.
        # A pad token sampled mid-row is an ordinary token: its log-prob is part of the policy.
        if stop:
            end, reason = _cut_at_stop(tok, ids_list, end, reason, stop)
        text = tok.decode(ids_list[:end], skip_special_tokens=True)
        return Completion(ids_list[:end], text, logp[:end].tolist(), reason)

    def load_weights(self, packed: dict) -> None:
        """Replace the model's weights in place."""
        load_packed(self.model, packed)

    def checksum(self) -> str:
        return weights_checksum(self.model)


def _cut_at_stop(tok, ids: list[int], end: int, reason: str, stop: tuple[str, ...]) -> tuple[int, str]:
    """Shorten to the first token whose prefix text contains a stop string (the stop is kept)."""
    if not any(s in tok.decode(ids[:end], skip_special_tokens=True) for s in stop):
        return end, reason
    for k in range(1, end + 1):
        if any(s in tok.decode(ids[:k], skip_special_tokens=True) for s in stop):
            return k, "stop"
    return end, reason


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
