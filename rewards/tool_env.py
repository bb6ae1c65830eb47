"""ToolEnv: the environment behind `env.tools`. The model calls a tool by writing `<name>argument</name>` (the
closing tag is a stop string, so the turn ends there); the tool's result comes back as the observation
`result_template.format(result)`; a turn without a call ends the episode. Tool rewards are 0: the rule rewards of
`reward.functions` judge the final transcript. `metrics` counts tool calls and failed ones (`env/tool_calls`,
`env/tool_failures`)."""

from __future__ import annotations

import re

from rewards.loader import load_function

RESULT_TEMPLATE = "<result>{}</result>"


def tool_name(spec: str) -> str:
    """The name a tool is called by: its function's name ("rewards.tools:calculator" -> "calculator")."""
    return spec.rpartition(":")[2]


def stop_strings(tools: list[str]) -> list[str]:
    """The closing tag of each tool: a turn stops right after the model closes a call."""
    return [f"</{tool_name(t)}>" for t in tools]


class ToolEnv:
    """One trajectory's tools. `tools`: "module:function" or "file.py:function" names (each `fn(str) -> str`);
    `prompt_key`: the row field that is the first prompt; `max_result_chars`: a longer result is cut."""

    def __init__(self, tools: list[str], prompt_key: str = "prompt", result_template: str = RESULT_TEMPLATE,
                 max_result_chars: int = 1000):
        self.tools = {tool_name(t): load_function(t) for t in tools}
        self.prompt_key, self.template, self.max_chars = prompt_key, result_template, max_result_chars
        names = "|".join(re.escape(n) for n in self.tools)
        self.call = re.compile(rf"<({names})>(.*?)</\1>\s*$", re.DOTALL)
        self.metrics = {"tool_calls": 0, "tool_failures": 0}

    def reset(self, row: dict) -> str:
        return row[self.prompt_key]

    def step(self, action: str) -> tuple[str | None, float, bool]:
        match = self.call.search(action)
        if match is None:
            return None, 0.0, True
        self.metrics["tool_calls"] += 1
        try:
            result = str(self.tools[match.group(1)](match.group(2)))
        except Exception as e:  # the model sees its call fail and may try again
            self.metrics["tool_failures"] += 1
            result = f"error: {type(e).__name__}: {e}"
        return self.template.format(result[: self.max_chars]), 0.0, False
