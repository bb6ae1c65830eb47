"""Reward functions `fn(prompt, completion, **row_fields) -> float | {"score": float, ...}` and their loader.

A batched form takes lists (`batched: true` in the config, or `fn.batched = True`) and `async def` functions
are awaited; `actors/reward.py` runs every form in a process pool with a per-call timeout.

Built-in verifiers, named in config as "rewards.<module>:<function>": final_answer:hash_answer,
math_equiv:math_equiv, format:think_answer_format, length:dapo_overlong_penalty, countdown:countdown,
code_sandbox:code_tests. Nothing is imported here, so one verifier never loads another's dependencies.
"""
