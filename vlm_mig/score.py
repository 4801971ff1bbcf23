"""``vlm-mig score``: which of my reasoning steps carried information?

Reads rows with a prompt, a completion and the gold answer; segments the completion into steps; scores
``l_0..l_K`` in the packed pass; writes the watermark, the gains ``g_k`` and ``R_proc`` per row. With
``explain``, each row also carries, for every k, the exact token ids of the naive sequence
``prefix_k + probe + answer`` (for the variant that gave the max), so anyone can re-check a score with a
plain forward pass: ``l_k`` = mean log-prob of ``input_ids[answer_start:]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_mig.data.loaders import FieldMap, load_jsonl
from vlm_mig.data.schema import DataError, Sample, where
from vlm_mig.mig import ScoreRow, prompt_rows, score_rows, step_gains, watermark
from vlm_mig.processing import PromptTemplate, encode_prompts, is_processor, tokenizer_of
from vlm_mig.prompts import DEFAULT_PROBE, format_solution
from vlm_mig.steps import StepConfig, segment


@dataclass
class ScoreConfig:
    """Settings of ``vlm-mig score`` (the MIG section of a training config uses the same names)."""

    probe: str = DEFAULT_PROBE  #: text that closes the reasoning and opens the answer
    min_step_chars: int = 8  #: steps shorter than this merge into their neighbour
    max_steps: int = 16  #: cap on K (the tail merges into the last step)
    batch_size: int = 8  #: rows encoded and scored together
    max_tokens_per_batch: int = 16384  #: bound on padded tokens per packed forward
    visual_evidence: bool = False  #: also score l_0 with the images removed (language-prior check)


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
                  explain: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Score each sample's ``meta['completion']``; return one output dict per sample (input fields kept)."""
    cfg = cfg or ScoreConfig()
    tok = tokenizer_of(processor)
    probe = torch.tensor(tok.encode(cfg.probe, add_special_tokens=False))
    step_cfg = StepConfig(min_step_chars=cfg.min_step_chars, max_steps=cfg.max_steps)
    out: list[dict[str, Any]] = []
    model.eval()
    bar = tqdm(total=len(samples), desc="score", disable=not progress)
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        batch = encode_prompts(processor, chunk, PromptTemplate())
        with torch.no_grad():
            prompts = prompt_rows(model, batch)
            rows, spans = [], []
            for p, s in zip(prompts, chunk):
                ids = torch.tensor(tok.encode(s.meta["completion"], add_special_tokens=False), dtype=torch.long)
                sp = segment(ids, tok, config=step_cfg)
                variants = [torch.tensor(tok.encode(v, add_special_tokens=False)) for v in s.variants]
                rows.append(ScoreRow(completion_ids=ids, cuts=sp.prefix_ends if sp.think else [], variants=variants,
                                     **p))
                spans.append(sp)
            scores = score_rows(model, rows, probe, cfg.max_tokens_per_batch)
            no_image = _visual_evidence(model, processor, chunk, rows, probe, cfg) if cfg.visual_evidence else None
        for i, (s, r, sp, sc) in enumerate(zip(chunk, rows, spans, scores)):
            out.append(_row_output(s, r, sp, sc, probe, explain, None if no_image is None else no_image[i]))
        bar.update(len(chunk))
    bar.close()
    return out


def _visual_evidence(model, processor, samples, rows, probe, cfg) -> list[float | None]:
    """l_0 with every image removed from the prompt (None for samples without images)."""
    if not is_processor(processor):
        return [None] * len(samples)
    blind = [Sample(id=s.id, answer=s.answer, task=s.task, answer_variants=s.answer_variants,
                    question=s.question or "", images=[]) if s.images and s.question is not None else None
             for s in samples]
    todo = [i for i, b in enumerate(blind) if b is not None]
    result: list[float | None] = [None] * len(samples)
    if not todo:
        return result
    batch = encode_prompts(processor, [blind[i] for i in todo], PromptTemplate())
    prompts = prompt_rows(model, batch)
    blind_rows = [ScoreRow(completion_ids=rows[i].completion_ids, cuts=rows[i].cuts[:1], variants=rows[i].variants,
                           **p) for i, p in zip(todo, prompts)]
    for i, sc in zip(todo, score_rows(model, blind_rows, probe, cfg.max_tokens_per_batch)):
        result[i] = float(sc.l[0]) if sc.l.numel() else None
    return result


def _row_output(s: Sample, row: ScoreRow, sp, sc, probe, explain: bool, l0_no_image: float | None) -> dict:
    l = sc.l.float().cpu()
    K = l.numel() - 1
    h = watermark(l) if K >= 0 else l
    gains = step_gains(l) if K >= 1 else l.new_zeros(0)
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
            prefix = prompt + row.completion_ids[:c].tolist() + probe.tolist()
            seqs.append({"input_ids": prefix + row.variants[best[k]].tolist(), "answer_start": len(prefix),
                         "variant": s.variants[best[k]]})
        rec["sequences"] = seqs
    return rec


def score_file(model_dir: str | Path, data: str | Path, out: str | Path, explain: bool = False,
               cfg: ScoreConfig | None = None, task: str = "text") -> int:
    """Score every row of ``data`` (jsonl) with the model at ``model_dir``; write ``out`` (jsonl)."""
    from vlm_mig.models import load_model, load_processor

    samples = read_score_rows(data, task=task)
    with open(data, encoding="utf-8-sig") as f:
        inputs = [json.loads(line) for line in f if line.strip()]  # already validated line by line above
    model = load_model(model_dir)
    processor = load_processor(model_dir)
    results = score_samples(model, processor, samples, cfg, explain=explain)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w") as f:
        for row, rec in zip(inputs, results):
            f.write(json.dumps({**row, **rec}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return len(results)
