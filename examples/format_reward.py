"""A format reward beside math_verify's correctness, for the CPU demo
(examples/tiny_cpu_format.yaml; README "Reward functions").

    reward:
      functions: [math_verify, examples/format_reward.py:bare_number]
      weights: [1.0, 0.1]

The demo's model answers "a+b=" right after "Answer: " in at most 2 tokens; math_verify (with
reward.extract [last_number]) pays 1.0 when the last number is the sum, so "7", "A7" and "7A" all
count for 7. bare_number adds 0.1 when the whole completion is one number: the clean answer.
"""

import re

_NUMBER = re.compile(r"\s*-?\d+\s*")


def bare_number(prompts, completions, completion_ids, ability=None, **columns):
    """1.0 when the completion is one integer and nothing else, else 0.0; None ("does not
    apply") for a row whose `ability` column is not "arithmetic" (the demo's rows all are).

    rpg_megatron calls it once per sample, so every list holds one element; written as a loop
    over them, it also works as a TRL reward function.
    """
    abilities = ability if ability is not None else [None] * len(completions)
    return [
        float(_NUMBER.fullmatch(text) is not None) if kind == "arithmetic" else None
        for text, kind in zip(completions, abilities, strict=True)
    ]
