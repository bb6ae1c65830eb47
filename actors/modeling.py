"""Loading a causal LM and scoring the log-probs of response tokens, shared by every actor."""

from __future__ import annotations

import functools
import inspect
import os

import torch
import torch.nn.functional as F

from actors.batch import distinct_rows
from actors.records import TrainBatch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_threads(threads: int | str | None) -> None:
    """Bound torch's intra-op threads (None or "auto": every core this process may use; the pools resolve "auto"
    per actor from the placement first, `orchestrator.threads`). Oversubscribed cores slow tiny ops many times."""
    torch.set_num_threads(threads if isinstance(threads, int) and threads > 0 else len(os.sched_getaffinity(0)))


def load_causal_lm(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"):
    """A Hugging Face causal LM from a checkpoint directory (local path or cluster path)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    return model.to(device)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer; fails clearly when it has no pad token we can use."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocabulary(student, teacher, teacher_path: str) -> None:
    """Tokenizers `student` and `teacher` (at `teacher_path`) map every token to the same id (on-policy
    distillation: the teacher scores the student's token ids); else a ValueError saying so."""
    if student.get_vocab() != teacher.get_vocab():
        raise ValueError(f"{teacher_path!r} has another tokenizer than the policy (vocabularies of "
                         f"{len(teacher.get_vocab())} and {len(student.get_vocab())} tokens, or other ids); the "
                         "teacher scores the policy's token ids, so it needs the same vocabulary")


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt as the engines feed them to the model (special tokens added). The driver
    tokenizes each prompt once, with this, and the ids travel with the request."""
    return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]


def hf_model(model):
    """The Hugging Face model itself, looking through a DeepSpeed engine and a peft (LoRA) wrapper, whose forward
    passes every argument on to it: for reading its forward's signature."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "peft_config") and hasattr(model, "get_base_model") else model


def cache_argument(model) -> str:
    """The name of the KV cache in the model's forward arguments and outputs: `cache` in transformers 5,
    `past_key_values` in 4.x (and in older remote code). A DeepSpeed engine and a LoRA wrapper are looked through."""
    forward = hf_model(model).forward
    return _cache_argument(getattr(forward, "__func__", forward))


@functools.lru_cache(maxsize=None)
def _cache_argument(forward) -> str:
    """`cache_argument` of one forward function: its signature is read once, not on every forward pass."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def cached_forward(model, cache=None, **inputs) -> tuple[torch.Tensor, object]:
    """(logits, KV cache) of a forward that continues `cache` (None: from scratch)."""
    name = cache_argument(model)
    out = model(**inputs, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, out[name]


def response_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int,
                    share_prompts: bool = True) -> torch.Tensor:
    """Logits that predict each response token: `[B, T, V]` (position P-1+t predicts token P+t).

    When the rows repeat prompts (G samples of one prompt) and `share_prompts`, each distinct prompt runs once
    and its KV cache is copied to the rows that continue it: the same logits, and gradients reach the prompt
    through the copies."""
    if share_prompts:
        p = input_ids.shape[1] - response_len
        first, rows = distinct_rows(torch.cat([input_ids[:, :p], attention_mask[:, :p]], 1))  # [U], [B]
        if 2 * first.shape[0] <= input_ids.shape[0]:
            u_ids, u_mask = input_ids[first, :p], attention_mask[first, :p]  # [U, P] each
            logits, cache = cached_forward(model, input_ids=u_ids, attention_mask=u_mask,
                                           position_ids=position_ids(u_mask))
            if hasattr(cache, "batch_select_indices"):
                cache.batch_select_indices(rows)  # [U, ...] -> [B, ...]
                rest, _ = cached_forward(model, cache, input_ids=input_ids[:, p:], attention_mask=attention_mask,
                                         position_ids=position_ids(attention_mask)[:, p:])  # [B, T, V]
                return torch.cat([logits[rows, -1:], rest[:, :-1]], 1)  # [B, T, V]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)
    return out.logits[:, -response_len - 1 : -1, :]  # [B, T, V]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`: `[B, T]` (the sampled policy is logits/T)."""
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    return torch.gather(F.log_softmax(logits, dim=-1), -1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]


def response_logprobs(model, batch: TrainBatch, temperature: float, share_prompts: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs `[B, T]`, logits `[B, T, V]`, both float32) of the response tokens of a collated batch."""
    t = batch.response_mask.shape[1]
    logits = response_logits(model, batch.input_ids, batch.attention_mask, t, share_prompts).float()  # [B, T, V]
    # float32 (a no-op for a float32 model): under bf16 autocast the log-softmax, entropy and losses stay float32
    return token_logprobs(logits, batch.input_ids[:, -t:], temperature), logits


def load_value_model(path: str, dtype: str = "float32", trust_remote_code: bool = False, device: str = "cpu"):
    """A value model: the checkpoint's transformer with a linear head giving one value per token.

    `path` may be a causal LM (the policy: the head starts at zero, so V = 0 everywhere at first) or a
    one-label reward model (its `score` head is kept, so V(s_t) starts as the reward model's score of the
    prefix, minus the `reward_offset` its training stored). Dropout on the head is off: values are regressed.
    """
    from transformers import AutoConfig, AutoModelForTokenClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    config.num_labels, config.classifier_dropout = 1, 0.0
    config.id2label, config.label2id = {0: "value"}, {"value": 0}
    try:
        model, info = AutoModelForTokenClassification.from_pretrained(
            path, config=config, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code, output_loading_info=True)
    except ValueError as e:  # an architecture without a token-classification class
        raise ValueError(f"cannot build a value model from {path!r}: {e}") from None
    with torch.no_grad():
        if any(k.startswith("score.weight") for k in info["missing_keys"]):
            model.score.weight.zero_()
        if model.score.bias is not None:
            model.score.bias.fill_(-float(getattr(model.config, "reward_offset", 0.0) or 0.0))
    return model.to(device)


def response_values(model, batch: TrainBatch) -> torch.Tensor:
    """V(s_t) for every response token t: `[B, T]`, read at position P-1+t, the state before token t is
    chosen (the same position whose logits give token t's log-prob; survey 2.14's V(s_t))."""
    t = batch.response_mask.shape[1]
    am = batch.attention_mask
    out = model(input_ids=batch.input_ids, attention_mask=am, position_ids=position_ids(am), use_cache=False)
    return out.logits[:, -t - 1 : -1, 0].float()  # [B, T]
