"""How a multi-turn context is written in tokens: the first prompt, and each observation appended after a sampled
turn. Each piece is tokenized once, when it is added, and never again (token in, token out): the context is the
concatenation of those ids and the ids the model sampled, whatever re-tokenizing its text would give.

`plain`: the prompt as `encode_prompts` writes it, observations as their bare text. `chat`: the tokenizer's chat
template, the prompt as a user message, each observation as a `tool` message (a `user` one when the template has
no tool role) followed by the assistant header of the next turn; a turn the model ended without its end-of-turn
token (a stop string) gets the template's end-of-turn text first.
"""

from __future__ import annotations

from actors.modeling import encode_prompts

_PROBE = "\u2063probe\u2063"  # assistant text that no template writes by itself, to find where content sits


class TurnFormat:
    """Tokens of the first prompt and of each observation, for one tokenizer and format ("plain" | "chat")."""

    def __init__(self, tokenizer, kind: str = "plain"):
        """`kind`: "plain", "chat", or "auto" (chat when the tokenizer has a chat template)."""
        if kind == "auto":
            kind = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        if kind not in ("plain", "chat"):
            raise ValueError(f"turn format must be plain, chat or auto, got {kind!r}")
        if kind == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("env.format: chat needs a tokenizer with a chat template; use plain")
        self.tokenizer, self.kind = tokenizer, kind
        if kind == "chat":
            self._role = self._observation_role()
            head = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}])
            self._end_of_turn = head[head.index(_PROBE) + len(_PROBE):]  # e.g. "<|im_end|>\n"

    def prompt_ids(self, text: str) -> list[int]:
        """The first prompt's ids."""
        if self.kind == "plain":
            return encode_prompts(self.tokenizer, [text])[0]
        return self.tokenizer(self._render([{"role": "user", "content": text}], generation_prompt=True),
                              add_special_tokens=False)["input_ids"]

    def observation_ids(self, text: str, ended_turn: bool) -> list[int]:
        """The ids appended after a sampled turn: `text` as an observation (and, in chat, the next assistant
        header). `ended_turn`: the model's turn closed with its EOS token (in chat, the start of end-of-turn)."""
        if self.kind == "plain":
            return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        before = [{"role": "user", "content": "q"}, {"role": "assistant", "content": _PROBE}]
        head = self._render(before)
        full = self._render(before + [{"role": self._role, "content": text}], generation_prompt=True)
        if not full.startswith(head):
            raise ValueError("the chat template rewrites earlier turns when a message is added; token-in/token-out "
                             "multi-turn needs a template that only appends (or env.format: plain)")
        close = self._end_of_turn
        eos = self.tokenizer.eos_token or ""
        if ended_turn:  # the sampled EOS is the start of the end-of-turn text (or all of it)
            close = close[len(eos):] if eos and close.startswith(eos) else ""
        return self.tokenizer(close + full[len(head):], add_special_tokens=False)["input_ids"]

    def _render(self, messages: list[dict], generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _observation_role(self) -> str:
        """"tool" when the template writes a tool message after an assistant one, else "user"."""
        try:
            text = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                 {"role": "tool", "content": _PROBE}])
            return "tool" if _PROBE in text else "user"
        except Exception:
            return "user"
