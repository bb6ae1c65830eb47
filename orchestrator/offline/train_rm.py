"""`raylhf train-rm`: train a reward model r_θ(x, y) on preference data.

The reward model is the starting causal LM with its LM head replaced by a one-output `score` head
(`AutoModelForSequenceClassification`, num_labels=1): the score of prompt + response is read at the
last real token, exactly as `actors.reward_model.RewardModelWorker` reads it later. The loss is either
the pairwise Bradley-Terry loss −log σ(r(x, y_w) − r(x, y_l)) (survey 3.2.1, eq. 3.1) or InstructGPT's
K-wise form, the mean of that loss over all K(K−1)/2 pairs of one prompt's ranking (survey 3.3.1).
After training, the scores are shifted to mean 0 over the training responses (survey 3.2.2 and 3.3.1:
"normalize ... to a mean score of 0"); Llama's score head has no bias, so the shift is stored as
`reward_offset` in the saved config and subtracted by RewardModelWorker. Optional `head_layers` stack fresh
decoder layers (identity at init) under the score head; the checkpoint stays one sequence classifier.

Optional `lm_coef` > 0 adds an auxiliary next-token loss on each row's preferred response (the chosen one, or
the best of a ranking), through the starting model's LM head on the same final hidden states the score head
reads: the backbone keeps modelling, and gets better at, the answers the preferences favour (the SFT
regulariser of Yang et al. 2024, "Regularizing Hidden States Enables Learning Generalizable Reward Models"; in
the spirit of InstructGPT's pretraining-mix term, survey 3.3.2). The LM head is used in training only; the
saved checkpoint is the same one-output sequence classifier.
"""

from __future__ import annotations

import functools
import math
import time

import torch

from actors.modeling import load_tokenizer, set_threads, token_logprobs
from algorithms.losses import kwise_reward_model_loss, reward_model_loss
from orchestrator.offline.common import (StepProgress, batch_indices, chunks, finish, load_job, make_optimizer,
                                         say)
from orchestrator.offline.config import RewardModelConfig
from orchestrator.offline.preferences import Form, response_texts
from orchestrator.references import prepare_model

OFFSET_KEY = "reward_offset"  # config field RewardModelWorker subtracts from every score

_say = functools.partial(say, "train-rm")  # a progress line of this command


def load_reward_model(path: str, seed: int, head_layers: int = 0, trust_remote_code: bool = False):
    """A one-output sequence classifier from the checkpoint at `path` (a causal LM or a reward model).

    From a causal LM, transformers 5.x loads the backbone, drops the LM head and reports `score.weight`
    missing, initialised from the global RNG with std = initializer_range (0.02: scores near 0, so the
    first steps barely move the backbone). We re-initialise it, seeded, with std 1/sqrt(hidden + 1), the
    reward-head init of Ziegler et al.'s lm-human-preferences: initial scores O(1), random in sign.

    `head_layers` > 0 appends that many fresh decoder layers (same config) to the backbone; their attention
    and MLP output projections start at zero, so at init they pass the residual stream through unchanged.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, num_labels=1)
    start_layers = getattr(config, "num_hidden_layers", None)
    if head_layers:
        if start_layers is None or getattr(config, "layer_types", None) is not None:
            raise ValueError(f"head_layers: {path!r} is not a plain stack of num_hidden_layers decoder layers")
        config.num_hidden_layers = start_layers + head_layers
    torch.manual_seed(seed)  # the newly initialised weights, before we overwrite them below
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized: score.weight" report is expected here
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    new = set(info["missing_keys"])
    head = getattr(model, "score", None)
    expected = {f"score.{n}" for n, _ in head.named_parameters()} if head is not None else set()
    added = _added_layers(model, start_layers, head_layers) if head_layers else []
    expected |= {k for k in new if any(k.startswith(prefix) for prefix, _ in added)}
    if head is None or new - expected:
        raise ValueError(f"{path!r}: cannot build a reward model from it "
                         f"(missing weights {sorted(new - expected)[:4]})")
    with torch.no_grad():
        for prefix, layer in added:
            outputs = [m for n, m in layer.named_modules() if n.endswith(("o_proj", "down_proj"))]
            if len(outputs) != 2 or any(f"{prefix}.{n}" not in new for n, _ in layer.named_parameters()):
                raise ValueError(f"head_layers: expected new Llama-style layers (o_proj, down_proj) at {prefix}")
            for m in outputs:  # residual branches output 0: the new layer is the identity at init
                m.weight.zero_()
        if new & {f"score.{n}" for n, _ in head.named_parameters()}:
            gen = torch.Generator().manual_seed(seed)
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(head.weight.shape[1] + 1))
            if getattr(head, "bias", None) is not None:
                head.bias.zero_()
    return model


def _added_layers(model, start: int, count: int) -> list[tuple[str, torch.nn.Module]]:
    """(state-dict prefix, module) of the decoder layers appended by `head_layers`."""
    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) != start + count:
        raise ValueError("head_layers: the model has no `layers` list of decoder layers")
    return [(f"{model.base_model_prefix}.layers.{i}", layers[i]) for i in range(start, start + count)]


class LMHead(torch.nn.Module):
    """Next-token logits from the reward model's final hidden states, for the auxiliary loss of `lm_coef`.

    With tied word embeddings the head is the reward model's own input embedding matrix (so the loss trains
    the weights that are saved); otherwise the starting causal LM's output projection is loaded beside the
    reward model, trained with it and dropped at save time."""

    def __init__(self, model, path: str, trust_remote_code: bool = False):
        super().__init__()
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        if self.tied:
            self.embed = [model.get_input_embeddings()]  # a list: not registered twice as a submodule
            self.proj = None
        else:
            from transformers import AutoModelForCausalLM

            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=trust_remote_code)
            out = lm.get_output_embeddings()
            if out is None:
                raise ValueError(f"lm_coef: {path!r} has no LM head to train the auxiliary next-token loss with")
            self.proj = out
            del lm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, L, H] -> logits [N, L, V]."""
        if self.tied:
            return hidden @ self.embed[0].weight.T
        return self.proj(hidden)


def response_nll(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Mean over response tokens of −log p(token | prefix): logits [N, L, V] at each position predict the next
    token; response_mask [N, L] marks the tokens to predict (never position 0)."""
    token_logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])  # [N, L-1]
    mask = response_mask[:, 1:].float()  # [N, L-1]
    return -(token_logp * mask).sum() / mask.sum().clamp(min=1)


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask, both [N, L]."""
    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])  # [N, L]
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])  # [N, L]
    return ids, mask


class TextScorer:
    """Tokenizes prompt + response the way RewardModelWorker does (one string, special tokens, right padding,
    over-long texts cut on the left) and returns the model's score per text."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length
        tokenizer.padding_side, tokenizer.truncation_side = "right", "left"

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]

    def response_lengths(self, pairs: list[tuple[str, str]], ids: list[list[int]]) -> list[int]:
        """Tokens of each (prompt, response) text that belong to the response: the whole text's token count
        minus the prompt's, at most the (left-truncated) encoded length less one. A BPE merge across the
        boundary may move it by a token; that only matters to the auxiliary LM loss."""
        full = self.tokenizer([p + r for p, r in pairs])["input_ids"]
        prompt = self.tokenizer([p for p, _ in pairs])["input_ids"]
        return [max(0, min(len(f) - len(q), len(i) - 1)) for f, q, i in zip(full, prompt, ids)]

    def forward_with_lm(self, model, lm_head: LMHead, ids: list[list[int]], response_len: list[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [N], next-token NLL of the texts' last `response_len` tokens, averaged over those tokens).

        The score is the score head at the last real token, as the sequence classifier pools it with right
        padding; the logits come from the same final hidden states."""
        input_ids, mask = _pad(ids, self.tokenizer.pad_token_id)  # [N, L]
        hidden = model.base_model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [N, L, H]
        last = mask.sum(1) - 1  # [N] index of the last real token
        scores = model.score(hidden[torch.arange(len(ids)), last])[:, 0]  # [N]
        positions = torch.arange(input_ids.shape[1])[None, :]  # [1, L]
        starts = (last + 1 - torch.tensor(response_len))[:, None]  # [N, 1] first response token
        response = (positions >= starts) & mask.bool()  # [N, L]
        keep = torch.tensor(response_len) > 0  # rows with a response to predict
        nll = response_nll(lm_head(hidden[keep]), input_ids[keep], response[keep])
        return scores, nll

    def forward(self, model, ids: list[list[int]]) -> torch.Tensor:
        """Scores [N] of token-id lists (gradients flow when enabled)."""
        input_ids, mask = _pad(ids, self.tokenizer.pad_token_id)  # [N, L]
        return model(input_ids=input_ids, attention_mask=mask).logits[:, 0]  # [N]

    @torch.no_grad()
    def scores(self, model, texts: list[str], batch_size: int) -> torch.Tensor:
        """Scores [N] of texts, in order, without gradients."""
        was_training = model.training
        model.eval()
        ids = self.encode(texts)
        out = torch.cat([self.forward(model, ids[s]) for s in chunks(len(ids), batch_size)]) if ids else torch.zeros(0)
        model.train(was_training)
        return out.float()  # [N]


def row_groups(rows: list[dict], form: Form) -> list[int]:
    """Responses per row, in `response_texts` order: 2 per pair, K per ranking."""
    return [2] * len(rows) if form == "pairs" else [len(r["responses"]) for r in rows]


def preference_loss(scores: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Mean over rows of each row's mean −log σ(s_i − s_j) over its ranked pairs i < j (survey 3.1, 3.3.1).

    scores [sum(sizes)] hold each row's responses, best first. Rows of equal K share one
    `kwise_reward_model_loss` call; with K = 2 for every row this is `reward_model_loss` (eq. 3.1)."""
    if all(k == 2 for k in sizes):
        pairs = scores.view(-1, 2)  # [B, 2]
        return reward_model_loss(pairs[:, 0], pairs[:, 1])
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
    total = scores.new_zeros(())
    for k in sorted(set(sizes)):
        idx = [torch.arange(s, s + k) for s, n in zip(starts, sizes) if n == k]
        block = scores[torch.stack(idx)]  # [n_k, K]
        total = total + kwise_reward_model_loss(block) * len(idx)
    return total / len(sizes)


def ranking_accuracy(scores: torch.Tensor, sizes: list[int]) -> float:
    """Fraction of ranked pairs (i better than j) the scores order correctly; ties count as wrong."""
    right = total = 0
    lo = 0
    for k in sizes:
        s = scores[lo : lo + k]  # [K], best first
        better, worse = torch.triu_indices(k, k, offset=1)
        right += int((s[better] > s[worse]).sum())
        total += len(better)
        lo += k
    return right / max(total, 1)


def heldout_accuracy(model, scorer: TextScorer, rows: list[dict], form: Form, batch_size: int) -> float:
    """Pairwise accuracy of the reward model on rows it was not trained on."""
    texts = [p + r for p, r in response_texts(rows, form)]
    return ranking_accuracy(scorer.scores(model, texts, batch_size), row_groups(rows, form))


def train_reward_model(cfg: RewardModelConfig, train_rows: list[dict], eval_rows: list[dict] | None) -> dict:
    """Train, normalise and save the reward model; returns the summary (also saved as training.json)."""
    start = time.time()
    set_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    path = prepare_model(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    model = load_reward_model(path, cfg.trainer.seed, cfg.head_layers, cfg.model.trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # the model finds the last real token by it
    limit = getattr(model.config, "max_position_embeddings", None) or cfg.data.max_length
    scorer = TextScorer(tokenizer, min(cfg.data.max_length, limit, tokenizer.model_max_length))
    form, bs = cfg.form, cfg.trainer.eval_batch_size
    summary: dict = {"start_model": path, "loss": cfg.loss, "train_rows": len(train_rows)}
    if eval_rows:
        summary["eval_rows"] = len(eval_rows)
        summary["eval_accuracy_before"] = heldout_accuracy(model, scorer, eval_rows, form, bs)
        _say(f"held-out pairwise accuracy before training: {summary['eval_accuracy_before']:.1%} "
             f"({len(eval_rows)} rows)")

    pairs = response_texts(train_rows, form)
    texts = [p + r for p, r in pairs]
    ids = scorer.encode(texts)
    sizes = row_groups(train_rows, form)
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
    steps = batch_indices(len(train_rows), cfg.trainer)
    lm_head = LMHead(model, path, cfg.model.trust_remote_code) if cfg.lm_coef else None
    if lm_head is not None:  # response tokens of each row's preferred response (listed first)
        best_len = scorer.response_lengths([pairs[j] for j in starts], [ids[j] for j in starts])
    params = list(model.parameters()) + (list(lm_head.parameters()) if lm_head is not None else [])
    opt, schedule = make_optimizer(params, cfg.trainer, len(steps))
    progress = StepProgress(len(steps), "train-rm", cfg.logging)
    model.train()
    running_loss = running_acc = running_lm = None
    for step, rows in enumerate(steps, 1):
        batch_ids = [ids[starts[i] + j] for i in rows for j in range(sizes[i])]
        batch_sizes = [sizes[i] for i in rows]
        numbers = {}
        if lm_head is None:
            scores = scorer.forward(model, batch_ids)  # [sum K]
            loss = ranking_loss = preference_loss(scores, batch_sizes)
        else:  # one forward gives both losses; the LM loss reads each row's first (preferred) response
            lengths = [best_len[i] if j == 0 else 0 for i in rows for j in range(sizes[i])]
            scores, nll = scorer.forward_with_lm(model, lm_head, batch_ids, lengths)  # [sum K], []
            ranking_loss = preference_loss(scores, batch_sizes)
            loss = ranking_loss + cfg.lm_coef * nll
            running_lm = nll.item() if running_lm is None else 0.95 * running_lm + 0.05 * nll.item()
            summary.setdefault("lm_nll_first", nll.item())
            numbers["lm_nll"] = running_lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.trainer.grad_clip)
        opt.step()
        schedule.step()
        acc = ranking_accuracy(scores.detach(), batch_sizes)
        value = ranking_loss.item()
        running_loss = value if running_loss is None else 0.95 * running_loss + 0.05 * value
        running_acc = acc if running_acc is None else 0.95 * running_acc + 0.05 * acc
        progress.step(step, {"loss": running_loss, "acc": running_acc, **numbers, "lr": schedule.get_last_lr()[0]})
    progress.close()
    summary.update(steps=len(steps), train_loss=running_loss, train_accuracy=running_acc)
    if running_lm is not None:
        summary["lm_nll"] = running_lm  # smoothed, last step; lm_nll_first is the first step's
    if eval_rows:
        summary["eval_accuracy_after"] = heldout_accuracy(model, scorer, eval_rows, form, bs)

    # Survey 3.2.2 / 3.3.1: shift rewards to mean 0 over the training responses (each distinct text once).
    distinct = list(dict.fromkeys(texts))
    offset = float(scorer.scores(model, distinct, bs).mean()) if cfg.normalize else 0.0
    setattr(model.config, OFFSET_KEY, offset)
    summary["reward_offset"] = offset
    return finish(model, tokenizer, cfg.output_dir, summary, start)


def main(config: str, overrides: list[str]) -> int:
    """The `raylhf train-rm CONFIG [--set ...]` command; 2 on a bad config or bad data, before training."""
    job = load_job(RewardModelConfig, config, overrides, "")
    if job == 2:
        return 2
    cfg, train_rows, eval_rows = job
    _say(f"{len(train_rows)} training rows ({cfg.form}), {len(eval_rows or [])} held-out rows, loss {cfg.loss}")
    s = train_reward_model(cfg, train_rows, eval_rows)
    print("\n== summary ==")
    if eval_rows:
        print(f"held-out pairwise accuracy: {s['eval_accuracy_before']:.1%} -> {s['eval_accuracy_after']:.1%} "
              f"({s['eval_rows']} rows)")
    print(f"training loss (smoothed, last step): {s['train_loss']:.4f} over {s['steps']} steps")
    print(f"reward offset (mean training score, subtracted by RewardModelWorker): {s['reward_offset']:+.4f}")
    print(f"wall time: {s['seconds']:.0f} s")
    print(f"reward model (Hugging Face): {s['output_dir']}")
    return 0
