"""The training loop on accelerate: ``vlm-mig sft`` and ``vlm-mig train`` (SPEC section 6).

One RL step: sample G completions per prompt -> segment steps -> (packed scoring: every l_k, and old
log-probs when ``num_iterations > 1``) -> rewards -> advantages -> ``num_iterations`` passes of micro-batched
updates with gradient accumulation and clipping. All state lives here; every formula lives in the pure
modules (``mig``, ``rewards``, ``advantages``, ``losses``).

Determinism: prompts of step ``s`` are a fixed slice of a seeded permutation, and each rollout is sampled
from its own seeded stream (``rollout.sampling``), so a run with 2 processes equals a 1-process run with
the same global batch, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_mig import checkpoint as ckpt
from vlm_mig.adapter import adapter_for
from vlm_mig.advantages import (
    compute_advantages,
    group_normalize,
    process_token_mask,
    step_normalize,
    token_advantages,
    within_group_credit,
)
from vlm_mig.config import Config, ConfigError, save_config
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.data.sources import load_source
from vlm_mig.losses import Denominators, sft_gate, total_loss
from vlm_mig.mig import (
    ScoreRow,
    blind_l0,
    encode_answers,
    encode_probe,
    packed_forward,
    pad_logprobs,
    pad_rows,
    prompt_rows,
    rollout_rows,
    score_rows,
    step_gains,
)
from vlm_mig.models import load_model, load_processor, tiny_model_dir
from vlm_mig.processing import PromptTemplate, encode_prompts, is_processor, tokenizer_of
from vlm_mig.prompts import SYSTEM_PROMPT, format_solution
from vlm_mig.rewards import RewardSpec, compute_rewards
from vlm_mig.rollout import Rollouts, make_engine, select_prompts
from vlm_mig.rollout.sampling import rollout_seed
from vlm_mig.steps import StepConfig, cot_mask, segment_batch, step_index

logger = logging.getLogger(__name__)
EMPTY = torch.zeros(0, dtype=torch.long)


class PolicyForward(nn.Module):
    """The model behind one ``nn.Module.forward``, so DDP/DeepSpeed see every training pass.

    ``forward(prompts, rows)`` computes the prompts' image features and the completion log-probs of
    ``rows`` (``ScoreRow`` specs whose prompt fields are filled in here) in one packed pass.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, prompts, rows: list[dict[str, Any]]) -> list[torch.Tensor]:
        pieces = prompt_rows(self.model, prompts)
        score = [ScoreRow(completion_ids=r["completion_ids"], cuts=[], variants=[], **pieces[r["prompt"]])
                 for r in rows]
        return [s.completion_logprobs for s in packed_forward(self.model, score, EMPTY)]


def template_of(cfg: Config) -> PromptTemplate:
    system = SYSTEM_PROMPT if cfg.data.system_prompt == "default" else cfg.data.system_prompt
    return PromptTemplate(system_prompt=system, question_suffix=cfg.data.question_suffix)


def resolve_model_path(cfg: Config) -> str:
    """``tiny`` -> the embedded default (vision warm-up included), built once into the cache; anything else as
    given."""
    if cfg.model.name_or_path != "tiny":
        return cfg.model.name_or_path
    return str(tiny_model_dir(cfg.model.tiny_arch, cfg.model.tiny_warmup_steps))


class Trainer:
    """``mode="rl"`` runs ``vlm-mig train``; ``mode="sft"`` the supervised warm start on gold solutions."""

    def __init__(self, cfg: Config, mode: str = "rl", resume: bool | str = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        if mode not in ("rl", "sft"):
            raise ValueError(f"mode must be rl or sft, got {mode!r}")
        self.cfg, self.mode = cfg, mode
        t = cfg.trainer
        if t.threads:
            torch.set_num_threads(t.threads)
        self.acc = Accelerator(
            # Without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun join over gloo
            # (DeepSpeed picks its own CPU backend, and cpu=True would switch it off).
            cpu=not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true",
            mixed_precision="bf16" if t.bf16 else "no",
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.out = Path(t.output_dir)
        self.is_main = self.acc.is_main_process
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        self.base_path = resolve_model_path(cfg)
        resume_from = self._find_resume(resume)
        model_path = str(resume_from) if resume_from and cfg.model.lora_r == 0 else self.base_path
        self.processor = load_processor(model_path, trust_remote_code=cfg.model.trust_remote_code)
        self.tok = tokenizer_of(self.processor)
        model = load_model(model_path, dtype=cfg.model.dtype, attn_implementation=cfg.model.attn_implementation,
                           trust_remote_code=cfg.model.trust_remote_code)
        if getattr(model.config, "_attn_implementation", None) == "flash_attention_2":
            raise ConfigError("model.attn_implementation: flash_attention_2 cannot take the float 4D block mask "
                              "of the packed training and scoring passes; use sdpa (default) or eager")
        self.adapter = adapter_for(model)
        model = self._prepare_model(model, resume_from)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=(o.adam_beta1,
                                                                                                o.adam_beta2))
        from transformers import get_scheduler

        updates = t.max_steps * (t.num_iterations if mode == "rl" else 1)
        self.scheduler = get_scheduler(o.schedule, self.optimizer, num_warmup_steps=o.warmup_steps,
                                       num_training_steps=updates)
        self.deepspeed = self.acc.state.deepspeed_plugin is not None
        if self.deepspeed:
            self._configure_deepspeed()
        self.policy, self.optimizer, self.scheduler = self.acc.prepare(PolicyForward(model), self.optimizer,
                                                                       self.scheduler)
        self.step = 0
        if resume_from is not None:
            if self.deepspeed:
                self.policy.load_checkpoint(str(resume_from / "deepspeed"), tag="state", load_module_strict=False)
                state = json.loads((resume_from / ckpt.STATE_FILE).read_text())
            else:
                state = ckpt.load_trainer_state(resume_from, self.optimizer, self.scheduler)
            self.step = state["step"]
            ckpt.load_rng(resume_from, self.acc.process_index)
            logger.info("resumed from %s at step %d", resume_from, self.step)

        self.template = template_of(cfg)
        self.ref_model = None
        if mode == "rl" and cfg.loss.kl_coef > 0:
            self.ref_model = self._load_reference()
        self.engine = make_engine(cfg.rollout, self.model, self.processor, self.template) if mode == "rl" else None
        self.step_cfg = StepConfig.of(cfg.mig, atomic_pairs=self.adapter.atomic_pairs)
        self.probe = encode_probe(self.tok, cfg.mig.probe)
        self.reward_specs = self._reward_specs()
        with self.acc.main_process_first():  # synthetic sets are generated once, by the main process
            self.train_data = self._load_data(cfg.data.train, "train")
            self.val_data = (self._load_data(cfg.data.validation, "validation")
                             if cfg.data.validation and cfg.trainer.eval_steps else [])
        if mode == "sft":
            missing = [s.id for s in self.train_data if not s.gold_steps]
            if missing:
                raise DataError(f"vlm-mig sft needs gold_steps on every training row; missing on {len(missing)} "
                                f"rows, e.g. {missing[:3]}")
        self.log = RunLog(self.out, cfg, enabled=self.is_main)
        if resume_from is not None:
            # Steps after the checkpoint will run again: drop their log lines so each step appears once.
            self.log.truncate_after(self.step, rank_files=f"prompts_rank{self.acc.process_index}.jsonl")
        if self.is_main:
            save_config(cfg, self.out / "config.yaml")

    # ----------------------------------------------------------------------------------------------
    # Setup helpers

    def _find_resume(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        if isinstance(resume, str) and resume not in ("auto", "latest"):
            path = Path(resume)
            if not (path / ckpt.STATE_FILE).is_file():
                raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint folder")
            return path
        return ckpt.latest_checkpoint(self.cfg.trainer.output_dir)

    def _prepare_model(self, model: nn.Module, resume_from: Path | None) -> nn.Module:
        m = self.cfg.model
        tower, patch_embed = self.adapter.vision_tower(model), self.adapter.patch_embedding(model)
        if tower is not None and m.freeze_vision:
            tower.requires_grad_(False)
        elif patch_embed is not None and m.freeze_patch_embed:
            patch_embed.requires_grad_(False)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if m.lora_r > 0:
            from peft import LoraConfig, PeftModel, get_peft_model

            if resume_from is not None:
                model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
            else:
                model = get_peft_model(model, LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha,
                                                         lora_dropout=m.lora_dropout,
                                                         target_modules=m.lora_target_modules))
        return model.to(self.acc.device)

    def _configure_deepspeed(self) -> None:
        """No dataloader goes through ``prepare``, so DeepSpeed's batch sizes are set here. The micro-batches of
        one update are marked as accumulation by ``_backward`` (one optimizer step at the last), so DeepSpeed's
        own accumulation count stays 1 and it never rescales our globally normalised losses."""
        t = self.cfg.trainer
        ds = self.acc.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
        ds["gradient_accumulation_steps"] = 1
        ds["train_batch_size"] = t.micro_batch_size * self.acc.num_processes
        if self.cfg.optim.max_grad_norm:
            ds["gradient_clipping"] = self.cfg.optim.max_grad_norm

    def _load_reference(self) -> nn.Module:
        ref = load_model(self.base_path, dtype=self.cfg.model.dtype)
        ref.requires_grad_(False)
        if self.deepspeed and self.acc.state.deepspeed_plugin.zero_stage == 3:
            import deepspeed

            # Under ZeRO-3 the weights are partitioned: only an engine gathers them for a forward.
            ds = self.acc.state.deepspeed_plugin.deepspeed_config
            conf = {"train_micro_batch_size_per_gpu": ds["train_micro_batch_size_per_gpu"],
                    "zero_optimization": {"stage": 3}, "bf16": {"enabled": self.cfg.trainer.bf16}}
            # Keep the engine alive (it owns the gathering hooks) but call the module: an engine's own
            # `config` attribute is DeepSpeed's, not the model's.
            self._ref_engine = deepspeed.initialize(model=ref, config=conf)[0]
            ref = self._ref_engine.module
        else:
            ref = ref.to(self.acc.device)
        ref.eval()  # (a DeepSpeed engine's eval() returns None, so not chained)
        return ref

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch; only ``last`` ends the update (gradient sync / DeepSpeed step)."""
        if self.deepspeed:
            self.acc.gradient_state._set_sync_gradients(last)
            try:
                self.acc.backward(loss)
            finally:
                self.acc.gradient_state._set_sync_gradients(True)
            return
        with self.acc.no_sync(self.policy) if not last else contextlib.nullcontext():
            self.acc.backward(loss)

    def _reward_specs(self) -> list[RewardSpec]:
        r = self.cfg.reward
        specs = [RewardSpec("accuracy", r.accuracy_weight, {"fallback": r.fallback_extraction}),
                 RewardSpec("format", r.format_weight)]
        for item in r.plugins:
            name, _, weight = item.partition("=")
            specs.append(RewardSpec(name, float(weight) if weight else 1.0))
        return specs

    def _load_data(self, spec: str, split: str) -> list[Sample]:
        d = self.cfg.data
        val = split == "validation"
        return load_source(
            spec, task=d.task, cache_dir=self.out / "data", fmt=d.format, image_root=d.image_root,
            n=d.validation_n if val else d.synthetic_n, seed=d.synthetic_seed + (1000 if val else 0),
            condition=d.synthetic_condition, max_objects=d.max_objects, arithmetic_steps=tuple(d.arithmetic_steps),
            skip_bad=d.skip_bad, limit=self.cfg.eval.limit if val else d.limit,
        )

    # ----------------------------------------------------------------------------------------------
    # Data order: step s uses a fixed slice of a seeded permutation (per epoch), split across processes

    def batch_for(self, step: int, per_process: int) -> tuple[list[Sample], list[int]]:
        world, rank = self.acc.num_processes, self.acc.process_index
        n = len(self.train_data)
        if n == 0:
            raise DataError("the training set is empty")
        start = (step * world + rank) * per_process
        out, seeds = [], []
        for g in range(start, start + per_process):
            epoch, pos = divmod(g, n)
            order = list(range(n))
            random.Random(self.cfg.trainer.seed * 1_000_003 + epoch).shuffle(order)
            out.append(self.train_data[order[pos]])
            seeds.append(rollout_seed(self.cfg.trainer.seed, step, g))
        return out, seeds

    # ----------------------------------------------------------------------------------------------
    # The loop

    def train(self) -> dict[str, float]:
        t = self.cfg.trainer
        from tqdm.auto import tqdm

        bar = tqdm(total=t.max_steps, initial=self.step, desc=t.progress_desc or self.mode,
                   disable=not (t.progress and self.is_main))
        last: dict[str, float] = {}
        if self.step == 0 and self.val_data and self.mode == "rl":
            self.log.write(0, self.validate())
        while self.step < t.max_steps:
            metrics = self.rl_step() if self.mode == "rl" else self.sft_step()
            self.step += 1
            last = metrics
            if self.step % t.log_steps == 0 or self.step == t.max_steps:
                self.log.write(self.step, metrics)
            if self.val_data and t.eval_steps and (self.step % t.eval_steps == 0 or self.step == t.max_steps):
                last.update(self.validate())
                self.log.write(self.step, {k: v for k, v in last.items() if k.startswith("val/")})
            if self.step % t.save_steps == 0 or self.step == t.max_steps:
                self.save()
            bar.update(1)
            bar.set_postfix({k.split("/")[-1]: round(v, 3) for k, v in metrics.items()
                             if k in ("reward/total", "reward/accuracy", "loss")})
        bar.close()
        self.log.close()
        return last

    def rl_step(self) -> dict[str, float]:
        cfg, dev = self.cfg, self.acc.device
        G = cfg.rollout.num_generations
        times: dict[str, float] = {}
        prompts, seeds = self.batch_for(self.step, cfg.trainer.prompts_per_step)
        self._record_prompts(prompts)

        t0 = time.perf_counter()
        with self.acc.autocast():
            r = self.engine.generate(prompts, seeds=seeds)
        times["generate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        N, T = r.completion_ids.shape
        lengths = r.completion_lengths
        spans = segment_batch(r.completion_ids, self.tok, lengths=lengths.tolist(), config=self.step_cfg)
        m_full = r.completion_mask.bool()
        m_cot = cot_mask(spans, T) & m_full
        rows_samples = [r.sample_of(i) for i in range(N)]
        rew = compute_rewards(
            [r.prompts.texts[int(g)] for g in r.group], r.texts, self.reward_specs,
            answer=[s.variants for s in rows_samples], task=[s.task for s in rows_samples],
        )
        r_out = torch.tensor(rew.total, dtype=torch.float32)
        acc = torch.tensor([v or 0.0 for v in rew.components["accuracy"]])
        fmt = torch.tensor([v or 0.0 for v in rew.components["format"]])
        times["rewards"] = time.perf_counter() - t0

        # Packed scoring: every l_k, and old log-probs when the update makes several passes.
        t0 = time.perf_counter()
        m = cfg.mig
        need_mig = (cfg.loss.alpha != 0 or cfg.loss.sft_gate_proc or cfg.advantage.process_credit == "step"
                    or m.visual_evidence)
        need_old = cfg.trainer.num_iterations > 1
        K = torch.tensor([sp.K for sp in spans])
        r_proc = torch.zeros(N)
        gains = torch.zeros(N, 0)
        old_logp = None
        l_pad = None
        evidence: list[float | None] = [None] * N
        if need_mig or need_old:
            cuts = [sp.prefix_ends if (need_mig and sp.think) else [] for sp in spans]
            opener = m.l0_opener if m.l0_context == "opener" else None
            per_group: dict[int, dict] = {}  # the G rollouts of a prompt share its answer forms
            for i, s in enumerate(rows_samples):
                if need_mig and int(r.group[i]) not in per_group:
                    per_group[int(r.group[i])] = encode_answers(self.tok, s.variants, m.probe, opener)
            answers = [per_group[int(g)] if need_mig else {"variants": []} for g in r.group]
            with torch.no_grad(), self.acc.autocast():
                rows = rollout_rows(self.model, r, cuts, answers)
                scores = score_rows(self.model, rows, self.probe, m.max_tokens_per_batch, answer_score=m.answer_score)
                if m.visual_evidence and is_processor(self.processor):
                    evidence = blind_l0(self.model, self.processor, r.samples, rows, self.probe, self.template,
                                        row_sample=[int(g) for g in r.group],
                                        max_tokens_per_batch=m.max_tokens_per_batch, answer_score=m.answer_score,
                                        min_pixels=cfg.rollout.min_pixels, max_pixels=cfg.rollout.max_pixels)
            if need_mig:
                kmax = max(1, max(len(c) for c in cuts))
                l_pad = torch.zeros(N, kmax)
                valid = torch.zeros(N, kmax, dtype=torch.bool)
                for i, s in enumerate(scores):
                    n = s.l.numel()
                    l_pad[i, :n] = s.l.cpu()
                    valid[i, :n] = True
                gains = step_gains(l_pad, valid, use_watermark=m.watermark, min_gain=m.min_gain)
                r_proc = gains.sum(-1)
            if need_old:
                old_logp = pad_logprobs(scores, T)
        ref_logp = None
        if self.ref_model is not None:
            with torch.no_grad(), self.acc.autocast():
                ref = score_rows(self.ref_model, rollout_rows(self.ref_model, r), EMPTY, cfg.mig.max_tokens_per_batch)
            ref_logp = pad_logprobs(ref, T)
        times["score"] = time.perf_counter() - t0

        adv = self._advantages(r_out, r_proc, m_full, m_cot, G, gains, K, spans, T)
        gate = sft_gate(acc, fmt, r_proc, gate_proc=cfg.loss.sft_gate_proc, gates=cfg.loss.sft_gates)
        m_proc = process_token_mask(m_full, m_cot, cfg.advantage.process_mask)
        den = self._global_denominators(m_proc, m_full, gate)

        t0 = time.perf_counter()
        diags: list[tuple[int, dict[str, torch.Tensor]]] = []
        grad_norm = 0.0
        for _ in range(cfg.trainer.num_iterations):
            chunks = list(range(0, N, cfg.trainer.micro_batch_size))
            for c_i, start in enumerate(chunks):
                idx = list(range(start, min(N, start + cfg.trainer.micro_batch_size)))
                logp = self._logp(r, idx, T)
                sl = torch.tensor(idx)
                loss, diag = total_loss(
                    logp, None if old_logp is None else old_logp[sl].to(dev), m_full[sl].to(dev), m_proc[sl].to(dev),
                    adv.tok_out[sl].to(dev), adv.tok_proc[sl].to(dev), cfg.loss,
                    ref_logp=None if ref_logp is None else ref_logp[sl].to(dev),
                    acc=acc[sl].to(dev), fmt=fmt[sl].to(dev), r_proc=r_proc[sl].to(dev), denominators=den,
                )
                # DDP averages gradients over processes; the denominators are global, so undo the average.
                self._backward(loss * self.acc.num_processes, last=c_i == len(chunks) - 1)
                diags.append((len(idx), diag))
            grad_norm = self._optimizer_step()
        times["update"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.engine.sync_weights(self.model)  # the next rollouts sample from the updated policy
        times["sync"] = time.perf_counter() - t0

        n_tokens = int(r.attention_mask.sum())
        metrics = {
            "reward/total": float(r_out.mean()),
            "reward/accuracy": float(acc.mean()),
            "reward/format": float(fmt.mean()),
            "mig/process_reward": float(r_proc.mean()),
            "mig/K": float(K.float().mean()),
            "mig/l0": float(l_pad[:, 0].mean()) if l_pad is not None else float("nan"),
            **_signal_metrics(l_pad, gains, r_proc, G, evidence),
            "adv/zero_std_out": adv.zero_std_out,
            "adv/zero_std_proc": adv.zero_std_proc,
            "adv/below_min_spread": adv.below_min_spread,
            "adv/proc_abs_mean": float(adv.seq_proc.abs().mean()),
            "length/completion": float(lengths.float().mean()),
            "length/cot": float(m_cot.sum(-1).float().mean()),
            "optim/grad_norm": grad_norm,
            "optim/lr": float(self.scheduler.get_last_lr()[0]),
            **{f"time/{k}": v for k, v in times.items()},
            "time/tokens_per_s": n_tokens / max(1e-9, sum(times.values())),
        }
        metrics.update(_average_diags(diags, cfg.trainer.num_iterations))
        if need_mig:
            credit = within_group_credit(acc, r_proc, adv.seq_out, adv.seq_proc, G)
            metrics.update({f"credit/{k}": v for k, v in credit.items()})
        metrics = self._reduce_metrics(metrics)
        if self.is_main and self.cfg.trainer.sample_log_steps and self.step % self.cfg.trainer.sample_log_steps == 0:
            self.log.samples(self.step + 1, r, spans, l_pad, rew, r_proc, gains, evidence)
        return metrics

    def sft_step(self) -> dict[str, float]:
        cfg, dev = self.cfg, self.acc.device
        samples, _ = self.batch_for(self.step, cfg.trainer.sft_batch_size)
        self._record_prompts(samples)
        t0 = time.perf_counter()
        prompts = encode_prompts(self.processor, samples, self.template, cfg.rollout.max_prompt_length,
                                 cfg.rollout.min_pixels, cfg.rollout.max_pixels)
        eos = self.tok.eos_token or ""
        comps = [torch.tensor(self.tok.encode(format_solution(s.gold_steps, s.answer) + eos, add_special_tokens=False))
                 for s in samples]
        total_tokens = sum(c.numel() for c in comps)
        world_tokens = self._reduce_sum(float(total_tokens))
        loss_sum = 0.0
        chunks = list(range(0, len(samples), cfg.trainer.micro_batch_size))
        for c_i, start in enumerate(chunks):
            idx = list(range(start, min(len(samples), start + cfg.trainer.micro_batch_size)))
            sub = select_prompts(prompts, idx).to(dev)
            rows = [{"prompt": j, "completion_ids": comps[i].to(dev)} for j, i in enumerate(idx)]
            logps = self.policy(sub, rows)
            # Token-level mean over the whole global batch (micro-batches and processes add up exactly).
            loss = -torch.cat(logps).sum() / world_tokens
            self._backward(loss * self.acc.num_processes, last=c_i == len(chunks) - 1)
            loss_sum += float(loss.detach()) * self.acc.num_processes
        grad_norm = self._optimizer_step()
        elapsed = time.perf_counter() - t0
        metrics = {"loss": loss_sum / self.acc.num_processes, "optim/grad_norm": grad_norm,
                   "optim/lr": float(self.scheduler.get_last_lr()[0]), "time/update": elapsed,
                   "time/tokens_per_s": total_tokens / max(elapsed, 1e-9)}
        return self._reduce_metrics(metrics)

    # ----------------------------------------------------------------------------------------------
    # Pieces of a step

    def _record_prompts(self, samples: list[Sample]) -> None:
        """Which prompts this process trained on at this step (``prompts_rank{r}.jsonl``)."""
        with open(self.out / f"prompts_rank{self.acc.process_index}.jsonl", "a") as f:
            f.write(json.dumps({"step": self.step + 1, "ids": [s.id for s in samples]}) + "\n")

    def _logp(self, r: Rollouts, idx: list[int], T: int) -> torch.Tensor:
        """Gradient-carrying log pi_theta of the completions ``idx`` ([len(idx), T], 0 on padding)."""
        groups = sorted({int(r.group[i]) for i in idx})
        sub = select_prompts(r.prompts, groups).to(self.acc.device)
        where = {g: j for j, g in enumerate(groups)}
        lengths = r.completion_lengths
        rows = [{"prompt": where[int(r.group[i])], "completion_ids": r.completion_ids[i, : int(lengths[i])]
                 .to(self.acc.device)} for i in idx]
        return pad_rows(self.policy(sub, rows), T)

    def _advantages(self, r_out, r_proc, m_full, m_cot, G, gains, K, spans, T):
        cfg = self.cfg.advantage
        floor = self.cfg.mig.min_spread
        step_kw = {}
        if cfg.process_credit == "step":
            kmax = gains.shape[1]
            step_mask = torch.arange(kmax).unsqueeze(0) < K.unsqueeze(1)
            step_kw = {"step_gains": gains, "step_mask": step_mask, "token_step": step_index(spans, T)}
        adv = compute_advantages(r_out, r_proc, m_full, m_cot, G, cfg, min_spread=floor, **step_kw)
        if self.acc.num_processes == 1 or cfg.scale != "batch":
            # Groups never cross processes, so group statistics are local.
            return adv
        # Batch-std scaling needs the global batch: normalise the gathered rewards, keep this process's rows.
        rank, n = self.acc.process_index, r_out.numel()
        mine = slice(rank * n, (rank + 1) * n)
        all_out = self.acc.gather(r_out.to(self.acc.device)).cpu()
        all_proc = self.acc.gather(r_proc.to(self.acc.device)).cpu()
        adv.seq_out = group_normalize(all_out, G, scale="batch", eps=cfg.eps)[mine]
        adv.tok_out = token_advantages(adv.seq_out, m_full)
        adv.seq_proc = group_normalize(all_proc, G, scale="batch", eps=cfg.eps, min_spread=floor)[mine]
        if cfg.process_credit == "trajectory":
            adv.tok_proc = token_advantages(adv.seq_proc, process_token_mask(m_full, m_cot, cfg.process_mask))
        else:
            # Each process has as many step columns as its longest K: pad to the widest before gathering.
            width = gains.shape[1]
            stacked = torch.cat([gains, step_kw["step_mask"].float()], dim=1).to(self.acc.device)
            widest = int(self.acc.gather(torch.tensor([width], device=self.acc.device)).max())
            stacked = torch.cat([stacked[:, :width], stacked.new_zeros(n, widest - width),
                                 stacked[:, width:], stacked.new_zeros(n, widest - width)], dim=1)
            stacked = self.acc.gather(stacked).cpu()
            step_adv = step_normalize(stacked[:, :widest], stacked[:, widest:].bool(), G, scale="batch", eps=cfg.eps,
                                      min_spread=floor)[mine, :width]
            adv.tok_proc = token_advantages(None, m_cot, step_adv=step_adv, token_step=step_kw["token_step"])
        return adv

    def _global_denominators(self, m_cot, m_full, gate) -> Denominators:
        cfg = self.cfg.loss
        raw = torch.tensor([Denominators.of(m_cot, cfg.normalizer, cfg.max_completion_length),
                            Denominators.of(m_full, cfg.normalizer, cfg.max_completion_length),
                            float(gate.sum())])
        if self.acc.num_processes > 1:
            raw = self.acc.reduce(raw.to(self.acc.device), reduction="sum").cpu()
        return Denominators(cot=float(raw[0]), full=float(raw[1]), sft=max(float(raw[2]), 1.0))

    def _optimizer_step(self) -> float:
        clip = self.cfg.optim.max_grad_norm
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.deepspeed:
            # DeepSpeed already clipped and stepped in the last backward; this reads its global norm.
            norm = self.acc.clip_grad_norm_(params, clip or 0.0)
            return float(norm) if norm is not None else float("nan")
        if clip and clip > 0:
            norm = float(self.acc.clip_grad_norm_(params, clip))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _reduce_sum(self, value: float) -> float:
        if self.acc.num_processes == 1:
            return value
        return float(self.acc.reduce(torch.tensor([value], device=self.acc.device), reduction="sum").cpu()[0])

    def _reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Mean of each metric over processes (time and throughput: the slowest / the sum)."""
        if self.acc.num_processes == 1:
            return metrics
        keys = sorted(metrics)
        vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.acc.device)
        mean = self.acc.reduce(vals, reduction="mean").cpu()
        return {k: float(v) for k, v in zip(keys, mean)}

    # ----------------------------------------------------------------------------------------------
    # Validation and checkpoints

    def validate(self) -> dict[str, float]:
        from vlm_mig.evaluation import evaluate

        e = self.cfg.eval
        r = self.cfg.rollout
        res = evaluate(self.model, self.processor, self.val_data, max_new_tokens=e.max_new_tokens,
                       batch_size=e.batch_size, template=self.template, progress=False,
                       min_pixels=r.min_pixels, max_pixels=r.max_pixels)
        return {"val/accuracy": res.accuracy, "val/format": res.format_rate, "val/length": res.mean_length}

    def save(self) -> Path | None:
        cfg = self.cfg.trainer
        tmp = self.out / f"checkpoint-{self.step}.tmp"
        if self.is_main:
            ckpt.begin_checkpoint(self.out, self.step)
        self.acc.wait_for_everyone()
        model = self.acc.unwrap_model(self.policy).model
        if self.deepspeed:
            # Every process takes part: the full weights are gathered from the shards, and the engine writes
            # its own (sharded) optimizer and scheduler states.
            full = self.acc.get_state_dict(self.policy)
            if self.is_main:
                full = {k.removeprefix("model."): v for k, v in full.items()}
                model.save_pretrained(tmp, state_dict=full, safe_serialization=True)
                self.processor.save_pretrained(tmp)
            self.policy.save_checkpoint(str(tmp / "deepspeed"), tag="state")
        elif self.is_main:
            ckpt.write_model(tmp, model, self.processor)
        self.acc.wait_for_everyone()
        ckpt.save_rng(tmp, self.acc.process_index)
        self.acc.wait_for_everyone()
        final = None
        if self.is_main:
            state = {"step": self.step, "data_position": self.step * self.acc.num_processes *
                     (cfg.prompts_per_step if self.mode == "rl" else cfg.sft_batch_size),
                     "mode": self.mode, "base_model": self.base_path, "num_processes": self.acc.num_processes}
            if self.deepspeed:
                ckpt.write_state_only(tmp, state, self.cfg.to_dict())
            else:
                ckpt.write_trainer_state(tmp, self.optimizer, self.scheduler, state, self.cfg.to_dict())
            final = ckpt.finish_checkpoint(self.out, self.step, cfg.save_total_limit)
            logger.info("saved %s", final)
        self.acc.wait_for_everyone()
        return final


def _signal_metrics(l_pad: torch.Tensor | None, gains: torch.Tensor, r_proc: torch.Tensor, G: int,
                    evidence: list[float | None]) -> dict[str, float]:
    """How much the process signal carries: the spread of R_proc within groups (what the noise floor
    ``mig.min_spread`` is compared with), the share of all gain earned by the first step, and the visual
    evidence ``l_0 - l_0 without the image`` (``mig.visual_evidence``; NaN when not computed)."""
    if l_pad is None:
        return {}
    spread = r_proc.view(-1, G).amax(-1) - r_proc.view(-1, G).amin(-1)
    total = float(gains.clamp_min(0).sum())
    seen = [float(l_pad[i, 0]) - e for i, e in enumerate(evidence) if e is not None]
    return {
        "mig/proc_spread": float(spread.mean()),
        "mig/first_step_share": float(gains[:, :1].clamp_min(0).sum()) / total if total > 0 else float("nan"),
        "mig/visual_evidence": sum(seen) / len(seen) if seen else float("nan"),
    }


#: Diagnostics that are sums over micro-batches (each micro-batch holds its share of a batch-level value).
_ADDITIVE = ("loss", "pg_proc", "pg_out", "kl", "sft", "sft_gated")


def _average_diags(diags: list[tuple[int, dict[str, torch.Tensor]]], passes: int) -> dict[str, float]:
    """Per-pass loss diagnostics: additive terms summed over micro-batches, the rest row-weighted means;
    both averaged over the ``passes`` optimisation passes."""
    out: dict[str, float] = {}
    total = sum(n for n, _ in diags) or 1
    for n, d in diags:
        for k, v in d.items():
            w = 1.0 if k in _ADDITIVE else n * passes / total
            out[f"loss/{k}"] = out.get(f"loss/{k}", 0.0) + float(v) * w
    return {k: v / passes for k, v in out.items()}


class RunLog:
    """metrics.jsonl + TensorBoard (+ wandb when installed and asked) + sample completions, main process only."""

    def __init__(self, out: Path, cfg: Config, enabled: bool = True):
        self.enabled = enabled
        self.out = out
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if "tensorboard" in cfg.trainer.report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        if "wandb" in cfg.trainer.report_to:
            try:
                import wandb

                self.wandb = wandb.init(project="vlm-mig", config=cfg.to_dict(), dir=str(out))
            except ImportError:
                logger.warning("report_to has wandb but wandb is not installed (pip install 'vlm-mig[wandb]')")

    def truncate_after(self, step: int, rank_files: str) -> None:
        names = [rank_files] + (["metrics.jsonl", "samples.jsonl"] if self.enabled else [])
        for name in names:
            path = self.out / name
            if not path.is_file():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a killed run
            path.write_text("".join(x + "\n" for x in keep))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **clean}) + "\n")
        for k, v in metrics.items():
            if self.tb is not None and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def samples(self, step: int, r: Rollouts, spans, l_pad, rew, r_proc, gains, evidence, limit: int = 4) -> None:
        if not self.enabled:
            return
        with open(self.out / "samples.jsonl", "a") as f:
            for i in range(min(limit, len(r.texts))):
                s = r.sample_of(i)
                K = spans[i].K
                rec = {"step": step, "id": s.id, "question": s.question, "answer": s.answer,
                       "completion": r.texts[i], "steps": spans[i].texts, "reward": rew.total[i],
                       "process_reward": float(r_proc[i])}
                if l_pad is not None and spans[i].think is not None:
                    rec["l"] = [round(float(x), 5) for x in l_pad[i, : K + 1]]
                    rec["gains"] = [round(float(x), 5) for x in gains[i, :K]]
                    if evidence[i] is not None:
                        rec["visual_evidence_gain"] = round(float(l_pad[i, 0]) - evidence[i], 5)
                f.write(json.dumps(rec) + "\n")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
