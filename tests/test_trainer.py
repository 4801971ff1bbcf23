"""The trainer end to end on the tiny model: sft, train (GRPO and MIG), exact resume (clean stop and SIGKILL),
two processes on CPU equal one process with the same global batch."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_mig.checkpoint import latest_checkpoint
from vlm_mig.config import ConfigError, load_config
from vlm_mig.models import load_model
from vlm_mig.trainer import Trainer

SPEC_METRICS = {
    "reward/total", "reward/accuracy", "reward/format", "mig/process_reward", "mig/K", "adv/zero_std_out",
    "loss/clip_frac_out", "loss/kl", "loss/sft_gate_rate", "length/completion", "optim/grad_norm",
    "time/tokens_per_s", "time/generate", "time/score", "time/update",
    "policy/entropy", "policy/entropy_reasoning", "policy/entropy_answer",
}


def _rl_overrides(tiny_vl_dir, out, steps, **extra):
    o = {
        "model.name_or_path": str(tiny_vl_dir), "trainer.output_dir": str(out), "trainer.max_steps": steps,
        "trainer.eval_steps": 0, "trainer.progress": False, "trainer.threads": 1, "trainer.report_to": "[]",
        "data.synthetic_n": 16, "data.validation": "null", "rollout.num_generations": 4,
        "rollout.max_new_tokens": 24, "trainer.prompts_per_step": 2, "trainer.micro_batch_size": 4,
        "optim.lr": 1e-3, "trainer.sample_log_steps": 1,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def sft_vl_dir(tiny_vl_dir, tmp_path_factory):
    """The tiny VLM after 30 SFT steps: it opens <think> and writes steps, so its rollouts have l_k and gains."""
    out = tmp_path_factory.mktemp("sft_vl")
    cfg = load_config(None, _rl_overrides(tiny_vl_dir, out, 30, **{
        "trainer.sft_batch_size": 8, "trainer.micro_batch_size": 8, "optim.lr": 3e-3, "data.synthetic_n": 64,
        "trainer.save_steps": 30}))
    Trainer(cfg, mode="sft").train()
    return out / "checkpoint-30"


def test_sft_learns_and_writes_a_loadable_hf_checkpoint(tiny_vl_dir, tmp_path):
    cfg = load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / "sft", 8, **{
        "trainer.sft_batch_size": 8, "trainer.save_steps": 4, "trainer.save_total_limit": 1}))
    trainer = Trainer(cfg, mode="sft")
    trainer.train()
    losses = [json.loads(x)["loss"] for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < losses[0] * 0.8
    ckpts = sorted(p.name for p in (tmp_path / "sft").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-8"]  # save_total_limit 1 removed checkpoint-4
    model = load_model(tmp_path / "sft" / "checkpoint-8")
    assert not list((tmp_path / "sft" / "checkpoint-8").glob("*.bin"))
    _assert_same({k: v for k, v in model.state_dict().items() if "lm_head" not in k},
                 {k: v for k, v in trainer.model.state_dict().items() if "lm_head" not in k})


def test_the_ratio_is_taken_at_the_rollout_temperature(sft_vl_dir, tmp_path):
    """At T = 0.7 with two passes over one batch and no update between them (lr 0), every ratio is 1: the old
    log-probs (scoring pass) and the loss pass take the same tempered distribution."""
    cfg = load_config(None, _rl_overrides(sft_vl_dir, tmp_path / "t", 1, **{
        "rollout.temperature": 0.7, "trainer.num_iterations": 2, "optim.lr": 0.0}))
    Trainer(cfg, mode="rl").train()
    (row,) = [json.loads(x) for x in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert row["loss/ratio_min"] == pytest.approx(1.0, abs=1e-5)
    assert row["loss/ratio_max"] == pytest.approx(1.0, abs=1e-5)


def test_teacher_errors_rewrite_sft_targets_and_rl_refuses_them_and_single_rollout_groups(tiny_vl_dir, tmp_path):
    """``data.teacher_error_rate`` rewrites the SFT targets only: RL rewards grade the true answers."""
    from vlm_mig.data.teacher import slip_result

    def train_data(rate: float) -> list:
        return Trainer(load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / "sft", 1, **{  # one synthetic set
            "data.synthetic_mix": "multistep", "data.teacher_error_rate": rate, "data.teacher_slip": 1})),
            mode="sft").train_data

    gold, taught = train_data(0.0), train_data(1.0)
    assert [s.id for s in gold] == [s.id for s in taught]
    for g, t in zip(gold, taught):
        if slip_result(g.gold_steps, g.answer, 1) is None:
            assert t == g
        else:
            assert int(t.answer) == int(g.answer) + 1 and t.meta["gold_answer"] == g.answer
    assert any(t != g for g, t in zip(gold, taught))
    with pytest.raises(ConfigError, match="teacher_error_rate"):
        Trainer(load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / "rl", 1, **{
            "data.teacher_error_rate": 0.5})), mode="rl")
    assert not (tmp_path / "rl").exists()  # refused before the run folder was made
    with pytest.raises(ConfigError, match="rollout.num_generations: RL needs groups of at least 2"):
        Trainer(load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / "g1", 1, **{
            "rollout.num_generations": 1})), mode="rl")
    assert not (tmp_path / "g1").exists()


@pytest.mark.parametrize("variant", ["mig", "mig-two-pass", "grpo"])
def test_train_step_logs_every_spec_metric(tiny_vl_dir, tmp_path, variant):
    extra = {"loss.alpha": 0, "loss.gamma": 0} if variant == "grpo" else {"advantage.process_credit": "step"}
    if variant == "grpo":  # with DAPO's soft overlong penalty over the last 12 of the 24 tokens allowed
        extra.update({"reward.overlong_buffer": 12, "reward.overlong_penalty": 0.5})
    if variant == "mig-two-pass":  # micro-batches across groups: the l_k are scored before the update
        extra["trainer.micro_batch_size"] = 3
    cfg = load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / variant, 2, **extra))
    Trainer(cfg, mode="rl").train()
    rows = [json.loads(x) for x in (tmp_path / variant / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert SPEC_METRICS <= rows[-1].keys()
    assert all(0 < r["policy/entropy"] < math.log(4096) for r in rows)  # nats: at most log(vocabulary), ~2.1k
    assert ("reward/overlong" in rows[-1]) == (variant == "grpo")
    if variant == "grpo":
        for r in rows:
            assert -0.5 <= r["reward/overlong"] <= 0 and 0 <= r["reward/overlong_rate"] <= 1
            assert r["reward/total"] == pytest.approx(r["reward/accuracy"] + r["reward/format"] + r["reward/overlong"])
        assert any(r["reward/overlong_rate"] > 0 for r in rows)
    assert (variant == "grpo") == ("loss/pg_proc" not in rows[-1])
    samples = [json.loads(x) for x in (tmp_path / variant / "samples.jsonl").read_text().splitlines()]
    assert samples and {"completion", "steps", "reward", "process_reward"} <= samples[0].keys()
    assert (tmp_path / variant / "tensorboard").exists() is False  # report_to [] writes none
    ids = [json.loads(x)["ids"] for x in (tmp_path / variant / "prompts_rank0.jsonl").read_text().splitlines()]
    assert len(ids) == 2 and len(ids[0]) == 2


def test_an_overlong_buffer_longer_than_the_cap_is_refused(tiny_vl_dir, tmp_path):
    with pytest.raises(ConfigError, match="reward.overlong_buffer: 25 is longer than rollout.max_new_tokens"):
        Trainer(load_config(None, _rl_overrides(tiny_vl_dir, tmp_path / "o", 1, **{"reward.overlong_buffer": 25})),
                mode="rl")
    assert not (tmp_path / "o").exists()  # refused before the run folder was made


class _Grads:
    """The update's Learner with the trainer's passes, keeping the gradient instead of stepping."""

    def __init__(self, trainer):
        self.trainer, self.device = trainer, trainer.device
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]

    def completion_logprobs(self, rollouts, rows, scoring=None):
        return self.trainer.completion_logprobs(rollouts, rows, scoring)

    def backward(self, loss, last):
        self.trainer.backward(loss, last)

    def optimizer_step(self):
        self.grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        for p in self.params:
            p.grad = None
        return 0.0


@pytest.mark.parametrize("credit, checkpointing", [("trajectory", False), ("step", False), ("trajectory", True)])
def test_scoring_in_the_update_equals_scoring_before_it(sft_vl_dir, tmp_path, credit, checkpointing):
    """The l_k from the update's own forward (micro-batches of whole groups; the copies on the completions' cache,
    or in the same call under gradient checkpointing) give the loss and gradient of the separate score pass."""
    from vlm_mig.forward import _caches_in_training
    from vlm_mig.rl import stages

    over = _rl_overrides(sft_vl_dir, tmp_path / "rl", 1, **{
        "rollout.max_new_tokens": 40, "trainer.micro_batch_size": 6, "advantage.process_credit": credit,
        "model.gradient_checkpointing": str(checkpointing).lower()})
    cfg = load_config(None, over)
    trainer = Trainer(cfg, "rl")
    assert trainer.model.training and _caches_in_training(trainer.adapter.decoder(trainer.model)) != checkpointing
    assert stages.in_update_blocker(cfg) is None and trainer.scorer.in_update
    samples, seeds = trainer.batch_for(0, 3)
    runs = {}
    for fused in (False, True):
        batch = stages.rollout(trainer.engine, samples, seeds)
        stages.segment(batch, trainer.tok, trainer.step_cfg)
        stages.reward(batch, trainer.reward_specs)
        scorer = dataclasses.replace(trainer.scorer, in_update=fused)
        stages.score(batch, scorer)
        in_update = stages.InUpdate(stages.step_scoring(batch, scorer), cfg.mig, cfg.advantage) if fused else None
        if not fused:
            stages.advantages(batch, cfg.advantage, cfg.mig.min_spread, trainer.acc)
        learner = _Grads(trainer)
        upd = stages.update(batch, learner, cfg.loss, micro_batch_size=cfg.trainer.micro_batch_size,
                            num_iterations=1, dist=trainer.acc, in_update=in_update)
        runs[fused] = batch, learner.grad, sum(float(d["loss"]) for _, d in upd.diagnostics), len(upd.diagnostics)
    (two, g2, loss2, n2), (one, g1, loss1, n1) = runs[False], runs[True]
    assert n1 == 3 and n2 == 2  # 12 rows: micro-batches of one whole group (4 rows) vs 6 + 6 across groups
    assert float(two.r_proc.abs().sum()) > 0 and float(two.adv.tok_proc.abs().sum()) > 0, "a process signal to test"
    for name in ("l", "gains", "watermark", "r_proc", "entropy"):
        assert torch.allclose(getattr(one, name), getattr(two, name), atol=1e-5), name
    # the per-token entropy of the update's pass: 0 on padding, the step metrics split it by M_cot
    from vlm_mig.rl.metrics import entropy_metrics

    assert (one.entropy[~one.m_full] == 0).all() and (one.entropy[one.m_full] > 0).all()
    ent = entropy_metrics(one)
    n_cot, n_all = int(one.m_cot.sum()), int(one.m_full.sum())
    assert 0 < n_cot < n_all
    assert ent["policy/entropy"] == pytest.approx(float(one.entropy[one.m_full].mean()), rel=1e-5)
    assert ent["policy/entropy"] == pytest.approx(
        (n_cot * ent["policy/entropy_reasoning"] + (n_all - n_cot) * ent["policy/entropy_answer"]) / n_all, rel=1e-5)
    assert torch.allclose(one.adv.tok_proc, two.adv.tok_proc, atol=1e-5)
    assert loss1 == pytest.approx(loss2, abs=1e-5)
    assert float(g2.abs().max()) > 0 and torch.allclose(g1, g2, atol=1e-5, rtol=0), float((g1 - g2).abs().max())


def test_shipped_mig_configs_score_in_the_update_and_say_why_when_not():
    from vlm_mig.rl import stages

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("tiny_clevr_mig.yaml", "qwen2vl_2b_superclevr_mig.yaml", "qwen25_math_mig.yaml"):
        assert stages.in_update_blocker(load_config(root / name)) is None, name
    cfg = load_config(root / "tiny_clevr_mig.yaml", ["trainer.micro_batch_size=4"])
    assert "smaller than a group" in stages.in_update_blocker(cfg)
    cfg = load_config(root / "tiny_clevr_mig.yaml", ["trainer.num_iterations=2"])
    assert "num_iterations" in stages.in_update_blocker(cfg)
    assert "no step scores" in stages.in_update_blocker(load_config(root / "tiny_clevr_grpo.yaml"))


@pytest.mark.parametrize("variant", [
    {"loss.importance_sampling": "sequence", "loss.mask_truncated": "true", "loss.rollout_correction": "token_truncate",
     "loss.top_entropy_quantile": 0.5, "loss.normalizer": "dapo"},
    {"loss.type": "cispo", "loss.rollout_correction": "sequence_mask", "loss.alpha": 0, "loss.gamma": 0}])
def test_the_loss_options_train_and_log_what_they_move(tiny_vl_dir, tmp_path, variant):
    """The issue-22 loss options through the real trainer (MIG and GRPO): the HF sampler is the policy itself, so the
    rollout/trainer mismatch reads float noise and no weight is capped."""
    out = tmp_path / "rl"
    Trainer(load_config(None, _rl_overrides(tiny_vl_dir, out, 2, **variant)), "rl").train()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m = rows[-1]
    assert m["loss/rollout_logp_diff"] < 1e-4 and m["loss/rollout_kl"] < 1e-6 and m["loss/rollout_capped_frac"] == 0
    assert math.isfinite(m["loss/loss"]) and math.isfinite(m["optim/grad_norm"])
    if "loss.mask_truncated" in variant:
        # the untrained model seldom stops within 24 tokens: truncated rows leave the PG terms, the others keep q
        assert 0 <= m["loss/truncated_frac"] <= 1 and "loss/seq_ratio_mean_out" in m
        assert (m["loss/entropy_kept_frac_out"] > 0) == (m["loss/truncated_frac"] < 1)


#: a reward plug-in whose groups are flat (0) for prompts with an even gold count and otherwise score the parity of
#: each completion's length (so they mostly spread): dynamic sampling then has groups to drop and groups to keep
PARITY_REWARD = """
def parity(prompts, completions, answer, completion_length, **kw):
    return [float(n % 2) if int(a[0]) % 2 else 0.0 for a, n in zip(answer, completion_length)]
"""


def _dynamic_overrides(model_dir, out, steps, folder, **extra):
    (folder / "parity_reward.py").write_text(PARITY_REWARD)
    return _rl_overrides(model_dir, out, steps, **{
        "reward.accuracy_weight": 0, "reward.format_weight": 0, "reward.plugins": "[parity_reward:parity]",
        "advantage.filter_groups": "outcome", "advantage.filter_max_draws": 3, **extra})


def _check_draws(out: Path, rank_files: list[str], prompts_per_step: int) -> list[dict]:
    """The logged counts of dynamic sampling add up, every trained prompt was drawn that step, and the draws
    recorded in the last checkpoint are the sum of the steps' draws."""
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    world = len(rank_files)
    for m in rows:
        f = {k.removeprefix("filter/"): v for k, v in m.items() if k.startswith("filter/")}
        assert f["groups_kept"] + f["groups_filled"] == world * prompts_per_step
        assert f["groups_drawn"] + f["prompts_unused"] == f["draws"] * world * prompts_per_step
        dropped = f["dropped_solved"] + f["dropped_unsolved"] + f["dropped_flat"]
        assert f["groups_drawn"] == f["groups_kept"] + f["groups_surplus"] + dropped and f["groups_filled"] <= dropped
        assert 0 <= f["accuracy_drawn"] <= 1 and f["rollouts_drawn"] == 4 * f["groups_drawn"]  # G = 4
    for name in rank_files:
        for line in (out / name).read_text().splitlines():
            rec = json.loads(line)
            assert set(rec["ids"]) <= set(rec["drawn"]) and len(rec["ids"]) == prompts_per_step
    state = json.loads((latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["draws"] == sum(m["filter/draws"] for m in rows)
    return rows


def test_dynamic_sampling_drops_flat_groups_and_resumes_at_its_data_position(tiny_vl_dir, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    straight = tmp_path / "straight"
    Trainer(load_config(None, _dynamic_overrides(tiny_vl_dir, straight, 4, tmp_path, **{"trainer.save_steps": 2})),
            "rl").train()
    rows = _check_draws(straight, ["prompts_rank0.jsonl"], 2)
    assert sum(m["filter/draws"] for m in rows) > 4, "some step must draw more than once for this to test it"
    assert sum(m["filter/groups_kept"] for m in rows) > 0
    assert all(m["adv/zero_std_out"] == m["filter/groups_filled"] / 2 for m in rows)  # only filled groups are flat
    split = tmp_path / "split"
    Trainer(load_config(None, _dynamic_overrides(tiny_vl_dir, split, 2, tmp_path, **{"trainer.save_steps": 2})),
            "rl").train()
    resumed = Trainer(load_config(None, _dynamic_overrides(tiny_vl_dir, split, 4, tmp_path, **{
        "trainer.save_steps": 2})), "rl", resume=True)
    assert resumed.draws == sum(m["filter/draws"] for m in rows[:2]) and resumed.draws > resumed.step
    resumed.train()
    _assert_same(_weights(straight / "checkpoint-4"), _weights(split / "checkpoint-4"))
    assert (split / "prompts_rank0.jsonl").read_text() == (straight / "prompts_rank0.jsonl").read_text()
    # A filter that reads R_proc needs a run that scores it, and keeps the l_k out of the update's forward.
    with pytest.raises(ConfigError, match="advantage.filter_groups: total reads R_proc"):
        Trainer(load_config(None, _dynamic_overrides(tiny_vl_dir, tmp_path / "grpo", 1, tmp_path, **{
            "advantage.filter_groups": "total", "loss.alpha": 0, "loss.gamma": 0})), "rl")
    from vlm_mig.rl import stages

    cfg = load_config(None, _dynamic_overrides(tiny_vl_dir, tmp_path / "x", 1, tmp_path, **{
        "advantage.filter_groups": "outcome_and_process"}))
    assert "filter_groups: outcome_and_process reads R_proc" in stages.in_update_blocker(cfg)


def test_resume_after_clean_stop_is_exact(tiny_vl_dir, tmp_path):
    straight = tmp_path / "straight"
    Trainer(load_config(None, _rl_overrides(tiny_vl_dir, straight, 4, **{"trainer.save_steps": 2})), "rl").train()
    split = tmp_path / "split"
    Trainer(load_config(None, _rl_overrides(tiny_vl_dir, split, 2, **{"trainer.save_steps": 2})), "rl").train()
    resumed = Trainer(load_config(None, _rl_overrides(tiny_vl_dir, split, 4, **{"trainer.save_steps": 2})), "rl",
                      resume=True)
    assert resumed.step == 2
    resumed.train()
    _assert_same(_weights(straight / "checkpoint-4"), _weights(split / "checkpoint-4"))
    steps = [json.loads(x)["step"] for x in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_sft_prompt_cache_equals_encoding_every_step_and_resumes_exactly(tiny_vl_dir, tmp_path):
    def run(name, steps, cache, resume=False, **extra):
        over = _rl_overrides(tiny_vl_dir, tmp_path / name, steps, **{
            "trainer.sft_batch_size": 8, "trainer.micro_batch_size": 4, "trainer.save_steps": 2,
            "model.freeze_vision": "true", "trainer.cache_prompts": str(cache).lower(), **extra})
        trainer = Trainer(load_config(None, over), mode="sft", resume=resume)
        trainer.train()
        return trainer

    plain, cached = run("plain", 4, False), run("cached", 4, True)  # 16 scenes, batch 8: the 2nd epoch reuses
    assert plain._prompt_cache is None and len(cached._prompt_cache) == 16
    losses = {n: [json.loads(x)["loss"] for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("plain", "cached")}
    assert losses["plain"] == pytest.approx(losses["cached"], abs=1e-5)
    _assert_same(_weights(tmp_path / "plain" / "checkpoint-4"), _weights(tmp_path / "cached" / "checkpoint-4"),
                 atol=1e-5)
    # A resumed run starts with an empty cache and fills it with the same values: bit-exact.
    run("split", 2, True)
    run("split", 4, True, resume=True)
    _assert_same(_weights(tmp_path / "cached" / "checkpoint-4"), _weights(tmp_path / "split" / "checkpoint-4"))
    with pytest.raises(ConfigError, match="trainer.cache_prompts needs a frozen vision tower"):
        run("unfrozen", 1, True, **{"model.freeze_vision": "false"})


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "vlm_mig.cli", *args]


def test_resume_after_sigkill_is_exact(tiny_vl_dir, tmp_path):
    steps = 8
    straight = tmp_path / "straight"
    over = _rl_overrides(tiny_vl_dir, straight, steps, **{"trainer.save_steps": 2})
    subprocess.run(_cli("train", *over), check=True, capture_output=True)
    killed = tmp_path / "killed"
    over = _rl_overrides(tiny_vl_dir, killed, steps, **{"trainer.save_steps": 2})
    proc = subprocess.Popen(_cli("train", *over), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Block on the trainer's own log until the first checkpoint is complete, then kill it mid-run.
    for line in proc.stderr:
        if "saved " in line and "checkpoint-2" in line:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    last = latest_checkpoint(killed)
    assert last is not None and last.name != f"checkpoint-{steps}", "the run must die mid-way"
    subprocess.run(_cli("train", "--resume", *over), check=True, capture_output=True)
    _assert_same(_weights(straight / f"checkpoint-{steps}"), _weights(killed / f"checkpoint-{steps}"))


def _one_vs_two_processes(model_dir, tmp_path, atol=1e-5, **extra):
    """Train 2 steps on 1 process and on 2 (gloo, CPU) with the same global batch; the weights must agree."""
    one = tmp_path / "one"
    over = _rl_overrides(model_dir, one, 2, **{"trainer.prompts_per_step": 2, "loss.kl_coef": 0, **extra})
    subprocess.run(_cli("train", *over), check=True, capture_output=True)
    two = tmp_path / "two"
    over = _rl_overrides(model_dir, two, 2, **{"trainer.prompts_per_step": 1, "loss.kl_coef": 0, **extra})
    # On a CPU-only machine `--multi_gpu` starts torchrun workers that the trainer joins over gloo.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlm_mig.cli", "train", *over]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rank0 = [json.loads(x)["ids"] for x in (two / "prompts_rank0.jsonl").read_text().splitlines()]
    rank1 = [json.loads(x)["ids"] for x in (two / "prompts_rank1.jsonl").read_text().splitlines()]
    single = [json.loads(x)["ids"] for x in (one / "prompts_rank0.jsonl").read_text().splitlines()]
    assert all(a != b for a, b in zip(rank0, rank1)), "ranks must see different prompts"
    assert [a + b for a, b in zip(rank0, rank1)] == single
    _assert_same(_weights(one / "checkpoint-2"), _weights(two / "checkpoint-2"), atol=atol)
    return [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_vl_dir, tmp_path):
    _one_vs_two_processes(tiny_vl_dir, tmp_path)


def test_two_processes_share_the_batch_std_of_step_credit(sft_vl_dir, tmp_path):
    # Step credit normalises every step gain of the batch by one std: each process must use the global one. A local
    # std moves the weights by ~3e-3 here; float-order noise of the gathered gains, magnified by Adam on rarely
    # updated embedding rows, reaches ~1.5e-5, so the tolerance sits between the two.
    rows = _one_vs_two_processes(sft_vl_dir, tmp_path, atol=1e-4, **{
        "advantage.process_credit": "step", "advantage.scale": "batch", "rollout.max_new_tokens": 40,
        "loss.beta": 0, "loss.gamma": 0})
    assert any(r["loss/pg_proc"] != 0 for r in rows), "the process term must carry a gradient for this to test it"


def test_dynamic_sampling_on_two_processes_draws_alike_and_resumes(sft_vl_dir, tmp_path):
    """Each process fills its own batch with the same number of draws; a 2-process run resumed from its first
    checkpoint ends on the same weights. The filter reads R_proc (each draw scored, then joined)."""
    def launch(out, *args):
        over = _dynamic_overrides(sft_vl_dir, out, 2, tmp_path, **{
            "trainer.prompts_per_step": 1, "loss.kl_coef": 0, "trainer.save_steps": 1, "trainer.save_total_limit": 2,
            "advantage.filter_groups": "outcome_and_process", "rollout.max_new_tokens": 40})
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vlm_mig.cli",
               "train", *args, *over]
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert res.returncode == 0, res.stderr[-3000:]

    straight = tmp_path / "straight"
    launch(straight)
    rows = _check_draws(straight, ["prompts_rank0.jsonl", "prompts_rank1.jsonl"], 1)
    assert sum(m["filter/draws"] for m in rows) > 2, "some step must draw more than once for this to test it"
    assert any(m["filter/prompts_unused"] for m in rows), "a full process must wait on a short one to test that"
    drawn = [[json.loads(x)["drawn"] for x in (straight / f"prompts_rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert all(not set(a) & set(b) for a, b in zip(*drawn)), "the processes draw different prompts"
    resumed = tmp_path / "resumed"
    launch(resumed, "--resume-from", str(straight / "checkpoint-1"))
    _assert_same(_weights(straight / "checkpoint-2"), _weights(resumed / "checkpoint-2"))


def test_visual_evidence_noise_floor_and_ablations_are_wired(sft_vl_dir, tmp_path):
    out = tmp_path / "rl"
    over = _rl_overrides(sft_vl_dir, out, 1, **{
        # T = 0.7: the 30-step SFT start writes its <think> steps more reliably, so the logged rows get l_k.
        "mig.visual_evidence": "true", "rollout.max_new_tokens": 40, "trainer.prompts_per_step": 4,
        "rollout.temperature": 0.7,
        "mig.l0_context": "opener", "mig.answer_score": "digits", "mig.watermark": "false", "mig.min_gain": 0.01,
        "mig.min_spread": 100.0, "advantage.process_mask": "full", "loss.sft_gates": "format"})
    Trainer(load_config(None, over), "rl").train()
    (m,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(m["mig/visual_evidence"]) and math.isfinite(m["mig/proc_spread"])
    # A floor above every spread zeroes the process advantage of every group.
    assert m["adv/below_min_spread"] == 1.0 and m["adv/proc_abs_mean"] == 0.0 and m["loss/pg_proc"] == 0.0
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    scored = [s for s in samples if "l" in s]
    assert scored and all("visual_evidence_gain" in s for s in scored)
    for s in scored:  # raw gains without the watermark: l_k - l_{k-1}, |d| < min_gain counted as 0
        d = [b - a for a, b in zip(s["l"], s["l"][1:])]
        assert s["gains"] == pytest.approx([x if abs(x) >= 0.01 else 0.0 for x in d], abs=2e-5)


def test_lora_run_saves_an_adapter_and_resumes(tiny_vl_dir, tmp_path):
    over = _rl_overrides(tiny_vl_dir, tmp_path / "lora", 1, **{"model.lora_r": 4, "trainer.save_steps": 1})
    Trainer(load_config(None, over), "rl").train()
    assert (tmp_path / "lora" / "checkpoint-1" / "adapter_model.safetensors").is_file()
    over = _rl_overrides(tiny_vl_dir, tmp_path / "lora", 2, **{"model.lora_r": 4, "trainer.save_steps": 1})
    resumed = Trainer(load_config(None, over), "rl", resume=True)
    assert resumed.step == 1
    trainable = [n for n, p in resumed.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    resumed.train()
    assert (tmp_path / "lora" / "checkpoint-2" / "adapter_model.safetensors").is_file()
