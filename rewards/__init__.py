"""Reward functions `fn(prompt, completion, **row_fields) -> float | {"score": float, ...}` and their loader.

Built-in verifiers, named in config as "rewards.<module>:<function>": final_answer:hash_answer,
math_equiv:math_equiv, format:think_answer_format, length:dapo_overlong_penalty, countdown:countdown,
code_sandbox:code_tests. Nothing is imported here, so one verifier never loads another's dependencies.
"""
