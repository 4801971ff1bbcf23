"""The reasoning format of SPEC.md: ``<think>`` with ``### Step i:`` headers, then ``<answer>``.

Train-time and eval-time prompts come from here, so they are the same unless a config says otherwise.
The brace-balanced ``\\boxed{}`` reader lives here too: the graders and the benchmark loaders share it.
"""

from __future__ import annotations

import re

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
DEFAULT_PROBE = f"{THINK_CLOSE}\n{ANSWER_OPEN}"
#: The neutral text l_0 is scored after with ``mig.l0_context: opener``: what every gold solution
#: (``format_solution``) writes between ``<think>`` and its first step.
DEFAULT_L0_OPENER = "\n"


def format_step(i: int, text: str) -> str:
    """Step ``i`` (1-based) as one line of the think span."""
    return f"{STEP_HEADER} {i}: {text.strip()}"


def format_solution(steps: list[str], answer: str) -> str:
    """A gold completion: ``<think>\\n### Step 1: ...\\n</think>\\n<answer>a</answer>``."""
    body = "\n".join(format_step(i + 1, s) for i, s in enumerate(steps))
    return f"{THINK_OPEN}\n{body}\n{THINK_CLOSE}\n{ANSWER_OPEN}{answer}{ANSWER_CLOSE}"


_BOX_CMDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> list[str]:
    """Contents of every ``\\boxed{…}`` / ``\\fbox{…}`` in ``text``, in order.

    Braces are matched by depth (``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), which a regex cannot
    do; escaped braces ``\\{ \\}`` do not count. The brace-less form ``\\boxed 5`` gives its next token.
    An unclosed box (a truncated completion) is skipped rather than guessed at.
    """
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        starts = [(text.find(c, i), c) for c in _BOX_CMDS]
        starts = [(p, c) for p, c in starts if p >= 0]
        if not starts:
            break
        pos, cmd = min(starts)
        j = pos + len(cmd)
        # `\boxedfoo` is another macro, not a box.
        if j < n and text[j].isalpha():
            i = j
            continue
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == "{":
            depth, k = 0, j
            while k < n:
                ch = text[k]
                if ch == "\\":  # skip the escaped character (\{ \} \\)
                    k += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        break
                k += 1
            if k >= n:  # unbalanced: the completion was cut inside the box
                break
            out.append(text[j + 1 : k].strip())
            i = k + 1
        else:
            m = re.match(r"[^\s$}]+", text[j:])
            if m and j > pos + len(cmd):  # `\boxed 5` needs the space
                out.append(m.group(0))
                i = j + m.end()
            else:
                i = j
    return out


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{…}`` in ``text`` (``None`` when there is none)."""
    boxes = extract_boxed(text)
    return boxes[-1] if boxes else None
