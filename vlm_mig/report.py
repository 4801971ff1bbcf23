"""Reports of training runs: learning curves (matplotlib), the per-step credit viewer (one self-contained
HTML file) and markdown tables.

Everything here reads what the trainer and the evaluation harness already wrote (``metrics.jsonl``,
``samples.jsonl``, scored rows of :func:`vlm_mig.score.score_samples`) and writes files; nothing here
touches a model.

* :func:`plot_curves`: training reward, training accuracy and validation accuracy against the step, one
  colour per method on shared axes; several seeds give their mean with a ±1 std band.
* :func:`write_steps_html`: sample completions with each reasoning step shaded by its gain ``g_k`` and an
  inline SVG of ``l_0..l_K`` with the watermark ``h_k``. Images are embedded as data URIs, so the one file
  opens in any browser with no network and no other files.
* :func:`markdown_table`, :func:`mean_std`: the tables of ``report.md``.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------
# Reading runs


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a jsonl file (a torn last line, from a killed run, is skipped); [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def series(rows: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of one metric from ``metrics.jsonl`` rows (rows without it, or with null, skipped;
    a step logged twice keeps its last value)."""
    by_step: dict[int, float] = {}
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average: point i is the mean of ``values[max(0, i-window+1) .. i]`` (no look-ahead)."""
    out, acc = [], 0.0
    window = max(1, int(window))
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def mean_curve(curves: Sequence[tuple[list[int], list[float]]]) -> tuple[list[int], list[float], list[float]]:
    """Mean and population std over seeds at the steps every curve has."""
    if not curves:
        return [], [], []
    common = set(curves[0][0])
    for steps, _ in curves[1:]:
        common &= set(steps)
    steps = sorted(common)
    maps = [dict(zip(s, v)) for s, v in curves]
    mean = [statistics.fmean(m[s] for m in maps) for s in steps]
    std = [statistics.pstdev([m[s] for m in maps]) if len(maps) > 1 else 0.0 for s in steps]
    return steps, mean, std


def steps_to_reach(target: float, steps: Sequence[int], smoothed: Sequence[float], window: int) -> int | None:
    """First step at which a smoothed curve reaches ``target``, counting only points whose trailing window is
    full (the first ``window - 1`` points average fewer steps and are too noisy to count); None: never."""
    start = min(max(0, window - 1), max(0, len(smoothed) - 1))
    for s, v in zip(steps[start:], smoothed[start:]):
        if v >= target - 1e-12:
            return int(s)
    return None


# --------------------------------------------------------------------------------------------------
# Learning curves

#: One colour per method, everywhere (plot, HTML).
COLORS = {"grpo": "#1f77b4", "mig": "#d62728", "sft": "#7f7f7f"}
LABELS = {"grpo": "GRPO (outcome reward)", "mig": "MIG (process + outcome + gated SFT)", "sft": "SFT start"}


def plot_curves(runs: dict[str, list[list[dict[str, Any]]]], out_png: str | Path, *, window: int,
                title: str = "", reach: dict[str, Any] | None = None, sft_val: float | None = None) -> Path:
    """``runs[method]`` = one list of ``metrics.jsonl`` rows per seed. Writes a 3-panel PNG: training reward
    (raw, faint, and smoothed), training accuracy (smoothed; GRPO's final level and the step where MIG
    reaches it, from ``reach``), validation accuracy. Several seeds: mean with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward/total", "training reward R_out (acc + fmt)", True),
              ("reward/accuracy", "training accuracy (sampled rollouts)", True),
              ("val/accuracy", "validation accuracy (greedy, held-out ID)", False)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (key, name, smoothed) in zip(axes, panels):
        for method, seeds in runs.items():
            color = COLORS.get(method, None)
            curves = [series(rows, key) for rows in seeds]
            curves = [c for c in curves if c[0]]
            if not curves:
                continue
            steps, mean, std = mean_curve(curves)
            n = len(curves)
            label = LABELS.get(method, method) + (f", mean of {n} seeds" if n > 1 else "")
            if smoothed:
                ax.plot(steps, mean, color=color, alpha=0.18, linewidth=0.8)
                sm = smooth(mean, window)
                ax.plot(steps, sm, color=color, linewidth=2, label=label)
                if n > 1:  # band: ±1 std over seeds of the per-seed smoothed curves
                    per_seed = []
                    for cs, cv in curves:
                        at = dict(zip(cs, cv))
                        per_seed.append(smooth([at[s] for s in steps], window))
                    cols = list(zip(*per_seed))
                    lo = [statistics.fmean(c) - statistics.pstdev(c) for c in cols]
                    hi = [statistics.fmean(c) + statistics.pstdev(c) for c in cols]
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.12, linewidth=0)
            else:
                ax.plot(steps, mean, color=color, linewidth=2, marker="o", markersize=4, label=label)
                if n > 1:
                    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=color, alpha=0.12, linewidth=0)
        if key == "reward/accuracy" and reach and reach.get("target") is not None:
            ax.axhline(reach["target"], color=COLORS["grpo"], linestyle="--", linewidth=1,
                       label=f"GRPO final (smoothed) {reach['target']:.2f}")
            if reach.get("mig_step") is not None:
                ax.axvline(reach["mig_step"], color=COLORS["mig"], linestyle=":", linewidth=1.2,
                           label=f"MIG reaches it at step {reach['mig_step']}")
        if key == "val/accuracy" and sft_val is not None:
            ax.axhline(sft_val, color=COLORS["sft"], linestyle=":", linewidth=1, label=f"SFT start {sft_val:.2f}")
        if key == "reward/total":
            ax.set_ylim(-0.05, 2.05)
        else:
            ax.set_ylim(-0.03, 1.03)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(name + (f"\nsmoothed: trailing mean of {window} steps" if smoothed else ""), fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


# --------------------------------------------------------------------------------------------------
# The per-step credit viewer


@dataclass
class CreditExample:
    """One completion to show: its steps with ``l_0..l_K`` (K+1 values), watermark and gains (K values)."""

    title: str
    question: str
    gold: str
    completion: str
    steps: list[str]
    l: list[float]
    watermark: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)
    predicted: str | None = None
    correct: bool | None = None
    image: str | Path | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not self.watermark and self.l:
            h, best = [], -math.inf
            for v in self.l:
                best = max(best, v)
                h.append(best)
            self.watermark = h
        if not self.gains and len(self.l) > 1:
            self.gains = [max(0.0, self.l[k] - self.watermark[k - 1]) for k in range(1, len(self.l))]


@dataclass
class CreditSection:
    title: str
    intro: str
    examples: list[CreditExample]


def _image_uri(path: str | Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    data = Path(path).read_bytes()
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def l_curve_svg(l: Sequence[float], watermark: Sequence[float], gains: Sequence[float], width: int = 300,
                height: int = 150) -> str:
    """Inline SVG: ``l_k`` (points and line) and the watermark ``h_k`` (step line) for k = 0..K; a step that
    set a new record (``g_k > 0``) is a filled green point with its gain written above it."""
    if not l:
        return (f'<svg class="lk" width="{width}" height="40" xmlns="http://www.w3.org/2000/svg"><text x="4" '
                'y="24" font-size="11" fill="#666">no l_k: no think span (K = 0)</text></svg>')
    pad_l, pad_r, pad_t, pad_b = 42, 22, 16, 26
    lo = min(min(l), min(watermark))
    hi = max(max(l), max(watermark))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    lo, hi = lo - 0.08 * span, hi + 0.12 * span
    n = len(l)
    w, h = width - pad_l - pad_r, height - pad_t - pad_b

    def x(k: float) -> float:
        return pad_l + (w * k / (n - 1) if n > 1 else w / 2)

    def y(v: float) -> float:
        return pad_t + h * (hi - v) / (hi - lo)

    parts = [f'<svg class="lk" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="l_k and watermark">',
             f'<rect x="{pad_l}" y="{pad_t}" width="{w}" height="{h}" fill="#fafafa" stroke="#ddd"/>']
    for v in (lo + 0.12 * (hi - lo) / 1.2, (lo + hi) / 2, hi - 0.1 * (hi - lo)):
        parts.append(f'<line x1="{pad_l}" x2="{pad_l + w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y(v) + 3:.1f}" font-size="9" text-anchor="end" fill="#666">'
                     f'{v:.2f}</text>')
    for k in range(n):
        parts.append(f'<text x="{x(k):.1f}" y="{pad_t + h + 12}" font-size="9" text-anchor="middle" fill="#666">'
                     f'{k}</text>')
    parts.append(f'<text x="{pad_l + w / 2:.1f}" y="{height - 2}" font-size="9" text-anchor="middle" fill="#444">'
                 f'k (reasoning steps so far)</text>')
    # watermark as a step line
    pts = []
    for k in range(n):
        if k:
            pts.append(f"{x(k):.1f},{y(watermark[k - 1]):.1f}")
        pts.append(f"{x(k):.1f},{y(watermark[k]):.1f}")
    parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="#2a9d8f" stroke-width="2" '
                 f'stroke-dasharray="5,3"/>')
    parts.append('<polyline points="{}" fill="none" stroke="#333" stroke-width="1.5"/>'.format(
        " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in enumerate(l))))
    for k, v in enumerate(l):
        g = gains[k - 1] if k >= 1 and k - 1 < len(gains) else 0.0
        fill = "#2ca02c" if g > 0 else ("#333" if k == 0 else "#fff")
        parts.append(f'<circle cx="{x(k):.1f}" cy="{y(v):.1f}" r="3.5" fill="{fill}" stroke="#333">'
                     f'<title>l_{k} = {v:.4f}, h_{k} = {watermark[k]:.4f}' +
                     (f", g_{k} = {g:.4f}" if k else "") + '</title></circle>')
        if g > 0:
            parts.append(f'<text x="{x(k):.1f}" y="{y(v) - 6:.1f}" font-size="9" text-anchor="middle" '
                         f'fill="#2ca02c">+{g:.2f}</text>')
    parts.append(f'<text x="{pad_l + 4}" y="{pad_t - 4}" font-size="9" fill="#333">— l_k</text>'
                 f'<text x="{pad_l + 44}" y="{pad_t - 4}" font-size="9" fill="#2a9d8f">- - watermark h_k</text>'
                 f'<text x="{pad_l + 140}" y="{pad_t - 4}" font-size="9" fill="#2ca02c">● new record (g_k &gt; 0)'
                 f'</text>')
    parts.append("</svg>")
    return "".join(parts)


def _shade(g: float, scale: float) -> str:
    a = 0.0 if g <= 0 else min(1.0, 0.15 + 0.85 * g / scale)
    return f"rgba(44,160,44,{a:.3f})"


def _example_html(ex: CreditExample, scale: float) -> str:
    e = html.escape
    verdict = "" if ex.correct is None else (' <span class="ok">correct</span>' if ex.correct
                                              else ' <span class="bad">wrong</span>')
    pred = "" if ex.predicted is None and ex.correct is None else \
        f"<div><b>model answer:</b> {e(str(ex.predicted))}{verdict}</div>"
    img = _image_uri(ex.image)
    img_html = f'<img class="scene" src="{img}" alt="scene" width="112" height="112">' if img else ""
    K = len(ex.steps) if ex.l else 0
    rows = []
    if ex.l:
        rows.append(f'<tr><td class="k">0</td><td class="st muted">(no reasoning yet: prompt + probe)</td>'
                    f'<td class="num">{ex.l[0]:.3f}</td><td class="num">{ex.watermark[0]:.3f}</td>'
                    f'<td class="num">–</td></tr>')
    for k, text in enumerate(ex.steps[:K], start=1):
        g = ex.gains[k - 1] if k - 1 < len(ex.gains) else 0.0
        lk = ex.l[k] if k < len(ex.l) else float("nan")
        hk = ex.watermark[k] if k < len(ex.watermark) else float("nan")
        rows.append(f'<tr><td class="k">{k}</td><td class="st" style="background:{_shade(g, scale)}">'
                    f'{e(text.strip())}</td><td class="num">{lk:.3f}</td><td class="num">{hk:.3f}</td>'
                    f'<td class="num">{g:.3f}</td></tr>')
    table = ('<table class="steps"><tr><th>k</th><th>step S_k (shaded by its gain g_k)</th><th>l_k</th>'
             '<th>h_k</th><th>g_k</th></tr>' + "".join(rows) + "</table>") if rows else \
        '<div class="muted">No think span found: K = 0, so R_proc = 0 and no step gets process credit.</div>'
    r_proc = sum(ex.gains)
    note = f'<div class="muted">{e(ex.note)}</div>' if ex.note else ""
    return (f'<div class="card"><h3>{e(ex.title)}</h3><div class="top">{img_html}<div class="meta">'
            f"<div><b>question:</b> {e(ex.question)}</div><div><b>gold answer:</b> {e(ex.gold)}</div>{pred}"
            f"<div><b>K</b> = {K}, <b>R_proc</b> = Σ g_k = {r_proc:.3f}</div>{note}</div>"
            f"{l_curve_svg(ex.l, ex.watermark, ex.gains)}</div>{table}"
            f'<details><summary>raw completion</summary><pre>{e(ex.completion)}</pre></details></div>')


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ccc;padding-bottom:4px}
h3{font-size:14px;margin:0 0 8px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0;background:#fff}
.top{display:flex;gap:16px;align-items:flex-start;flex-wrap:wrap}
.meta{flex:1;min-width:260px;font-size:13px;line-height:1.5}
.scene{image-rendering:pixelated;border:1px solid #ccc;width:112px;height:112px}
table.steps{border-collapse:collapse;width:100%;margin-top:8px;font-size:13px}
table.steps td,table.steps th{border:1px solid #e3e3e3;padding:4px 6px;vertical-align:top}
table.steps th{background:#f3f3f3;text-align:left}
td.num{text-align:right;font-family:monospace;white-space:nowrap;width:60px}
td.k{width:20px;text-align:center;color:#666}
.muted{color:#777} .ok{color:#2ca02c;font-weight:bold} .bad{color:#d62728;font-weight:bold}
pre{white-space:pre-wrap;background:#f7f7f7;padding:6px;font-size:12px}
.legend span{display:inline-block;width:40px;height:12px;margin:0 4px;vertical-align:middle;border:1px solid #ccc}
"""


def write_steps_html(sections: Sequence[CreditSection], out_path: str | Path, *, title: str, intro: str = "") -> Path:
    """One self-contained HTML file (inline CSS, SVG and data-URI images; no scripts, no external assets)."""
    gains = [g for s in sections for ex in s.examples for g in ex.gains if g > 0]
    scale = max(0.05, sorted(gains)[int(0.9 * (len(gains) - 1))] if gains else 1.0)
    e = html.escape
    legend = ('<p class="legend">Shading: <span style="background:#fff"></span> g_k = 0 (no new record) '
              f'<span style="background:{_shade(scale * 0.2, scale)}"></span> small gain '
              f'<span style="background:{_shade(scale, scale)}"></span> g_k ≥ {scale:.2f} nats '
              '(90th percentile of the positive gains on this page)</p>')
    body = [f"<h1>{e(title)}</h1>", intro, legend, "<ul>"]
    body += [f'<li><a href="#s{i}">{e(s.title)}</a> ({len(s.examples)})</li>' for i, s in enumerate(sections)]
    body.append("</ul>")
    for i, s in enumerate(sections):
        body.append(f'<h2 id="s{i}">{e(s.title)}</h2><p>{s.intro}</p>')
        if not s.examples:
            body.append('<p class="muted">(none)</p>')
        body += [_example_html(ex, scale) for ex in s.examples]
    doc = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
           f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(doc, encoding="utf-8")
    return out_path


# --------------------------------------------------------------------------------------------------
# Tables


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed, ``|`` escaped."""

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1; 0 for a single value) of the non-None values; (None, None) if none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_pct(values: Sequence[float | None], digits: int = 1) -> str:
    """``41.5%`` for one value, ``41.5 ± 2.1%`` (mean ± sample std) for several, ``–`` for none."""
    m, s = mean_std(values)
    if m is None:
        return "–"
    if len([v for v in values if v is not None]) == 1:
        return f"{100 * m:.{digits}f}%"
    return f"{100 * m:.{digits}f} ± {100 * s:.{digits}f}%"


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min ({seconds:.0f} s)"
