"""``vlm-mig score``: which of my reasoning steps carried information?

Reads rows with a prompt, a completion and the gold answer, and runs the RL step's own segment and score stages
on them (``vlm_mig.rl.stages``): segments the completion into steps; scores ``l_0..l_K`` in the packed pass;
writes the watermark, the gains ``g_k`` and ``R_proc`` per row. With
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
from vlm_mig.forward import ScoreRow, first_copy_rows, score_rows
from vlm_mig.mig import L0_CONTEXTS, MigOptions, encode_answers, encode_probe
from vlm_mig.processing import PromptTemplate, encode_prompts, tokenizer_of
from vlm_mig.prompts import format_solution
from vlm_mig.rl import stages
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.stages import Scorer
from vlm_mig.rollout.base import eos_and_pad, given_rollouts
from vlm_mig.steps import StepConfig


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
    scorer = Scorer(model=model, processor=processor, template=template, mig=cfg, probe_ids=probe, step_scores=True,
                    old_logprobs=False)
    pad_id = eos_and_pad(model, processor)[1]
    out: list[dict[str, Any]] = []
    model.eval()
    bar = tqdm(total=len(samples), desc="score", disable=not progress)
    for start in range(0, len(samples), cfg.batch_size):
        chunk = samples[start : start + cfg.batch_size]
        texts = list(completions[start : start + cfg.batch_size])
        prompts = encode_prompts(processor, chunk, template)
        ids = [torch.tensor(tok.encode(text, add_special_tokens=False), dtype=torch.long) for text in texts]
        for s, n_prompt, c in zip(chunk, prompts.attention_mask.sum(-1).tolist(), ids):
            if n_prompt + c.numel() > cfg.max_tokens:
                raise DataError(f"row {s.id!r}: {n_prompt} prompt + {c.numel()} completion tokens exceed the "
                                f"{cfg.max_tokens} a row may have (vlm-mig score --max-tokens)")
        # The RL step's own segment and score stages, on completions that were given instead of sampled.
        batch = RLBatch(rollouts=given_rollouts(chunk, prompts, ids, texts, pad_id))
        stages.segment(batch, tok, step_cfg)
        scored = stages.score(batch, scorer)
        other_l0 = _other_l0(model, tok, chunk, scored.rows, probe, cfg) if cfg.compare_options else None
        for i, s in enumerate(chunk):
            sc = scored.scores[i]
            rec = _row_output(s, batch, i, scored.rows[i], sc, probe, cfg, explain)
            if other_l0 is not None and sc.l.numel():
                rec["l_by_answer_score"] = {m: [round(float(x), 6) for x in v] for m, v in sc.l_by_score.items()}
                rec["l0_by_context"] = {cfg.l0_context: {m: round(float(v[0]), 6) for m, v in sc.l_by_score.items()},
                                        **other_l0[i]}
            out.append(rec)
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
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


def _row_output(s: Sample, batch: RLBatch, i: int, row: ScoreRow, sc, probe, cfg: ScoreConfig,
                explain: bool) -> dict:
    """Row ``i``'s record: its steps and what the score stage wrote into the batch (l, watermark, gains,
    R_proc, the visual evidence), and with ``explain`` the naive sequence behind every l_k."""
    n = len(row.cuts)  # K + 1, or 0 without a think block
    l = batch.l[i, :n] if batch.l is not None else torch.zeros(0)
    rec: dict[str, Any] = {"id": s.id}
    rec.update(
        steps=batch.spans[i].texts,
        l=[round(float(x), 6) for x in l],
        watermark=[round(float(x), 6) for x in (batch.watermark[i, :n] if n else l)],
        gains=[round(float(x), 6) for x in (batch.gains[i, : n - 1] if n > 1 else l[:0])],
        process_reward=round(float(batch.r_proc[i]), 6),
    )
    if batch.l0_blind[i] is not None and n:
        rec["visual_evidence_gain"] = round(float(l[0]) - batch.l0_blind[i], 6)
    if explain:
        best = sc.l_variants.argmax(-1).tolist() if n else []
        prompt = row.prompt.ids.tolist()
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
