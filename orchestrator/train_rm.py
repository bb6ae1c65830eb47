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
"""

from __future__ import annotations

import math
import sys
import time

import torch

from actors.modeling import load_tokenizer, set_threads
from algorithms.losses import kwise_reward_model_loss, reward_model_loss
from orchestrator.offline import (StepProgress, batch_indices, chunks, load_job, make_optimizer, prepare_model,
                                  save_atomically)
from orchestrator.preference_config import RewardModelConfig
from orchestrator.preferences import Form, response_texts

OFFSET_KEY = "reward_offset"  # config field RewardModelWorker subtracts from every score


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

    texts = [p + r for p, r in response_texts(train_rows, form)]
    ids = scorer.encode(texts)
    sizes = row_groups(train_rows, form)
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0).tolist()
    steps = batch_indices(len(train_rows), cfg.trainer)
    opt, schedule = make_optimizer(model.parameters(), cfg.trainer, len(steps))
    progress = StepProgress(len(steps), "train-rm", cfg.logging)
    model.train()
    running_loss = running_acc = None
    for step, rows in enumerate(steps, 1):
        batch_ids = [ids[starts[i] + j] for i in rows for j in range(sizes[i])]
        batch_sizes = [sizes[i] for i in rows]
        scores = scorer.forward(model, batch_ids)  # [sum K]
        loss = preference_loss(scores, batch_sizes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        opt.step()
        schedule.step()
        acc = ranking_accuracy(scores.detach(), batch_sizes)
        running_loss = loss.item() if running_loss is None else 0.95 * running_loss + 0.05 * loss.item()
        running_acc = acc if running_acc is None else 0.95 * running_acc + 0.05 * acc
        progress.step(step, {"loss": running_loss, "acc": running_acc, "lr": schedule.get_last_lr()[0]})
    progress.close()
    summary.update(steps=len(steps), train_loss=running_loss, train_accuracy=running_acc)
    if eval_rows:
        summary["eval_accuracy_after"] = heldout_accuracy(model, scorer, eval_rows, form, bs)

    # Survey 3.2.2 / 3.3.1: shift rewards to mean 0 over the training responses (each distinct text once).
    distinct = list(dict.fromkeys(texts))
    offset = float(scorer.scores(model, distinct, bs).mean()) if cfg.normalize else 0.0
    setattr(model.config, OFFSET_KEY, offset)
    summary.update(reward_offset=offset, seconds=round(time.time() - start, 1))
    summary["output_dir"] = save_atomically(model, tokenizer, cfg.output_dir, summary)
    return summary


def _say(text: str) -> None:
    print(f"[train-rm] {text}", file=sys.stderr, flush=True)


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
