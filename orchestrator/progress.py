"""A progress bar per step showing reward and accuracy; plain lines when not on a terminal."""

from __future__ import annotations

import sys

from orchestrator.metrics import sample_excerpt


class Progress:
    """The bar, messages above it, and one prompt's completions every `samples_every` steps (0: never)."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "train", samples_every: int = 0):
        self.enabled, self.samples_every = enabled, samples_every
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr,
                            mininterval=0 if not sys.stderr.isatty() else 0.1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def skip_to(self, step: int) -> None:
        """A resumed run starts its bar at the step it continues from."""
        if self.bar is not None and step:
            self.bar.update(step)

    def step(self, step: int, m: dict[str, float], samples: list[dict] = ()) -> None:
        """The bar moves on with the step's numbers; `samples`: its `orchestrator.metrics.sample_records`."""
        if self.samples_every and step % self.samples_every == 0 and samples:
            self.note(sample_excerpt(step, samples))
        if self.bar is None:
            return
        post = {"reward": f"{m['reward/mean']:.3f}", "acc": f"{m['accuracy']:.2f}",
                "len": f"{m['response_length/mean']:.1f}", "s/step": f"{m['time/step']:.2f}"}
        if "eval/accuracy" in m:
            post["eval_acc"] = f"{m['eval/accuracy']:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
