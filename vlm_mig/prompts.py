"""The reasoning format of SPEC.md: ``<think>`` with ``### Step i:`` headers, then ``<answer>``.

Train-time and eval-time prompts come from here, so they are the same unless a config says otherwise.
"""

from __future__ import annotations

SYSTEM_PROMPT = (
    "You are a helpful assistant. Think step by step inside <think> </think>, writing each step as "
    "'### Step i: ...' on its own line, then give the final answer inside <answer> </answer>."
)

#: Appended to the user's question (the R1-V style instruction, with explicit steps).
QUESTION_SUFFIX = (
    " Output the thinking process in <think> </think> as numbered steps '### Step i:' and the final "
    "answer in <answer> </answer> tags."
)

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
STEP_HEADER = "### Step"

#: Text that closes the reasoning and opens the answer when scoring l_k (SPEC section 2).
DEFAULT_PROBE = "</think>\n<answer>"


def format_step(i: int, text: str) -> str:
    """Step ``i`` (1-based) as one line of the think span."""
    return f"{STEP_HEADER} {i}: {text.strip()}"


def format_solution(steps: list[str], answer: str) -> str:
    """A gold completion: ``<think>\\n### Step 1: ...\\n</think>\\n<answer>a</answer>``."""
    body = "\n".join(format_step(i + 1, s) for i, s in enumerate(steps))
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
