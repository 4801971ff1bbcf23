"""``vlm-mig score``: which of my reasoning steps carried information?

Reads rows with a prompt, a completion and the gold answer; segments the completion into steps; scores
``l_0..l_K`` in the packed pass; writes the watermark, the gains ``g_k`` and ``R_proc`` per row. With
``explain``, each row also carries, for every k, the exact token ids of the naive sequence
``prefix_k + probe + answer`` (for the variant that gave the max), so anyone can re-check a score with a
plain forward pass: ``l_k`` = mean log-prob of ``input_ids[answer_start:]`` (``answer_score: mean``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_mig.adapter import adapter_for
from vlm_mig.data.loaders import FieldMap, load_jsonl
from vlm_mig.data.schema import DataError, Sample, where
from vlm_mig.fields import bounded
from vlm_mig.mig import (
    L0_CONTEXTS,
    MigOptions,
    ScoreRow,
    blind_l0,
    credited_watermark,
    encode_answers,
    encode_probe,
    first_copy_rows,
    prompt_rows,
    score_rows,
    step_gains,
)
from vlm_mig.processing import PromptTemplate, encode_prompts, tokenizer_of
from vlm_mig.prompts import format_solution
from vlm_mig.steps import StepConfig, segment


@dataclass
class ScoreConfig(MigOptions):
    """Settings of ``vlm-mig score``: the scoring options of a training config's ``mig`` section, plus these."""

    batch_size: int = bounded(8, ge=1)  #: rows encoded and scored together
    #: longest prompt + completion (tokens) a row may have: longer rows are an error naming the row, since the
    #: packed pass holds a [length x length] mask and the copies repeat the answer once per step
    max_tokens: int = bounded(8192, ge=1)
    compare_options: bool = False  #: also report l under every answer score and l_0 under every context


def read_score_rows(path: str | Path, task: str = "text") -> list[Sample]:
    """Input rows: ``question``/``messages``, ``image``/``images``, ``completion``, ``answer``,
    optional ``answer_variants``/``id``. Without ``completion``, a row's ``gold_steps`` are scored as the
    completion (``format_solution``), e.g. the ``data.jsonl`` of ``vlm-mig data clevr``. Errors name the
    file and line."""
    samples = load_jsonl(path, task=task, fields=FieldMap())
    for s in samples:
        loc = s.meta.get("source", where(path))
        completion = s.meta.get("completion")
        if completion is None and s.gold_steps:
            # No completion given: score the gold solution itself, in the SPEC format.
            s.meta["completion"] = completion = format_solution(s.gold_steps, s.answer)
        if not isinstance(completion, str):
            raise DataError(f"{loc}: field 'completion' must be a string (got {type(completion).__name__}); "
                            "give a completion, or gold_steps to score the gold solution")
    return samples


def score_samples(model, processor, samples: list[Sample], cfg: ScoreConfig | None = None,
                  explain: bool = False, progress: bool = True, *, completions: Sequence[str] | None = None,
                  template: PromptTemplate | None = None) -> list[dict[str, Any]]:
    """Score ``completions[i]`` as the answer to ``samples[i]`` (default: each sample's ``meta['completion']``);
    return one output dict per sample (input fields kept). Prompts are built with ``template`` (default: the
    project's default prompt): pass the run's own template, since every l_k is conditioned on the prompt.

    With ``cfg.compare_options`` each row also has ``l_by_answer_score`` (``l`` under every answer score)
    and ``l0_by_context`` (``l_0`` under every l_0 context and answer score), from one extra pass over
    copy 0 alone."""
    cfg = cfg or ScoreConfig()
    template = template or PromptTemplate()
    if completions is None:
        completions = [s.meta["completion"] for s in samples]
    elif len(completions) != len(samples):
        raise ValueError(f"{len(completions)} completions for {len(samples)} samples")
    tok = tokenizer_of(processor)
    probe = encode_probe(tok, cfg.probe)
    step_cfg = StepConfig.of(cfg, atomic_pairs=adapter_for(model).atomic_pairs)
    out: list[dict[str, Any]] = []
    model.eval()
    bar = tqdm(total=len(samples), desc="score", disable=not progress)
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        batch = encode_prompts(processor, chunk, template)
        with torch.no_grad():
            prompts = prompt_rows(model, batch)
            rows, spans = [], []
            for p, s, text in zip(prompts, chunk, completions[start : start + cfg.batch_size]):
                ids = torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.long)
                n_prompt = int(p["prompt_ids"].numel())
                if n_prompt + ids.numel() > cfg.max_tokens:
                    raise DataError(f"row {s.id!r}: {n_prompt} prompt + {ids.numel()} completion tokens exceed the "
                                    f"{cfg.max_tokens} a row may have (vlm-mig score --max-tokens)")
                sp = segment(ids, tok, config=step_cfg)
                rows.append(ScoreRow(completion_ids=ids, cuts=sp.prefix_ends if sp.think else [],
                                     **encode_answers(tok, s.variants, cfg.probe, cfg.opener), **p))
                spans.append(sp)
            scores = score_rows(model, rows, probe, cfg.max_tokens_per_batch, answer_score=cfg.answer_score)
            no_image = (blind_l0(model, processor, chunk, rows, probe, template,
                                 max_tokens_per_batch=cfg.max_tokens_per_batch, answer_score=cfg.answer_score)
                        if cfg.visual_evidence else None)
            other_l0 = _other_l0(model, tok, chunk, rows, probe, cfg) if cfg.compare_options else None
        for i, (s, r, sp, sc) in enumerate(zip(chunk, rows, spans, scores)):
            rec = _row_output(s, r, sp, sc, probe, cfg, explain, None if no_image is None else no_image[i])
            if other_l0 is not None and sc.l.numel():
                rec["l_by_answer_score"] = {m: [round(float(x), 6) for x in v] for m, v in sc.l_by_score.items()}
                rec["l0_by_context"] = {cfg.l0_context: {m: round(float(v[0]), 6) for m, v in sc.l_by_score.items()},
                                        **other_l0[i]}
            out.append(rec)
        bar.update(len(chunk))
    bar.close()
    return out


def _other_l0(model, tok, samples, rows, probe, cfg: ScoreConfig) -> list[dict]:
    """l_0 under the l_0 context(s) ``cfg`` does not use, every answer score, from copy 0 alone."""
    out: list[dict] = [{} for _ in rows]
    for ctx in L0_CONTEXTS:
        if ctx == cfg.l0_context:
            continue
        opener = cfg.l0_opener if ctx == "opener" else None
        alt = [replace(r, l0_probes=encode_answers(tok, s.variants, cfg.probe, opener)["l0_probes"])
               for r, s in zip(rows, samples)]
        which = [i for i, r in enumerate(alt) if r.cuts]
        for i, sc in zip(which, score_rows(model, first_copy_rows([alt[i] for i in which]), probe,
                                           cfg.max_tokens_per_batch)):
            out[i][ctx] = {m: round(float(v[0]), 6) for m, v in sc.l_by_score.items()}
    return out


def _row_output(s: Sample, row: ScoreRow, sp, sc, probe, cfg: ScoreConfig, explain: bool,
                l0_no_image: float | None) -> dict:
    l = sc.l.float().cpu()
    K = l.numel() - 1
    h = credited_watermark(l, min_gain=cfg.min_gain, records=cfg.records) if K >= 0 else l
    gains = (step_gains(l, use_watermark=cfg.watermark, min_gain=cfg.min_gain, records=cfg.records) if K >= 1
             else l.new_zeros(0))
    rec: dict[str, Any] = {"id": s.id}
    rec.update(
        steps=sp.texts,
        l=[round(float(x), 6) for x in l],
        watermark=[round(float(x), 6) for x in h],
        gains=[round(float(x), 6) for x in gains],
        process_reward=round(float(gains.sum()), 6),
    )
    if l0_no_image is not None and K >= 0:
        rec["visual_evidence_gain"] = round(float(l[0]) - l0_no_image, 6)
    if explain:
        best = sc.l_variants.argmax(-1).tolist() if K >= 0 else []
        prompt = row.prompt_ids.tolist()
        seqs = []
        for k, c in enumerate(row.cuts):
            j = best[k]
            ctx = row.l0_probes if k == 0 and row.l0_probes is not None else row.probes
            prefix = prompt + row.completion_ids[:c].tolist() + (probe if ctx is None else ctx[j]).tolist()
            seqs.append({"input_ids": prefix + row.variants[j].tolist(), "answer_start": len(prefix),
                         "variant": s.variants[j]})
        rec["sequences"] = seqs
    return rec


def score_file(model_dir: str | Path, data: str | Path, out: str | Path, explain: bool = False,
               cfg: ScoreConfig | None = None, task: str = "text") -> int:
    """Score every row of ``data`` (jsonl) with the model at ``model_dir``; write ``out`` (jsonl). Prompts use
    the template the checkpoint was trained with (its ``run_config.json``), else the default."""
    from vlm_mig.evaluation import template_from_run_config
    from vlm_mig.models import load_model, load_processor

    samples = read_score_rows(data, task=task)
    with open(data, encoding="utf-8-sig") as f:
        inputs = [json.loads(line) for line in f if line.strip()]  # already validated line by line above
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    results = score_samples(model, processor, samples, cfg, explain=explain,
                            template=template_from_run_config(model_dir))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for row, rec in zip(inputs, results):
            f.write(json.dumps({**row, **rec}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(results)
