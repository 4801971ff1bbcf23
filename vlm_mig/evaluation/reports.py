"""``results.json`` and ``results.md`` of a suite run, each written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vlm_mig.evaluation.records import SuiteResult, now_utc


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown_table(result: SuiteResult) -> str:
    """The results as a markdown table (percentages), with the settings and the skipped benchmarks."""
    ks = sorted({k for r in result.results.values() for k in r.pass_at_k if k > 1})
    head = ["benchmark", "task", "n", "K", "accuracy", *[f"pass@{k}" for k in ks], "format", "answered",
            "mean length", "grader"]  # fmt: skip
    lines = [
        f"# Evaluation: {result.model}",
        "",
        f"Suite `{result.suite}`" + (f" ({result.suite_file})" if result.suite_file else "") + f", {now_utc()}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for r in result.results.values():
        graders = ", ".join(f"{g['name']} {g['version']}" for g in r.graders.values())
        row = [r.name, "/".join(r.tasks), str(r.n), str(r.samples), _fmt_pct(r.accuracy),
               *[_fmt_pct(r.pass_at_k[k]) if k in r.pass_at_k else "-" for k in ks],
               _fmt_pct(r.format_rate), _fmt_pct(r.answered_rate), f"{r.mean_length:.1f} {r.length_unit}", graders]
        lines.append("| " + " | ".join(row) + " |")  # fmt: skip
    lines.append("")
    lines.append("Accuracy, pass@k, format and answered are percentages; accuracy is pass@1 over all K completions.")
    for r in result.results.values():
        d = r.decoding
        decoding = "given completions"
        if d.get("mode") != "given":
            decoding = (
                f"{d['mode']}, temperature {d['temperature']}, top_p {d['top_p']}, "
                f"max_new_tokens {d['max_new_tokens']}"
            )
        lines.append(f"- `{r.name}`: {decoding}; prompt template `{r.template.get('name')}`; extraction {r.extraction}")
    if result.skipped:
        lines.append("")
        lines.append("Skipped:")
        lines.extend(f"- `{k}`: {v}" for k, v in result.skipped.items())
    return "\n".join(lines) + "\n"


def write_reports(result: SuiteResult, out_dir: str | os.PathLike) -> None:
    """Write ``results.json`` and ``results.md`` (each atomically: a reader never sees half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "results.json", json.dumps(result.to_json(), indent=2, ensure_ascii=False) + "\n")
    _atomic_write(out / "results.md", markdown_table(result))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
