"""`raylhf train-dpo`: offline Direct Preference Optimization (survey 3.4, eq. 3.8).

The policy π_θ starts from a checkpoint; a frozen copy of that checkpoint is the reference π_ref. For each
pair (x, y_w, y_l), log π(y|x) is the sum of the log-probs of the response tokens (and the EOS that ends
them, `append_eos`); the loss is −log σ(β[(log π_θ(y_w) − log π_ref(y_w)) − (log π_θ(y_l) − log π_ref(y_l))]),
`algorithms.losses.dpo_loss`. The reference log-probs never change, so they are computed once, up front.
Reported: the implicit-reward preference accuracy and margin β·log(π/π_ref) (survey 3.4.2) on held-out
pairs, and held-out greedy accuracy under a rule verifier before and after training.
"""

from __future__ import annotations

import functools
import math
import sys
import time

import torch

from actors.evaluation import greedy_eval, greedy_sampling, in_process, requests_from_rows
from actors.modeling import load_causal_lm, load_tokenizer, set_threads, token_logprobs
from algorithms.losses import dpo_loss
from orchestrator.offline.common import (StepProgress, batch_indices, chunks, finish, load_job, make_optimizer,
                                         say)
from orchestrator.offline.config import DPOConfig, GreedyEvalConfig
from orchestrator.offline.preferences import PreferenceError, encode_responses
from orchestrator.references import prepare_model

_say = functools.partial(say, "train-dpo")  # a progress line of this command


def sequence_logprobs(model, tokenizer, pairs: list[tuple[str, str]], max_length: int,
                      append_eos: bool) -> torch.Tensor:
    """log π(response | prompt) [N]: the response tokens' log-probs summed (gradients flow when enabled)."""
    b = encode_responses(tokenizer, pairs, max_length, append_eos)  # [N, L] each
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits  # [N, L, V]
    logp = token_logprobs(logits[:, :-1], b.input_ids[:, 1:])  # [N, L-1]: position t predicts token t+1
    return (logp * b.response_mask[:, 1:]).sum(-1)  # [N]


@torch.no_grad()
def pair_logprobs(model, tokenizer, rows: list[dict], max_length: int, append_eos: bool,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(chosen) [N], log π(rejected) [N]) of every row, without gradients."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for s in chunks(len(rows), batch_size):
        part = rows[s]
        logp = sequence_logprobs(model, tokenizer, [(r["prompt"], r["chosen"]) for r in part]
                                 + [(r["prompt"], r["rejected"]) for r in part], max_length, append_eos)  # [2n]
        chosen.append(logp[: len(part)])
        rejected.append(logp[len(part) :])
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def preference_metrics(model, tokenizer, rows: list[dict], ref: tuple[torch.Tensor, torch.Tensor],
                       cfg: DPOConfig) -> dict[str, float]:
    """DPO loss and implicit-reward stats (accuracy, margin, chosen and rejected rewards) of `rows`."""
    chosen, rejected = pair_logprobs(model, tokenizer, rows, cfg.data.max_length, cfg.append_eos,
                                     cfg.trainer.eval_batch_size)
    loss, stats = dpo_loss(chosen, rejected, ref[0], ref[1], cfg.beta)
    return {"loss": loss.item(), **{k: v.item() for k, v in stats.items()}}


ABOVE_ZERO = math.ulp(0.0)  # the smallest positive float: a score reaches it exactly when it is > 0


def greedy_accuracy(model, tokenizer, rows: list[dict], cfg: GreedyEvalConfig) -> float:
    """Fraction of rows whose greedy completion the rule verifier scores above 0 (actors.evaluation)."""
    from rewards.loader import load_function

    run_groups = in_process(model, tokenizer, [("verifier", load_function(cfg.reward), 1.0)], cfg.batch_size)
    requests = requests_from_rows(rows, tokenizer, cfg.prompt_key)
    return greedy_eval(run_groups, requests, greedy_sampling(cfg.max_new_tokens), ABOVE_ZERO)["accuracy"]


def load_eval_prompts(cfg: GreedyEvalConfig) -> list[dict]:
    """The first `size` held-out problems; each must carry a non-empty string prompt."""
    from orchestrator.data import load_rows

    rows = load_rows(cfg.prompts)[: cfg.size]
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get(cfg.prompt_key), str) or not row[cfg.prompt_key]:
            raise PreferenceError(f"eval.prompts ({cfg.prompts.source}): row {i} has no non-empty string "
                                  f"{cfg.prompt_key!r}")
    if not rows:
        raise PreferenceError(f"eval.prompts ({cfg.prompts.source}): no rows")
    return rows


def train_dpo(cfg: DPOConfig, train_rows: list[dict], eval_rows: list[dict] | None,
              eval_prompts: list[dict] | None) -> dict:
    """Train the policy with DPO, evaluate before and after, save it; returns the summary (also training.json)."""
    start = time.time()
    set_threads(cfg.trainer.threads)
    torch.manual_seed(cfg.trainer.seed)
    path = prepare_model(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model.trust_remote_code)
    tokenizer.padding_side = "right"
    reference = load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code).eval().requires_grad_(False)
    length, eos, bs = cfg.data.max_length, cfg.append_eos, cfg.trainer.eval_batch_size
    ref_train = pair_logprobs(reference, tokenizer, train_rows, length, eos, bs)  # ([N], [N]) fixed for the run
    ref_eval = pair_logprobs(reference, tokenizer, eval_rows, length, eos, bs) if eval_rows else None
    del reference
    policy = load_causal_lm(path, cfg.model.dtype, cfg.model.trust_remote_code)
    summary: dict = {"start_model": path, "beta": cfg.beta, "train_rows": len(train_rows)}
    if eval_prompts:
        summary["greedy_accuracy_before"] = greedy_accuracy(policy, tokenizer, eval_prompts, cfg.eval)
        _say(f"held-out greedy accuracy before training: {summary['greedy_accuracy_before']:.1%} "
             f"({len(eval_prompts)} problems)")
    if eval_rows:
        summary["eval_before"] = preference_metrics(policy, tokenizer, eval_rows, ref_eval, cfg)

    steps = batch_indices(len(train_rows), cfg.trainer)
    opt, schedule = make_optimizer(policy.parameters(), cfg.trainer, len(steps))
    progress = StepProgress(len(steps), "train-dpo", cfg.logging)
    policy.train()
    smooth: dict[str, float] = {}
    for step, idx in enumerate(steps, 1):
        rows = [train_rows[i] for i in idx]
        logp = sequence_logprobs(policy, tokenizer, [(r["prompt"], r["chosen"]) for r in rows]
                                 + [(r["prompt"], r["rejected"]) for r in rows], length, eos)  # [2B]
        index = torch.tensor(idx)  # [B]
        loss, stats = dpo_loss(logp[: len(rows)], logp[len(rows) :], ref_train[0][index], ref_train[1][index], cfg.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.trainer.grad_clip)
        opt.step()
        schedule.step()
        if step == 1:
            summary["first_loss"] = loss.item()  # log 2 when the policy still equals the reference
        now = {"loss": loss.item(), "acc": stats["reward_accuracy"].item(), "margin": stats["reward_margin"].item()}
        smooth = now if not smooth else {k: 0.95 * smooth[k] + 0.05 * v for k, v in now.items()}
        progress.step(step, {**smooth, "lr": schedule.get_last_lr()[0]})
    progress.close()
    summary.update(steps=len(steps), train_loss=smooth.get("loss"), train_reward_accuracy=smooth.get("acc"))
    if eval_rows:
        summary["eval_after"] = preference_metrics(policy, tokenizer, eval_rows, ref_eval, cfg)
    if eval_prompts:
        summary["greedy_accuracy_after"] = greedy_accuracy(policy, tokenizer, eval_prompts, cfg.eval)
    return finish(policy, tokenizer, cfg.output_dir, summary, start)


def main(config: str, overrides: list[str]) -> int:
    """The `raylhf train-dpo CONFIG [--set ...]` command; 2 on a bad config or bad data, before training."""
    job = load_job(DPOConfig, config, overrides, "pairs")
    if job == 2:
        return 2
    cfg, train_rows, eval_rows = job
    try:
        eval_prompts = load_eval_prompts(cfg.eval) if cfg.eval else None
    except PreferenceError as e:
        print(f"raylhf: data error: {e}", file=sys.stderr)
        return 2
    _say(f"{len(train_rows)} training pairs, {len(eval_rows or [])} held-out pairs, beta {cfg.beta}")
    s = train_dpo(cfg, train_rows, eval_rows, eval_prompts)
    print("\n== summary ==")
    if eval_prompts:
        before, after = s["greedy_accuracy_before"], s["greedy_accuracy_after"]
        print(f"held-out greedy accuracy: {before:.1%} -> {after:.1%} ({(after - before) * 100:+.1f} points, "
              f"{len(eval_prompts)} problems)")
    if eval_rows:
        b, a = s["eval_before"], s["eval_after"]
        print(f"held-out preference accuracy (implicit reward; at the start every margin is 0, a tie counted wrong): "
              f"{b['reward_accuracy']:.1%} -> {a['reward_accuracy']:.1%}; "
              f"reward margin {b['reward_margin']:+.3f} -> {a['reward_margin']:+.3f}; "
              f"DPO loss {b['loss']:.4f} -> {a['loss']:.4f} (log 2 = {math.log(2):.4f})")
    print(f"training loss: {s['first_loss']:.4f} at step 1 -> {s['train_loss']:.4f} (smoothed) "
          f"after {s['steps']} steps")
    print(f"wall time: {s['seconds']:.0f} s")
    print(f"policy (Hugging Face): {s['output_dir']}")
    return 0
