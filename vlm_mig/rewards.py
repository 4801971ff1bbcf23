"""Outcome rewards (SPEC section 3): answer extraction, grading by task type, format, and a registry.

    R_out = w_acc * acc + w_fmt * fmt [+ overlong]     (defaults w_acc = w_fmt = 1; overlong off)

* ``extract_answer(completion)`` reads the answer the model committed to: the text of the **last**
  complete ``<answer>…</answer>`` pair, narrowed to its last ``\\boxed{…}`` when it has one. Untagged
  text gives ``None`` unless ``fallback=True`` (see ``extract_answer``), so that a model which skips the
  tags is not paid for the answer by the accuracy reward: honest rewards need a strict default.
* ``grade(prediction, gold, task)`` compares an extracted answer with the gold answer (or a list of
  equivalent surface forms, ``V(y*)``) by task type: ``math`` (math-verify, time-limited), ``count``
  (integer), ``numeric`` (exact for integer golds, else a tolerance), ``mc`` (option letter), ``text``
  (normalised string).
* ``format_reward`` checks ``<think>…</think>\\s*<answer>…</answer>`` with at least one step.
* ``overlong_penalty`` is DAPO's soft overlong punishment of a completion's length (``reward.overlong_buffer``,
  ``reward.overlong_penalty``); ``overlong_reward`` is it as a reward function (component ``overlong``).
* Rewards are plain functions with the TRL signature ``fn(prompts, completions, **columns) ->
  list[float | None]``; ``compute_rewards`` combines a weighted list of them. Built-ins are named
  ``accuracy``, ``format`` and ``overlong``; anything else is a plug-in named ``package.module:function``.

Pure Python (no torch): the trainer turns the lists into tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlm_mig.data.loaders import answer_span
from vlm_mig.data.schema import TASK_TYPES
from vlm_mig.prompts import (  # noqa: F401  (extract_boxed/last_boxed are part of this module's API)
    ANSWER_CLOSE,
    ANSWER_OPEN,
    STEP_HEADER,
    THINK_CLOSE,
    THINK_OPEN,
    extract_boxed,
    last_boxed,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MATH_TIMEOUT_S",
    "DEFAULT_REWARD_SPECS",
    "NUMERIC_ABS_TOL",
    "NUMERIC_REL_TOL",
    "RewardFn",
    "RewardSpec",
    "Rewards",
    "accuracy_reward",
    "completion_text",
    "compute_rewards",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "get_reward_fn",
    "grade",
    "is_well_formatted",
    "last_boxed",
    "overlong_penalty",
    "overlong_reward",
    "register_reward",
    "registered_rewards",
]

#: Seconds math-verify may spend on each parse and each comparison (its own signal-based limit).
DEFAULT_MATH_TIMEOUT_S = 5.0
#: Numeric task tolerance for non-integer golds: |p - g| <= max(NUMERIC_ABS_TOL, NUMERIC_REL_TOL * |g|).
#: An integer gold needs exact equality: a relative tolerance would accept 120006 for 120000.
NUMERIC_REL_TOL = 1e-4
NUMERIC_ABS_TOL = 1e-6

# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------



_NUMBER_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")


def extract_answer(completion: str | None, *, fallback: bool = False) -> str | None:
    """The model's final answer, as a string to ``grade``; ``None`` when it gave none.

    1. Tagged (always): the text of the last complete ``<answer>…</answer>``; if it holds a
       ``\\boxed{…}``, the content of the last box (``<answer>\\boxed{5}</answer>`` gives ``5``).
    2. Fallback (only with ``fallback=True``, for untagged text such as a base model's output or a
       reference solution): the text after a final unclosed ``<answer>``, else the last ``\\boxed{…}``,
       else the last number (commas in thousands kept: ``1,234``).

    The default is strict because the training reward must not pay an untagged answer: the format
    reward would be the only thing teaching the tags, and accuracy would teach against it.
    """
    if completion is None:
        return None
    span = answer_span(completion)
    if span is not None:
        boxed = last_boxed(span)
        ans = (boxed if boxed is not None else span).strip()
        return ans or None
    if not fallback:
        return None
    open_pos = completion.rfind(ANSWER_OPEN)
    if open_pos >= 0:
        tail = completion[open_pos + len(ANSWER_OPEN) :]
        boxed = last_boxed(tail)
        tail = (boxed if boxed is not None else tail).strip()
        if tail:
            return tail
    boxed = last_boxed(completion)
    if boxed:
        return boxed
    nums = _NUMBER_RE.findall(completion)
    return nums[-1] if nums else None


# ----------------------------------------------------------------------------------------------
# Format
# ----------------------------------------------------------------------------------------------

_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_FORMAT_RE = re.compile(
    r"\s*"
    + re.escape(THINK_OPEN)
    + r"(.*?)"
    + re.escape(THINK_CLOSE)
    + r"\s*"
    + re.escape(ANSWER_OPEN)
    + r"(.*?)"
    + re.escape(ANSWER_CLOSE)
    + r"\s*",
    re.DOTALL,
)


def is_well_formatted(completion: str, *, require_step_header: bool = False) -> bool:
    """``fmt``: the whole completion is ``<think>…</think>\\s*<answer>…</answer>`` with at least one step.

    Each tag appears exactly once (no nested or repeated tags), the answer is non-empty, and so is
    the think span. **Decision** (SPEC section 1): "at least one step" means non-empty think text,
    because the segmenter splits at ``### Step`` headers, else blank lines, else newlines, and never
    merges away the first piece, so any non-empty think span has K >= 1; then ``fmt = 1`` implies
    ``K >= 1``. ``require_step_header=True`` asks for a literal ``### Step`` header instead.
    Whitespace around the whole completion is allowed (decoders leave newlines around EOS).
    """
    m = _FORMAT_RE.fullmatch(completion)
    if m is None:
        return False
    think, answer = m.group(1), m.group(2)
    if any(t in think or t in answer for t in _TAGS):
        return False
    if not answer.strip() or not think.strip():
        return False
    return not (require_step_header and STEP_HEADER not in think)


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------

_TEXT_MACRO_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACE_RE = re.compile(r"\\[!,;: ]|\\q?quad|~")


def _strip_latex_text(s: str) -> str:
    """``\\text{east}`` -> ``east`` (repeatedly, for nested wrappers)."""
    prev = None
    while prev != s:
        prev, s = s, _TEXT_MACRO_RE.sub(r"\1", s)
    return s


def _latex_canon(s: str) -> str:
    """A conservative canonical form for the exact-string shortcut of math grading.

    Removes only what never changes a value: math delimiters, ``\\left``/``\\right``, LaTeX spacing,
    ``\\dfrac``/``\\tfrac`` spelling, text wrappers, whitespace and a final period.
    """
    s = s.strip().strip("$")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _LATEX_SPACE_RE.sub("", s)
    s = _strip_latex_text(s)
    s = re.sub(r"\s+", "", s)
    return s.rstrip(".")


_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")  # `\$36` is a price, not a math delimiter


def _as_math(s: str) -> str:
    """Wrap a bare answer so math-verify's LaTeX extractor takes all of it as one expression.

    A bare ``\\frac{1}{2}`` or ``(3,4]`` has no anchor; wrapped in ``\\boxed{}`` it is read whole with
    the highest priority, so ``x = 5`` stays an equation and ``1,-2`` stays a list. Text that is
    already delimited (``$…$``, ``\\(…\\)``, ``\\boxed``) is passed as it is.
    """
    t = s.strip()
    if _UNESCAPED_DOLLAR_RE.search(t) or "\\(" in t or "\\[" in t or "\\boxed" in t:
        return t
    return "\\boxed{" + t + "}"


def _mv_check(pred: str, golds: Sequence[str], timeout_s: float) -> bool:
    """math-verify on the calling thread, with math-verify's own per-step alarm (main thread only)."""
    from math_verify import parse, verify

    t = max(1, math.ceil(timeout_s))  # math-verify's alarm takes whole seconds
    p = parse(_as_math(pred), parsing_timeout=t)
    if not p:
        return False
    for g in golds:
        gp = parse(_as_math(g), parsing_timeout=t)
        if gp and verify(gp, p, timeout_seconds=t):
            return True
    return False


class _MathWorker:
    """A persistent child interpreter that runs ``_mv_check`` on its own main thread.

    Why: math-verify limits time with ``signal.alarm``, which only works on the main thread (it
    raises elsewhere), and no signal can interrupt a hang inside C code. The child runs the same
    checks with the same alarms, and the parent also waits at most ``hard_timeout_s`` for an answer;
    past that it kills the child (the check counts as wrong) and the next check starts a fresh one.
    It is a plain ``python -c`` subprocess speaking one JSON line per request, not ``multiprocessing``,
    so the user's ``__main__`` is never re-imported in the child.
    """

    _STARTUP_TIMEOUT_S = 120.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._lock = threading.Lock()
        self.restarts = 0

    def _start(self) -> None:
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from vlm_mig.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        self._buf = b""
        if self._readline(self._STARTUP_TIMEOUT_S) != b"ready":
            self._kill()
            raise RuntimeError("vlm_mig.rewards: the math-verify worker process did not start")

    def _readline(self, timeout_s: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # the child died
                return None
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.strip()

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # already gone
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
        self._buf = b""

    def check(self, pred: str, golds: Sequence[str], timeout_s: float, hard_timeout_s: float) -> bool:
        import json

        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps([pred, list(golds), timeout_s]) + "\n").encode())
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                self._kill()
                return False
            line = self._readline(hard_timeout_s)
            if line is None:
                logger.warning("math-verify check exceeded %.1fs; killing its worker process", hard_timeout_s)
                self._kill()
                self.restarts += 1
                return False
            return line == b"1"

    def close(self) -> None:
        with self._lock:
            self._kill()


def _worker_main() -> None:  # pragma: no cover - runs in the child process
    """Loop of the math-verify worker: one JSON request per stdin line, ``1``/``0`` per stdout line."""
    import json

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # the parent reports timeouts
    out = sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    for raw in sys.stdin.buffer:
        try:
            pred, golds, timeout_s = json.loads(raw)
            ok = _mv_check(pred, golds, timeout_s)
        except BaseException:  # noqa: BLE001 - any failure of one check is a wrong answer, not a crash
            ok = False
        out.write(b"1\n" if ok else b"0\n")
        out.flush()


_WORKER = _MathWorker()


def _grade_math(
    pred: str, golds: Sequence[str], timeout_s: float, isolation: str, hard_timeout_s: float | None
) -> bool:
    pc = _latex_canon(pred)
    if pc and any(pc == _latex_canon(g) for g in golds):
        return True  # identical up to spacing/delimiters: no need to call sympy
    on_main = threading.current_thread() is threading.main_thread()
    if isolation == "inline" or (isolation == "auto" and on_main and os.name == "posix"):
        if not on_main:
            raise RuntimeError(
                "grade(..., isolation='inline') needs the main thread (math-verify uses SIGALRM)"
            )
        return _mv_check(pred, golds, timeout_s)
    if os.name != "posix":
        raise RuntimeError("process isolation of math-verify needs a POSIX system")
    hard = hard_timeout_s if hard_timeout_s is not None else 3 * max(1.0, timeout_s) + 2.0
    return _WORKER.check(pred, golds, timeout_s, hard)


_WORD_NUMBERS = {
    w: i
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "  # noqa: SIM905
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUM_FULL_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_FRAC_RE = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*/\s*([+-]?\d+(?:\.\d+)?)")
_LATEX_FRAC_RE = re.compile(r"([+-]?)\\[dt]?frac\{\s*([+-]?\d+(?:\.\d+)?)\s*\}\{\s*([+-]?\d+(?:\.\d+)?)\s*\}")


def _clean_number_text(s: str) -> str:
    s = _strip_latex_text(s.strip().strip("$"))
    s = _LATEX_SPACE_RE.sub("", s)
    # Thousands separators, currency and percent signs carry no value in a compared answer.
    for junk in (",", "\\$", "$", "\\%", "%", " "):
        s = s.replace(junk, "")
    return s.rstrip(".")


def _parse_number(s: str) -> float | None:
    """A plain number: ``-1,234.5``, ``$3``, ``45%``, ``1e-3``, ``3/4``, ``\\frac{3}{4}``; else ``None``."""
    t = _clean_number_text(s)
    if _NUM_FULL_RE.fullmatch(t):
        return float(t)
    m = _FRAC_RE.fullmatch(t)
    if m is None:
        lm = _LATEX_FRAC_RE.fullmatch(t)
        if lm is not None:
            num, den = lm.group(2), lm.group(3)
            if float(den) == 0:
                return None
            v = float(num) / float(den)
            return -v if lm.group(1) == "-" else v
        return None
    if float(m.group(2)) == 0:
        return None
    return float(m.group(1)) / float(m.group(2))


def _parse_count(s: str) -> int | None:
    """An integer count: ``3``, ``3.0``, ``three``, ``3 objects``; ``None`` if not exactly one integer."""
    t = _strip_latex_text(s).strip().strip("$").strip().rstrip(".").lower()
    v = _parse_number(t)
    if v is None:
        if t in _WORD_NUMBERS:
            return _WORD_NUMBERS[t]
        # "3 objects": accept when exactly one number is written; "2 cubes and 3 balls" is ambiguous.
        nums = _NUMBER_RE.findall(t)
        words = [w for w in re.findall(r"[a-z]+", t) if w in _WORD_NUMBERS]
        if len(nums) + len(words) != 1:
            return None
        v = float(nums[0].replace(",", "")) if nums else float(_WORD_NUMBERS[words[0]])
    if not math.isfinite(v) or v != int(v):
        return None
    return int(v)


_MC_FULL_RE = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_MC_LEAD_RE = re.compile(
    r"(?i:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*)?"
    r"(?:\(([A-Z])\)|([A-Z])(?:[).:]|$))"
)


def _parse_choice(s: str) -> str | None:
    """The option letter: ``B``, ``b``, ``(B)``, ``B.``, ``B) 42``, ``(B) 42``, ``Option B``; else ``None``.

    A lone letter may be lower case; a letter followed by more text must be upper case and closed by
    ``)``, ``.`` or ``:``, so that ``a dog`` or ``A dog`` is not read as option A.
    """
    t = _strip_latex_text(s).strip().strip("$").strip()
    m = _MC_FULL_RE.fullmatch(t)
    if m is not None:
        return m.group(1).upper()
    m = _MC_LEAD_RE.match(t)
    return (m.group(1) or m.group(2)) if m is not None else None


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def _normalize_text(s: str) -> str:
    """SQuAD-style: NFKC, lower case, no LaTeX text wrappers, no punctuation or articles, one space."""
    s = unicodedata.normalize("NFKC", _strip_latex_text(s)).lower()
    s = "".join(" " if unicodedata.category(c).startswith("P") else c for c in s)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def grade(
    prediction: str | None,
    gold: str | Sequence[str],
    task: str = "math",
    *,
    timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
    isolation: str = "auto",
    hard_timeout_s: float | None = None,
) -> bool:
    """Whether ``prediction`` (an extracted answer) equals ``gold`` for ``task``; never raises on bad text.

    ``gold`` is one string or the list ``V(y*)`` of equivalent forms (any match counts).

    * ``math``: identical after removing spacing/delimiters, else math-verify
      ``verify(parse(gold), parse(prediction))`` (bare answers are wrapped in ``\\boxed{}`` first).
      Each parse and comparison is limited to ``timeout_s`` seconds. ``isolation``: ``"auto"`` runs
      on the calling thread when it is the main thread (math-verify's SIGALRM limit) and in a worker
      process otherwise; ``"process"`` always uses the worker, which also survives hangs in C code
      (killed after ``hard_timeout_s``, default ``3 * timeout_s + 2``); ``"inline"`` never does.
    * ``count``: integer equality (``3``, ``3.0``, ``three``, ``3 objects``).
    * ``numeric``: after removing ``,``, ``$`` and ``%``, exact equality when the gold is an integer,
      else ``|p - g| <= max(1e-6, 1e-4 * |g|)``.
    * ``mc``: the same option letter (``B``, ``(B)``, ``B.``, ``b``).
    * ``text``: equality after lower-casing and removing punctuation, articles and extra space.
    """
    if task not in TASK_TYPES:
        raise ValueError(f"unknown task type {task!r}; expected one of {TASK_TYPES}")
    if isolation not in ("auto", "process", "inline"):
        raise ValueError(f"isolation must be 'auto', 'process' or 'inline', got {isolation!r}")
    if prediction is None or not str(prediction).strip():
        return False
    golds = [gold] if isinstance(gold, str) else list(gold)
    golds = [str(g) for g in golds if g is not None and str(g).strip()]
    if not golds:
        return False
    pred = str(prediction)
    if task == "math":
        return _grade_math(pred, golds, timeout_s, isolation, hard_timeout_s)
    if task == "count":
        p = _parse_count(pred)
        return p is not None and any(p == _parse_count(g) for g in golds)
    if task == "numeric":
        p = _parse_number(pred)
        if p is None or not math.isfinite(p):
            return False
        for g in golds:
            gv = _parse_number(g)
            if gv is None or not math.isfinite(gv):
                continue
            if p == gv if gv == int(gv) else abs(p - gv) <= max(NUMERIC_ABS_TOL, NUMERIC_REL_TOL * abs(gv)):
                return True
        return False
    if task == "mc":
        p = _parse_choice(pred)
        return p is not None and any(p == _parse_choice(g) for g in golds)
    p = _normalize_text(pred)
    return bool(p) and any(p == _normalize_text(g) for g in golds)


# ----------------------------------------------------------------------------------------------
# Reward functions (TRL signature) and the registry
# ----------------------------------------------------------------------------------------------

#: ``fn(prompts, completions, **columns) -> list[float | None]``; ``None`` = not applicable to that row.
RewardFn = Callable[..., list]


def completion_text(completion: Any) -> str:
    """Text of a completion: a string, or a TRL conversational completion (list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal message parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    return "" if completion is None else str(completion)


def _column(columns: dict, name: str, n: int, default: Any = None) -> list:
    """Column ``name`` broadcast to ``n`` rows (a scalar is repeated; a list must have ``n`` items)."""
    val = columns.get(name, default)
    if isinstance(val, (list, tuple)):
        if len(val) != n:
            raise ValueError(f"column {name!r} has {len(val)} rows, expected {n}")
        return list(val)
    return [val] * n


def accuracy_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    answer: Sequence[Any] | None = None,
    task: str | Sequence[str] = "math",
    answer_variants: Sequence[Sequence[str] | None] | None = None,
    *,
    fallback: bool = False,
    timeout_s: float = DEFAULT_MATH_TIMEOUT_S,
    **_: Any,
) -> list[float | None]:
    """``acc``: 1.0 when ``grade(extract_answer(completion), answer, task)``, else 0.0.

    Columns: ``answer`` (a gold string, or a list ``V(y*)`` of equivalent forms, per row), ``task``
    (per row or one for all; default ``math``) and optionally ``answer_variants`` (per row, extra
    surface forms added to ``V(y*)``, as ``Sample.answer_variants``). A row with no gold answer gets
    ``None``.
    """
    n = len(completions)
    if answer is None:
        raise ValueError("the accuracy reward needs an 'answer' column (the gold answer of each row)")
    answers = _column({"answer": answer}, "answer", n)
    tasks = _column({"task": task}, "task", n)
    variants = _column({"answer_variants": answer_variants}, "answer_variants", n)
    out: list[float | None] = []
    for c, a, t, v in zip(completions, answers, tasks, variants):
        if a is None or (isinstance(a, (list, tuple)) and not a):
            out.append(None)
            continue
        if v:
            a = [a, *v] if isinstance(a, str) else [*a, *v]
        pred = extract_answer(completion_text(c), fallback=fallback)
        out.append(1.0 if grade(pred, a, t or "math", timeout_s=timeout_s) else 0.0)
    return out


def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], *, require_step_header: bool = False, **_: Any
) -> list[float | None]:
    """``fmt``: 1.0 when ``is_well_formatted(completion)``, else 0.0 (see that function)."""
    return [
        1.0 if is_well_formatted(completion_text(c), require_step_header=require_step_header) else 0.0
        for c in completions
    ]


def overlong_penalty(length: int, max_length: int, buffer: int, penalty: float = 1.0) -> float:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO", section 3.4, R_length) of a completion of
    ``length`` tokens (through EOS) with ``max_length`` = L_max (the generation cap) and ``buffer`` = L_cache:

        0                                               if |y| <= L_max - L_cache
        (L_max - L_cache - |y|) / L_cache * penalty     if L_max - L_cache < |y| <= L_max
        -penalty                                        if |y| > L_max

    a linear ramp from 0 to ``-penalty`` over the last ``buffer`` tokens the cap allows. As verl's ``dapo``
    reward manager (``overlong_buffer.len``, ``overlong_buffer.penalty_factor``: ``min(-(|y| - (L_max -
    L_cache)) / L_cache * penalty_factor, 0)``) up to L_max; beyond it (which a hard cap rules out) the paper's
    constant ``-penalty``, where verl's ramp would go on falling. ``buffer`` 0 is off (0 for every length)."""
    if buffer < 0 or penalty < 0 or max_length < 1:
        raise ValueError(f"overlong penalty: buffer {buffer} and penalty {penalty} must be >= 0 and max_length "
                         f"{max_length} >= 1")
    if buffer > max_length:
        raise ValueError(f"overlong penalty: the buffer ({buffer}) is longer than max_length ({max_length}), so "
                         "every length would be penalised")
    if buffer == 0:
        return 0.0
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -float(penalty)
    return (start - length) / buffer * penalty


def overlong_reward(
    prompts: Sequence[Any], completions: Sequence[Any], completion_length: Sequence[int] | None = None, *,
    max_length: int, buffer: int, penalty: float = 1.0, **_: Any,
) -> list[float | None]:
    """``overlong_penalty`` of each completion's token count (the ``completion_length`` column, which the RL
    reward stage passes: text cannot be re-tokenized into the sampled ids)."""
    if completion_length is None:
        raise ValueError("the overlong reward needs a 'completion_length' column (tokens of each completion)")
    lengths = _column({"completion_length": completion_length}, "completion_length", len(completions))
    return [overlong_penalty(int(n), max_length, buffer, penalty) for n in lengths]


_REGISTRY: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward, "overlong": overlong_reward}


def register_reward(name: str, fn: RewardFn | None = None):
    """Register ``fn`` under ``name`` (also usable as ``@register_reward("name")``)."""

    def deco(f: RewardFn) -> RewardFn:
        if ":" in name:
            raise ValueError(f"reward name {name!r} may not contain ':' (reserved for module:function)")
        _REGISTRY[name] = f
        return f

    return deco(fn) if fn is not None else deco


def registered_rewards() -> list[str]:
    """Names of the registered reward functions."""
    return sorted(_REGISTRY)


def get_reward_fn(name: str) -> RewardFn:
    """A registered reward by name, or a plug-in ``package.module:function`` (imported on demand)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise KeyError(
            f"unknown reward {name!r}; registered: {registered_rewards()}, or use 'module:function'"
        )
    mod_name, _, attr = name.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise ImportError(f"reward plug-in {name!r}: cannot import module {mod_name!r}: {e}") from e
    fn = mod
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise AttributeError(f"reward plug-in {name!r}: module {mod_name!r} has no {attr!r}")
    if not callable(fn):
        raise TypeError(f"reward plug-in {name!r} is not callable")
    return fn


@dataclass
class RewardSpec:
    """One weighted term of ``R_out``."""

    name: str  #: a registered name (``accuracy``, ``format``) or a plug-in ``package.module:function``
    weight: float = 1.0  #: multiplies the function's value in ``R_out``
    kwargs: dict[str, Any] = field(default_factory=dict)  #: extra keyword arguments for the function


#: SPEC section 3: ``R_out = 1 * acc + 1 * fmt``.
DEFAULT_REWARD_SPECS: tuple[RewardSpec, ...] = (RewardSpec("accuracy", 1.0), RewardSpec("format", 1.0))


@dataclass
class Rewards:
    """Per-row outcome rewards: ``total`` is ``R_out``; ``components[name]`` the unweighted values."""

    total: list[float]
    components: dict[str, list[float | None]]

    def mean(self, name: str) -> float:
        """Mean of one component over the rows where it applies (NaN if it applies to none)."""
        vals = [v for v in self.components[name] if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")


def compute_rewards(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    specs: Sequence[RewardSpec] = DEFAULT_REWARD_SPECS,
    **columns: Any,
) -> Rewards:
    """``R_out = sum_j w_j * r_j`` for each row, and every ``r_j`` for logging.

    ``columns`` are passed to every function as keyword arguments (TRL style: ``answer``, ``task``
    and any other dataset column). ``None`` from a function means "not applicable to this row": it
    adds nothing to that row's total (as TRL's ``nansum``) and is left out of ``Rewards.mean``. A
    wrong number of values, or a NaN/inf value, is an error naming the function, since a single NaN
    would poison every advantage of the batch.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions")
    total = [0.0] * n
    comps: dict[str, list[float | None]] = {}
    for spec in specs:
        fn = get_reward_fn(spec.name)
        vals = list(fn(prompts, completions, **{**columns, **spec.kwargs}))
        if len(vals) != n:
            raise ValueError(f"reward {spec.name!r} returned {len(vals)} values for {n} completions")
        clean: list[float | None] = []
        for v in vals:
            if v is None:
                clean.append(None)
                continue
            v = float(v)
            if not math.isfinite(v):
                raise ValueError(f"reward {spec.name!r} returned a non-finite value {v}")
            clean.append(v)
        comps[spec.name] = clean
        for i, v in enumerate(clean):
            if v is not None:
                total[i] += spec.weight * v
    return Rewards(total=total, components=comps)
