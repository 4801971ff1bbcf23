"""Offline, deterministic synthetic data: CLEVR-like counting scenes and multi-step arithmetic.

The generators live in :mod:`vlm_mig.data.clevr` and :mod:`vlm_mig.data.arithmetic`; this module is
the one import point for both (and for the CLI).
"""

from __future__ import annotations

from vlm_mig.data.arithmetic import (
    ArithmeticProblem,
    Op,
    Solution,
    correct_solution,
    make_arithmetic,
    safe_error,
    sample_problem,
    solution_variants,
    with_redundant_step,
    with_wrong_step,
    write_arithmetic,
)
from vlm_mig.data.clevr import (
    COLORS,
    CONDITIONS,
    COUNT_ALL_QUESTION,
    MATERIALS,
    MULTISTEP_MIX,
    QUESTION_MIX,
    QUESTION_MIXES,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    ClevrExample,
    Question,
    Scene,
    SceneObject,
    check_claims,
    compare_question,
    complement_question,
    count_claims,
    count_question,
    filter_chain_question,
    make_clevr_example,
    matches,
    render_scene,
    sample_question,
    sample_scene,
    union_question,
    write_clevr,
)

__all__ = [
    "COLORS", "CONDITIONS", "COUNT_ALL_QUESTION", "MATERIALS", "MULTISTEP_MIX", "QUESTION_MIX", "QUESTION_MIXES",
    "QUESTION_TYPES", "SHAPES", "SIZES",
    "ArithmeticProblem", "ClevrExample", "Op", "Question", "Scene", "SceneObject", "Solution",
    "check_claims", "compare_question", "complement_question", "correct_solution", "count_claims", "count_question",
    "filter_chain_question", "make_arithmetic", "make_clevr_example", "matches", "render_scene", "safe_error",
    "sample_problem", "sample_question", "sample_scene", "solution_variants", "union_question", "with_redundant_step",
    "with_wrong_step", "write_arithmetic", "write_clevr",
]  # fmt: skip
