"""The evaluation harness: benchmarks -> batched generation -> grading -> metrics -> reports.

Three layers, each usable on its own:

* :func:`evaluate` (in process, no files unless given a :class:`SampleStore`): one benchmark (a
  registry name, a :class:`~vlm_mig.data.suites.BenchmarkSpec` or a list of ``Sample``) on a loaded
  model, returning a :class:`BenchmarkResult` (accuracy, format rate, mean length, pass@k, one
  :class:`SampleRecord` per completion). The trainer's in-loop validation calls it.
  :func:`grade_completions` grades given completions the same way without generating (e.g. the
  reference solutions, or completions from another engine).
* :func:`run_suite`: several benchmarks with per-benchmark options; a benchmark that needs images on a
  text-only model is skipped with its reason. With ``out_dir`` it appends every finished batch to
  ``samples.jsonl`` (so an interrupted run resumes without regenerating) and rewrites
  ``results.json`` and ``results.md`` after each benchmark.
* :func:`add_eval_command`: the ``vlm-mig eval`` subcommand.

Decoding: one greedy completion per item by default (pass@1 = accuracy). With ``samples=K > 1`` it
samples K completions per item (at the checkpoint's rollout temperature and top-p when its
``run_config.json`` has them, else temperature 0.6, top-p 0.95, unless set), each from its own seeded
stream (``vlm_mig.rollout.sampling``, seeded by run seed, benchmark and item id), so a resumed run
redraws what it lost instead of other samples; pass@k uses the unbiased estimator of Chen et al.
(2021), ``1 - C(n-c, k) / C(n, k)``, averaged over items.

Grading is ``vlm_mig.rewards``: the answer is the text of the last ``<answer>…</answer>`` (narrowed to
its ``\\boxed{}``), graded by task type; the format check is the training reward's. Untagged answers
score 0 by default (``extraction="strict"``, as in training); ``extraction="fallback"`` also reads a
final ``\\boxed{}`` or number.

Modules, by responsibility: ``passk`` (pass@k), ``options`` (decoding, prompt templates, per-benchmark
options), ``records`` (graded completions, benchmark and suite results, graders), ``store``
(``samples.jsonl``), ``harness`` (``evaluate``, ``grade_completions``), ``suites`` (suite files and
``run_suite``), ``reports`` (``results.json``, ``results.md``), ``cli`` (``vlm-mig eval``).
"""

from vlm_mig.evaluation.cli import add_eval_command, describe_registry, eval_command
from vlm_mig.evaluation.harness import (
    ImagesRequired,
    evaluate,
    gold_completion,
    grade_completions,
    resolve_benchmark,
)
from vlm_mig.evaluation.options import (
    EXTRACTIONS,
    SAMPLING_TEMPERATURE,
    SAMPLING_TOP_P,
    Decoding,
    EvalOptions,
    describe_template,
    parse_template,
    template_from_run_config,
)
from vlm_mig.evaluation.passk import pass_at_k, pass_k_values
from vlm_mig.evaluation.records import (
    GRADERS,
    BenchmarkResult,
    SampleRecord,
    SuiteResult,
    grade_one,
    grader_info,
    summarize,
)
from vlm_mig.evaluation.reports import markdown_table, write_reports
from vlm_mig.evaluation.store import SampleStore
from vlm_mig.evaluation.suites import SUITES_ENV, Suite, find_suite, load_suite, run_suite, suites_dir

__all__ = [
    "EXTRACTIONS", "GRADERS", "SAMPLING_TEMPERATURE", "SAMPLING_TOP_P", "SUITES_ENV", "BenchmarkResult", "Decoding",
    "EvalOptions", "ImagesRequired", "SampleRecord", "SampleStore", "Suite", "SuiteResult", "add_eval_command",
    "describe_registry", "describe_template", "eval_command", "evaluate", "find_suite", "gold_completion",
    "grade_completions", "grade_one", "grader_info", "load_suite", "markdown_table", "parse_template", "pass_at_k",
    "pass_k_values", "resolve_benchmark", "run_suite", "suites_dir", "summarize", "template_from_run_config",
    "write_reports",
]  # fmt: skip
