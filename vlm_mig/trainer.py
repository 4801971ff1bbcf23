"""The training loop on accelerate: ``vlm-mig sft`` and ``vlm-mig train`` (SPEC section 6).

One RL step is the pipeline of ``vlm_mig.rl.stages`` over one ``RLBatch``: rollout -> segment -> reward -> score
(packed: every l_k, and old log-probs when ``num_iterations > 1``; the reference model's log-probs) -> advantages ->
update (``num_iterations`` passes of micro-batched updates with gradient accumulation and clipping). With one pass
and group-local advantages (``stages.in_update_blocker`` is None) the l_k come from the update's own forward and
each micro-batch's advantages are computed there, so MIG adds only the probe copies to a pass GRPO makes anyway.

The trainer holds the state (models, optimizer, data order, checkpoints, logs) and is the update's ``Learner``;
every formula lives in the pure modules (``steps``, ``mig``, ``rewards``, ``advantages``, ``losses``).

Determinism: the prompts of draw ``d`` are a fixed slice of a seeded permutation, and each rollout is sampled
from its own seeded stream (``rollout.sampling``), so a run with 2 processes equals a 1-process run with
the same global batch, and a resumed run equals an uninterrupted one. A step makes one draw, or with
``advantage.filter_groups`` (dynamic sampling, ``rl.dynamic``) as many as it needs; the checkpoint keeps the
count of draws made (the data position), and each process then fills its own batch, so with a filter runs on
different numbers of processes select different groups (each still resumes exactly).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm_mig import checkpoint as ckpt
from vlm_mig.adapter import adapter_for
from vlm_mig.config import Config, ConfigError, save_config
from vlm_mig.data.schema import DataError, Sample
from vlm_mig.data.sources import load_source
from vlm_mig.data.teacher import imperfect_teacher
from vlm_mig.forward import EMPTY, PromptPieces, ScoreRow, packed_forward, pad_rows, prompt_pieces
from vlm_mig.mig import MigOptions, encode_probe
from vlm_mig.models import check_model_path, load_model, load_processor, tiny_model_dir
from vlm_mig.outputs import check_output
from vlm_mig.processing import PromptBatch, PromptTemplate, encode_prompts, tokenizer_of
from vlm_mig.prompts import SYSTEM_PROMPT, format_solution
from vlm_mig.rewards import RewardSpec
from vlm_mig.rl import stages
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.collective import sum_over_processes
from vlm_mig.rl.dynamic import Draws, fill_batch
from vlm_mig.rl.metrics import step_metrics
from vlm_mig.rollout import Rollouts, make_engine, select_prompts
from vlm_mig.rollout.base import eos_and_pad
from vlm_mig.rollout.sampling import rollout_seed
from vlm_mig.runlog import RunLog
from vlm_mig.steps import StepConfig
from vlm_mig.timing import StageClock

logger = logging.getLogger(__name__)


class PolicyForward(nn.Module):
    """The model behind one ``nn.Module.forward``, so DDP/DeepSpeed see every training pass.

    ``forward(prompts, rows, probe_ids, answer_score)`` computes the prompts' image features and the completion
    log-probs of ``rows`` (``ScoreRow`` fields, with ``prompt`` the index of the row's prompt) in one packed pass,
    under ``softmax(logits / temperature)``: RL passes the rollout temperature, so the ratio compares the policy
    with the distribution that sampled the rollouts; SFT uses 1. Rows with cuts and answer forms get their l_k
    from the same pass (detached); with ``entropy`` each completion position's policy entropy at that temperature
    too (detached): the lists ``(log-probs, l, entropy)`` (entropy None per row when not asked for).
    """

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, prompts: PromptBatch | list[PromptPieces], rows: list[dict[str, Any]],
                probe_ids: torch.Tensor = EMPTY, answer_score: str = MigOptions.answer_score,
                entropy: bool = False) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
        # ``prompts``: a PromptBatch, or its pieces already computed (``Trainer.sft_prompts``)
        pieces = prompts if isinstance(prompts, list) else prompt_pieces(self.model, prompts)
        specs = [ScoreRow(**{"cuts": [], "variants": [], **r, "prompt": pieces[r["prompt"]]}) for r in rows]
        scores = packed_forward(self.model, specs, probe_ids, answer_score=answer_score, temperature=self.temperature,
                                entropy=entropy)
        return [s.completion_logprobs for s in scores], [s.l for s in scores], [s.completion_entropy for s in scores]


def _select(prompts: PromptBatch | list[PromptPieces], rows: list[int], device: torch.device):
    """Rows of ``Trainer.sft_prompts``'s result (a batch, or cached pieces), on ``device``."""
    if isinstance(prompts, PromptBatch):
        return select_prompts(prompts, rows).to(device)
    return [prompts[i].to(device) for i in rows]


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

    def __init__(self, cfg: Config, mode: str = "rl", resume: bool | str = False, overwrite: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        if mode not in ("rl", "sft"):
            raise ValueError(f"mode must be rl or sft, got {mode!r}")
        if cfg.model.name_or_path != "tiny":
            check_model_path(cfg.model.name_or_path, "model.name_or_path")
        check_output(cfg.trainer.output_dir, "trainer.output_dir", folder=True)
        if mode == "rl":  # before anything is loaded or written
            if cfg.data.teacher_error_rate > 0:
                raise ConfigError("data.teacher_error_rate rewrites SFT targets (vlm-mig sft); RL rewards grade the "
                                  "true answers, so it must be 0 in vlm-mig train")
            if cfg.rollout.num_generations < 2:
                raise ConfigError(f"rollout.num_generations: RL needs groups of at least 2 completions (each "
                                  f"advantage is measured against its group), got {cfg.rollout.num_generations}")
            if stages.filter_reads_process(cfg.advantage.filter_groups) and not stages.needs_step_scores(cfg):
                raise ConfigError(f"advantage.filter_groups: {cfg.advantage.filter_groups} reads R_proc, which this "
                                  "run does not score (loss.alpha = 0 and nothing else needs step scores); use "
                                  "outcome, or give the process term a weight")
            if cfg.reward.overlong_buffer > cfg.rollout.max_new_tokens:
                raise ConfigError(f"reward.overlong_buffer: {cfg.reward.overlong_buffer} is longer than "
                                  f"rollout.max_new_tokens ({cfg.rollout.max_new_tokens}), so every completion "
                                  "would be penalised")
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
        created = not self.out.exists()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        try:
            self._setup(cfg, mode, resume, overwrite)
        except BaseException:
            # Bad data, a bad checkpoint, ...: a run folder this call made holds nothing worth keeping.
            if created and self.is_main:
                shutil.rmtree(self.out, ignore_errors=True)
            raise

    def _setup(self, cfg: Config, mode: str, resume: bool | str, overwrite: bool) -> None:
        """Everything after the run folder exists: models, optimizer, engines, data, logs."""
        t = cfg.trainer
        torch.manual_seed(t.seed)
        random.seed(t.seed)

        self.base_path = resolve_model_path(cfg)
        resume_from = self._find_resume(resume)
        self._claim_output(resume, resume_from, overwrite)
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
        temperature = cfg.rollout.logprob_temperature if mode == "rl" else 1.0
        self.policy, self.optimizer, self.scheduler = self.acc.prepare(PolicyForward(model, temperature),
                                                                       self.optimizer, self.scheduler)
        self.step = 0
        self.draws = 0  # the data position: draws of prompts made so far (one per step without a group filter)
        if resume_from is not None:
            if self.deepspeed:
                self.policy.load_checkpoint(str(resume_from / "deepspeed"), tag="state", load_module_strict=False)
                state = json.loads((resume_from / ckpt.STATE_FILE).read_text())
            else:
                state = ckpt.load_trainer_state(resume_from, self.optimizer, self.scheduler)
            self.step = state["step"]
            self.draws = state.get("draws", self.step)
            ckpt.load_rng(resume_from, self.acc.process_index)
            logger.info("resumed from %s at step %d", resume_from, self.step)

        self.template = template_of(cfg)
        self.engine = self.scorer = None
        if mode == "rl":
            ref_model = self._load_reference() if cfg.loss.kl_coef > 0 else None
            self.engine = make_engine(cfg.rollout, self.model, self.processor, self.template)
            self.scorer = stages.Scorer(
                model=self.model, processor=self.processor, template=self.template, mig=cfg.mig,
                probe_ids=encode_probe(self.tok, cfg.mig.probe), step_scores=stages.needs_step_scores(cfg),
                old_logprobs=cfg.trainer.num_iterations > 1, ref_model=ref_model,
                temperature=cfg.rollout.logprob_temperature,
                min_pixels=cfg.rollout.min_pixels, max_pixels=cfg.rollout.max_pixels,
                in_update=stages.in_update_blocker(cfg) is None)
        self.step_cfg = StepConfig.of(cfg.mig, atomic_pairs=self.adapter.atomic_pairs)
        self.reward_specs = self._reward_specs()
        self._order: tuple[tuple[int, int], list[int]] | None = None  # (epoch, n) -> its permutation
        self._prompt_cache = self._new_prompt_cache()  # sample id -> prompt pieces (trainer.cache_prompts)
        with self.acc.main_process_first():  # synthetic sets are generated once, by the main process
            self.train_data = self._load_data(cfg.data.train, "train")
            self.val_data = (self._load_data(cfg.data.validation, "validation")
                             if cfg.data.validation and cfg.trainer.eval_steps else [])
        if cfg.data.teacher_error_rate > 0:
            self.train_data = imperfect_teacher(self.train_data, cfg.data.teacher_error_rate, cfg.data.teacher_seed,
                                                cfg.data.teacher_slip)
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

    def _claim_output(self, resume: bool | str, resume_from: Path | None, overwrite: bool) -> None:
        """One run folder, one run: a new run over an old one's logs and checkpoints needs ``--overwrite`` (which
        removes them) or ``--resume`` (which continues it and trims the logs to the checkpoint); ``--resume``
        with no complete checkpoint says so and starts over."""
        if resume_from is not None:
            return
        held = ckpt.run_files(self.out)
        if resume and held:
            logger.warning("--resume: no complete checkpoint in %s; starting from step 0 (removing %s)", self.out,
                           ", ".join(held))
        elif resume:
            logger.warning("--resume: no checkpoint in %s; starting from step 0", self.out)
        elif held and not overwrite:
            raise ConfigError(f"trainer.output_dir {self.out}: already holds a run ({', '.join(held[:4])}"
                              f"{', ...' if len(held) > 4 else ''}); pass --resume to continue it or --overwrite "
                              "to start over")
        if held and self.is_main:
            ckpt.clear_run(self.out)
        self.acc.wait_for_everyone()

    def _find_resume(self, resume: bool | str) -> Path | None:
        if not resume:
            return None
        if isinstance(resume, str) and resume not in ("auto", "latest"):
            path = Path(resume)
            if not ckpt.is_complete(path):
                raise ConfigError(f"--resume-from {resume}: not a complete checkpoint (none there, or its save or "
                                  "deletion was interrupted)")
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
        # from_pretrained returns a model in eval mode; the policy trains (gradient checkpointing, LoRA dropout and
        # any dropout of the checkpoint act only in train mode; the rollout engine switches to eval to sample).
        return model.to(self.acc.device).train()

    def _new_prompt_cache(self) -> dict[str, dict[str, Any]] | None:
        if not self.cfg.trainer.cache_prompts:
            return None
        if self.mode != "sft":
            logger.warning("trainer.cache_prompts applies to vlm-mig sft only; this %s run encodes its prompts "
                           "every step", self.mode)
            return None
        tower = self.adapter.vision_tower(self.model)
        if tower is not None and any(p.requires_grad for p in tower.parameters()):
            raise ConfigError("trainer.cache_prompts needs a frozen vision tower (model.freeze_vision: true, no "
                              "LoRA on it): cached image features would go stale as the tower trains")
        return {}

    def _configure_deepspeed(self) -> None:
        """No dataloader goes through ``prepare``, so DeepSpeed's batch sizes are set here. The micro-batches of
        one update are marked as accumulation by ``backward`` (one optimizer step at the last), so DeepSpeed's
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

    def _reward_specs(self) -> list[RewardSpec]:
        r = self.cfg.reward
        specs = [RewardSpec("accuracy", r.accuracy_weight, {"fallback": r.fallback_extraction}),
                 RewardSpec("format", r.format_weight)]
        if r.overlong_buffer > 0:  # DAPO's soft overlong penalty, in R_out at weight 1 (its own factor inside)
            specs.append(RewardSpec("overlong", 1.0, {"max_length": self.cfg.rollout.max_new_tokens,
                                                      "buffer": r.overlong_buffer, "penalty": r.overlong_penalty}))
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
            skip_bad=d.skip_bad, limit=self.cfg.eval.limit if val else d.limit, question_mix=d.synthetic_mix,
            list_objects=d.synthetic_list_objects,
        )

    # ----------------------------------------------------------------------------------------------
    # Data order: draw d uses a fixed slice of a seeded permutation (per epoch), split across processes

    def batch_for(self, draw: int, per_process: int) -> tuple[list[Sample], list[int]]:
        """This process's ``per_process`` samples of draw ``draw`` (the step's index when each step draws once),
        and the rollout seed of each."""
        world, rank = self.acc.num_processes, self.acc.process_index
        n = len(self.train_data)
        if n == 0:
            raise DataError("the training set is empty")
        start = (draw * world + rank) * per_process
        out, seeds = [], []
        for g in range(start, start + per_process):
            epoch, pos = divmod(g, n)
            out.append(self.train_data[self._epoch_order(epoch, n)[pos]])
            seeds.append(rollout_seed(self.cfg.trainer.seed, draw, g))
        return out, seeds

    def _epoch_order(self, epoch: int, n: int) -> list[int]:
        """The seeded permutation of epoch ``epoch``, shuffled once (a 70k-row set costs ~50 ms a shuffle)."""
        if self._order is None or self._order[0] != (epoch, n):
            order = list(range(n))
            random.Random(self.cfg.trainer.seed * 1_000_003 + epoch).shuffle(order)
            self._order = ((epoch, n), order)
        return self._order[1]

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
        cfg, clock = self.cfg, StageClock()
        batch, draws, drawn = self._scored_batch(clock)
        in_update = None
        if self.scorer.in_update:  # the update's forward scores the l_k; its micro-batches make the advantages
            in_update = stages.InUpdate(stages.step_scoring(batch, self.scorer), cfg.mig, cfg.advantage)
        else:
            stages.advantages(batch, cfg.advantage, cfg.mig.min_spread, self.acc)
        with clock("update"):
            upd = stages.update(batch, self, cfg.loss, micro_batch_size=cfg.trainer.micro_batch_size,
                                num_iterations=cfg.trainer.num_iterations, dist=self.acc, in_update=in_update)
        with clock("sync"):
            self.engine.sync_weights(self.model)  # the next rollouts sample from the updated policy
        metrics = step_metrics(batch, upd, clock.times, float(self.scheduler.get_last_lr()[0]),
                               cfg.trainer.num_iterations)
        if draws is not None:
            metrics.update(draws.metrics())
        metrics = self._reduce_metrics(metrics)
        self._record_prompts(batch.rollouts.samples, drawn)  # once the step has run: a killed step leaves no line
        if self.is_main and cfg.trainer.sample_log_steps and self.step % cfg.trainer.sample_log_steps == 0:
            self.log.samples(self.step + 1, batch)
        return metrics

    def _scored_batch(self, clock: StageClock) -> tuple[RLBatch, Draws | None, list[Sample] | None]:
        """The step's batch through the rollout, segment, reward and score stages, from one draw, or with
        ``advantage.filter_groups`` from as many as dynamic sampling needs (``rl.dynamic``); the data position moves
        by the draws made. Also returns what dynamic sampling did and the samples it drew (None without it)."""
        cfg = self.cfg
        signal = cfg.advantage.filter_groups
        score_each_draw = stages.filter_reads_process(signal)  # the filter reads R_proc
        drawn: list[Sample] = []

        def draw(i: int) -> RLBatch:
            samples, seeds = self.batch_for(self.draws + i, cfg.trainer.prompts_per_step)
            drawn.extend(samples)
            with clock("generate"), self.acc.autocast():
                batch = stages.rollout(self.engine, samples, seeds)
            with clock("rewards"):
                stages.segment(batch, self.tok, self.step_cfg)
                stages.reward(batch, self.reward_specs)
            if score_each_draw:
                with clock("score"), self.acc.autocast():
                    stages.score(batch, self.scorer)
            return batch

        if signal == "none":
            batch, draws = draw(0), None
        else:
            batch, draws = fill_batch(draw, cfg.trainer.prompts_per_step, signal, cfg.advantage.filter_max_draws,
                                      cfg.mig.min_spread, self.acc, eos_and_pad(self.model, self.processor)[1])
            if draws.groups_filled and self.is_main:
                logger.warning("step %d: %d draws gave %d of %d groups whose %s spreads; training on %d flat ones too "
                               "(advantage.filter_max_draws)", self.step + 1, draws.draws, draws.groups_kept,
                               draws.groups_kept + draws.groups_filled, signal, draws.groups_filled)
        self.draws += draws.draws if draws else 1
        if not score_each_draw:
            with clock("score"), self.acc.autocast():
                stages.score(batch, self.scorer)
        return batch, draws, drawn if draws else None

    def sft_step(self) -> dict[str, float]:
        cfg, dev = self.cfg, self.acc.device
        samples, _ = self.batch_for(self.draws, cfg.trainer.sft_batch_size)
        self.draws += 1
        t0 = time.perf_counter()
        prompts = self.sft_prompts(samples)
        eos = self.tok.eos_token or ""
        comps = [torch.tensor(self.tok.encode(format_solution(s.gold_steps, s.answer) + eos, add_special_tokens=False))
                 for s in samples]
        total_tokens = sum(c.numel() for c in comps)
        (world_tokens,) = sum_over_processes(self.acc, [float(total_tokens)])

        def loss_of(idx: list[int]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            rows = [{"prompt": j, "completion_ids": comps[i].to(dev)} for j, i in enumerate(idx)]
            logps, _, _ = self.policy(_select(prompts, idx, dev), rows)
            # Token-level mean over the whole global batch (micro-batches and processes add up exactly).
            loss = -torch.cat(logps).sum() / world_tokens
            return loss, {"loss": loss.detach()}

        diags = stages.accumulate(self, stages.micro_batches(len(samples), cfg.trainer.micro_batch_size), loss_of)
        loss_sum = sum(float(d["loss"]) for _, d in diags) * self.acc.num_processes
        grad_norm = self.optimizer_step()
        elapsed = time.perf_counter() - t0
        metrics = {"loss": loss_sum / self.acc.num_processes, "optim/grad_norm": grad_norm,
                   "optim/lr": float(self.scheduler.get_last_lr()[0]), "time/update": elapsed,
                   "time/tokens_per_s": total_tokens / max(elapsed, 1e-9)}
        self._record_prompts(samples)  # once the step has run
        return self._reduce_metrics(metrics)

    # ----------------------------------------------------------------------------------------------
    # Pieces of a step

    def sft_prompts(self, samples: list[Sample]) -> PromptBatch | list[PromptPieces]:
        """The SFT pass's prompts: one ``PromptBatch``, or with ``trainer.cache_prompts`` each sample's pieces
        (ids, position ids, image features) from the cache, computed for the batch that first draws the sample.
        A resumed run computes them again, in other batches: on the CPU the vision tower gives the same bits in
        any batch, so the resumed run is exact (tests/test_trainer.py); a GPU's batched kernels may differ in
        the last bits. (One sample at a time would rule that out, at twice the first epoch's encoding cost.)"""
        r = self.cfg.rollout

        def encode(batch: list[Sample]) -> PromptBatch:
            return encode_prompts(self.processor, batch, self.template, r.max_prompt_length, r.min_pixels,
                                  r.max_pixels)

        if self._prompt_cache is None:
            return encode(samples)
        missing = list({s.id: s for s in samples if s.id not in self._prompt_cache}.values())
        if missing:
            with torch.no_grad():
                pieces = prompt_pieces(self.model, encode(missing))
            for s, piece in zip(missing, pieces):
                self._prompt_cache[s.id] = piece.to("cpu")
        return [self._prompt_cache[s.id] for s in samples]

    def _record_prompts(self, samples: list[Sample], drawn: list[Sample] | None = None) -> None:
        """Which prompts this process trained on at this step (``prompts_rank{r}.jsonl``), and under dynamic
        sampling which it drew (generated), kept or not."""
        line = {"step": self.step + 1, "ids": [s.id for s in samples]}
        if drawn is not None:
            line["drawn"] = [s.id for s in drawn]
        with open(self.out / f"prompts_rank{self.acc.process_index}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    # The update stage's Learner: the policy's passes, the backward and the optimizer step

    @property
    def device(self) -> torch.device:
        return self.acc.device

    def completion_logprobs(self, rollouts: Rollouts, rows: list[int], scoring: stages.StepScoring | None = None
                            ) -> stages.PolicyPass:
        """Gradient-carrying log pi_theta of the completions ``rows`` ([len(rows), T], 0 on padding), with
        ``scoring`` their l_0..l_K from the same pass (detached), and the policy's per-token entropy at the rollout
        temperature (detached, [len(rows), T], 0 on padding)."""
        groups = sorted({int(rollouts.group[i]) for i in rows})
        sub = select_prompts(rollouts.prompts, groups).to(self.device)
        where = {g: j for j, g in enumerate(groups)}
        lengths = rollouts.completion_lengths
        specs = [{"prompt": where[int(rollouts.group[i])],
                  "completion_ids": rollouts.completion_ids[i, : int(lengths[i])].to(self.device)} for i in rows]
        extra = {}
        if scoring is not None:
            for spec, i in zip(specs, rows):
                spec.update(cuts=scoring.cuts[i], **scoring.answers[i])
            extra = {"probe_ids": scoring.probe_ids, "answer_score": scoring.answer_score}
        logps, ls, ents = self.policy(sub, specs, entropy=True, **extra)
        T = rollouts.completion_ids.shape[1]
        return stages.PolicyPass(pad_rows(logps, T), ls if scoring is not None else None,
                                 None if any(e is None for e in ents) else pad_rows(ents, T))

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate one micro-batch's share of a globally normalised loss; only ``last`` ends the update
        (gradient sync / DeepSpeed step)."""
        # DDP averages gradients over processes; the loss is already divided by global counts, so undo it.
        loss = loss * self.acc.num_processes
        if self.deepspeed:
            # DeepSpeed steps inside the backward that ends the accumulation (accelerate's sync_gradients).
            self.acc.sync_gradients = last
            try:
                self.acc.backward(loss)
            finally:
                self.acc.sync_gradients = True
            return
        with self.acc.no_sync(self.policy) if not last else contextlib.nullcontext():
            self.acc.backward(loss)

    def optimizer_step(self) -> float:
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
            state = {"step": self.step, "draws": self.draws,
                     "data_position": self.draws * self.acc.num_processes *
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
