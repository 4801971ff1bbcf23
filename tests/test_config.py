"""The typed config: SPEC defaults, YAML + dotted overrides, errors that name the key, every recipe loads.

Fast: no model is loaded, nothing is generated.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from vlm_mig.config import Config, ConfigError, load_config, parse_overrides, save_config
from vlm_mig.fields import allowed
from vlm_mig.prompts import QUESTION_SUFFIX

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
EXPECTED_RECIPES = {
    "tiny_clevr_sft.yaml", "tiny_clevr_grpo.yaml", "tiny_clevr_mig.yaml", "qwen2vl_2b_superclevr_grpo.yaml",
    "qwen2vl_2b_superclevr_mig.yaml", "qwen25_math_mig.yaml",
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _error(path=None, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_equal_spec():
    cfg = load_config()
    assert cfg == Config()
    r, loss, adv, mig = cfg.rollout, cfg.loss, cfg.advantage, cfg.mig
    assert (r.num_generations, r.temperature, r.top_p, r.max_new_tokens) == (8, 1.0, 1.0, 1024)
    assert cfg.optim.lr == 1e-6
    assert cfg.optim.schedule == "constant_with_warmup"  # constant after warm-up
    assert (loss.kl_coef, loss.eps_clip, loss.alpha, loss.beta, loss.gamma) == (0.04, 0.2, 1.0, 1.0, 0.1)
    assert loss.normalizer == "grpo" and loss.eps_clip_high is None and loss.sft_gate_proc is False
    assert cfg.trainer.num_iterations == 1
    assert (adv.eps, adv.scale, adv.process_credit) == (1e-4, "group", "trajectory")
    assert (mig.probe, mig.max_steps, mig.min_step_chars) == ("</think>\n<answer>", 16, 8)
    assert (mig.l0_context, mig.answer_score, mig.watermark) == ("empty_think", "mean", True)
    assert (mig.min_gain, mig.min_spread, mig.l0_opener, mig.records) == (0.0, 0.1, "\n", "kept")
    assert adv.process_scale == "none"
    assert adv.process_mask == "cot" and loss.sft_gates == "both"
    assert (cfg.reward.accuracy_weight, cfg.reward.format_weight) == (1.0, 1.0)
    assert cfg.reward.fallback_extraction is False  # untagged answers earn nothing by default
    assert (cfg.reward.overlong_buffer, cfg.reward.overlong_penalty) == (0, 1.0)  # DAPO's overlong term: off


# --------------------------------------------------------------------------------------------------
# YAML + overrides


def test_yaml_and_overrides_with_precedence(tmp_path):
    path = _write(tmp_path, "trainer:\n  max_steps: 30\n  output_dir: runs/a\n  seed: 3\n  micro_batch_size: 4\n"
                            "loss:\n  alpha: 0.5\n")
    cfg = load_config(path)
    assert (cfg.trainer.max_steps, cfg.trainer.output_dir, cfg.trainer.seed) == (30, "runs/a", 3)
    assert cfg.loss.alpha == 0.5 and cfg.loss.beta == 1.0  # a key the file leaves out keeps its default

    cfg = load_config(path, ["trainer.max_steps=20", "trainer.output_dir=/tmp/x", "trainer.seed=7", "loss.gamma=0"])
    # default < file < command line; keys no override names keep the file's value
    assert (cfg.trainer.max_steps, cfg.trainer.output_dir, cfg.trainer.seed) == (20, "/tmp/x", 7)
    assert cfg.trainer.micro_batch_size == 4 and cfg.loss.alpha == 0.5 and cfg.loss.gamma == 0.0
    # the same key twice: the later one wins
    assert load_config(path, ["trainer.seed=1", "trainer.seed=2"]).trainer.seed == 2


def test_overrides_without_a_file_and_their_syntax():
    cfg = load_config(None, ["trainer.max_steps=5", "--trainer.seed=9", "data.validation=null", "eval.limit=None",
                             "data.train=synthetic:arithmetic", "model.name_or_path=runs/sft/checkpoint-700"])
    assert (cfg.trainer.max_steps, cfg.trainer.seed) == (5, 9)
    assert cfg.data.validation is None and cfg.eval.limit is None
    assert cfg.data.train == "synthetic:arithmetic" and cfg.model.name_or_path == "runs/sft/checkpoint-700"
    assert parse_overrides(["mig.probe=a=b"]) == {"mig": {"probe": "a=b"}}  # split at the first '='
    assert "expected section.key=value" in _error(overrides=["trainer.max_steps"])
    assert "expected section.key=value" in _error(overrides=["max_steps=3"])


def test_an_empty_file_or_section_gives_the_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == Config()
    assert load_config(_write(tmp_path, "trainer:\n"), ["trainer.seed=4"]).trainer.seed == 4


def test_string_floats_from_yaml_and_overrides(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; the config reads it as the number.
    assert yaml.safe_load("lr: 1e-3")["lr"] == "1e-3"
    path = _write(tmp_path, "optim:\n  lr: 1e-3\nloss:\n  kl_coef: 4e-2\nadvantage:\n  eps: 1e-6\n")
    cfg = load_config(path)
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)
    assert cfg.loss.kl_coef == pytest.approx(0.04) and cfg.advantage.eps == pytest.approx(1e-6)
    assert load_config(None, ["optim.lr=2e-4"]).optim.lr == pytest.approx(2e-4)
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0  # an int where a float goes
    assert "optim.lr" in _error(overrides=["optim.lr=fast"])
    assert "optim.lr" in _error(overrides=["optim.lr=nan"])


def test_list_fields():
    cfg = load_config(None, ["trainer.report_to=[]", "data.arithmetic_steps=[3, 5]",
                             "model.lora_target_modules=[q_proj, v_proj]", "reward.plugins=[my.mod:fn=0.5]"])
    assert cfg.trainer.report_to == [] and cfg.data.arithmetic_steps == [3, 5]
    assert cfg.model.lora_target_modules == ["q_proj", "v_proj"] and cfg.reward.plugins == ["my.mod:fn=0.5"]
    # a single string where a list of strings goes becomes a one-item list
    assert load_config(None, ["trainer.report_to=wandb"]).trainer.report_to == ["wandb"]
    assert Config().trainer.report_to is not Config().trainer.report_to  # no shared mutable default
    err = _error(overrides=["data.arithmetic_steps=[2, x]"])
    assert err.startswith("data.arithmetic_steps[1]:") and "integer" in err
    assert _error(overrides=["data.arithmetic_steps=3"]).startswith("data.arithmetic_steps:")
    assert _error(overrides=["data.arithmetic_steps=[5, 2]"]).startswith("data.arithmetic_steps:")
    assert _error(overrides=["trainer.report_to=[tensorbord]"]).startswith("trainer.report_to[0]:")


# --------------------------------------------------------------------------------------------------
# Errors that name the key


@pytest.mark.parametrize("override, key, suggestion", [
    ("trainer.max_step=3", "trainer.max_step", "trainer.max_steps"),
    ("loss.alpah=0", "loss.alpah", "loss.alpha"),
    ("rollout.num_generation=4", "rollout.num_generation", "rollout.num_generations"),
    ("trainr.max_steps=3", "trainr", "trainer"),
])
def test_unknown_keys_name_the_dotted_key_and_suggest(override, key, suggestion):
    err = _error(overrides=[override])
    assert err.startswith(f"{key}: unknown"), err
    assert f"did you mean {suggestion}?" in err


def test_unknown_key_in_a_file_names_the_file_and_the_key(tmp_path):
    path = _write(tmp_path, "trainer:\n  max_steps: 3\n  out_dir: runs/x\n")
    err = _error(path)
    assert str(path) in err and "trainer.out_dir: unknown key" in err and "trainer.output_dir" in err
    err = _error(_write(tmp_path, "trainer: 3\n"))
    assert "trainer: expected a mapping" in err
    assert "top level must be a mapping" in _error(_write(tmp_path, "- a\n- b\n"))
    assert "invalid YAML" in _error(_write(tmp_path, "trainer: [\n"))
    assert "config file not found" in _error(tmp_path / "missing.yaml")


@pytest.mark.parametrize("override, key, words", [
    ("trainer.max_steps=ten", "trainer.max_steps", "integer"),
    ("trainer.max_steps=2.5", "trainer.max_steps", "integer"),
    ("trainer.seed=true", "trainer.seed", "integer"),
    ("trainer.bf16=maybe", "trainer.bf16", "true or false"),
    ("trainer.output_dir=[a]", "trainer.output_dir", "string"),
    ("loss.alpha=[1]", "loss.alpha", "number"),
    ("loss.normalizer=foo", "loss.normalizer", "grpo, dapo, dr_grpo"),
    ("advantage.scale=bar", "advantage.scale", "group, batch, none"),
    ("advantage.process_credit=token", "advantage.process_credit", "trajectory, step"),
    ("data.task=counting", "data.task", "count"),
    ("data.format=csv", "data.format", "auto"),
    ("model.dtype=bf32", "model.dtype", "bfloat16"),
    ("model.tiny_arch=llama", "model.tiny_arch", "qwen2-vl"),
    ("data.synthetic_condition=C", "data.synthetic_condition", "A, B"),
    ("rollout.top_p=1.5", "rollout.top_p", "in [0, 1]"),
    ("rollout.num_generations=0", "rollout.num_generations", ">= 1"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size", ">= 1"),
    ("trainer.save_steps=0", "trainer.save_steps", ">= 1"),
    ("optim.lr=-1e-6", "optim.lr", ">= 0"),
    # checks that live in a stage's own dataclass come back under the field's dotted key too
    ("loss.eps_clip=1.5", "loss.eps_clip", "[0, 1)"),
    ("loss.kl_coef=-0.1", "loss.kl_coef", ">= 0"),
    ("advantage.eps=0", "advantage.eps", "> 0"),
    # MIG options and ablation switches
    ("mig.l0_context=prompt", "mig.l0_context", "empty_think, opener"),
    ("mig.answer_score=median", "mig.answer_score", "mean, sum, digits"),
    ("mig.watermark=sometimes", "mig.watermark", "true or false"),
    ("mig.min_gain=-0.1", "mig.min_gain", ">= 0"),
    ("mig.min_spread=-1", "mig.min_spread", ">= 0"),
    ("advantage.process_mask=all", "advantage.process_mask", "cot, full"),
    ("loss.sft_gates=structural", "loss.sft_gates", "both, format, accuracy"),
    ("mig.records=some", "mig.records", "all, kept"),
    ("advantage.process_scale=double", "advantage.process_scale", "none, match_outcome"),
    ("advantage.filter_groups=acc", "advantage.filter_groups", "none, outcome, total, outcome_and_process"),
    ("advantage.filter_max_draws=0", "advantage.filter_max_draws", ">= 1"),
    ("data.teacher_error_rate=1.5", "data.teacher_error_rate", "in [0, 1]"),
    # non-finite numbers (YAML .inf / .nan) are never a setting, bounded or not
    ("optim.lr=.inf", "optim.lr", "finite"),
    ("optim.lr=.nan", "optim.lr", "finite"),
    ("loss.alpha=.nan", "loss.alpha", "finite"),
    ("rollout.temperature=-.inf", "rollout.temperature", "finite"),
    ("loss.gamma=-0.5", "loss.gamma", ">= 0"),
    ("reward.overlong_buffer=-1", "reward.overlong_buffer", ">= 0"),
    ("reward.overlong_buffer=1.5", "reward.overlong_buffer", "integer"),
    ("reward.overlong_penalty=-0.5", "reward.overlong_penalty", ">= 0"),
    ("reward.overlong_penalty=.nan", "reward.overlong_penalty", "finite"),
])
def test_invalid_values_name_the_key(override, key, words):
    err = _error(overrides=[override])
    assert err.startswith(f"{key}:"), err
    assert words in err, err


def test_non_finite_values_in_yaml_are_refused(tmp_path):
    path = _write(tmp_path, "optim:\n  lr: .inf\nloss:\n  alpha: .nan\n")
    err = _error(path)
    assert str(path) in err and "optim.lr" in err and "finite" in err, err
    from vlm_mig.fields import Bounds

    assert not Bounds(lo=0).admits(float("nan")) and not Bounds(lo=0).admits(float("inf"))
    with pytest.raises(ValueError, match="alpha"):
        from vlm_mig.losses import LossConfig

        LossConfig(alpha=float("nan"))


def test_undecoupled_masks_need_trajectory_credit():
    err = _error(overrides=["advantage.process_mask=full", "advantage.process_credit=step"])
    assert err.startswith("advantage.process_mask:") and "trajectory" in err, err


def test_a_misspelt_choice_gets_a_suggestion():
    assert "did you mean 'dr_grpo'?" in _error(overrides=["loss.normalizer=dr-grpo"])
    assert "did you mean 'tensorboard'?" in _error(overrides=["trainer.report_to=[tensorbord]"])


def test_every_default_is_within_its_own_choices_and_bounds():
    cfg = Config()
    checked = 0
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            for item in value if isinstance(value, list) else [value]:
                if item is not None and f.metadata:
                    assert allowed(item, f.metadata) is None, f"{section.name}.{f.name}"
                    checked += 1
    assert checked > 40


# --------------------------------------------------------------------------------------------------
# save_config


def test_save_config_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.max_steps=20", "optim.lr=1e-3", "loss.alpha=0", "data.validation=null",
                             "trainer.report_to=[]", "eval.limit=200", 'data.question_suffix=" Show steps."'])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.mig.probe == "</think>\n<answer>" and again.data.question_suffix == " Show steps."
    # the file spells out every field of every section
    saved = yaml.safe_load(out.read_text())
    assert set(saved) == {f.name for f in dataclasses.fields(Config)}
    for section, values in saved.items():
        assert set(values) == {f.name for f in dataclasses.fields(getattr(cfg, section))}, section


# --------------------------------------------------------------------------------------------------
# Recipes in configs/


def test_the_expected_recipes_exist():
    assert EXPECTED_RECIPES <= {p.name for p in RECIPES}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_loads_and_documents_itself(path, tmp_path):
    cfg = load_config(path)
    text = path.read_text()
    header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#"))
    assert header.startswith(f"# {path.stem}:"), "the header says what the recipe is"
    mode = "sft" if path.stem.endswith("_sft") else "train"
    assert re.search(rf"(vlm-mig|-m vlm_mig\.cli) {mode} ", header), "the header gives the command"
    assert f"--config configs/{path.name}" in header
    if cfg.model.name_or_path not in ("tiny",) and not cfg.model.name_or_path.startswith("runs/"):
        assert "Hardware:" in header and "GPU" in header, "a GPU recipe names its hardware"
        assert "configs/accelerate/" in header
    # each recipe is its own run
    assert cfg.trainer.output_dir == f"runs/{path.stem}"
    # a recipe survives save_config
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_tiny_sft_recipe():
    cfg = load_config(CONFIGS / "tiny_clevr_sft.yaml")
    assert cfg.model.name_or_path == "tiny" and cfg.model.freeze_vision
    assert cfg.data.train == "synthetic:clevr" and cfg.data.task == "count"
    # the RL recipes start from this run's final checkpoint
    final = f"{cfg.trainer.output_dir}/checkpoint-{cfg.trainer.max_steps}"
    assert cfg.trainer.max_steps % cfg.trainer.save_steps == 0
    for name in ("tiny_clevr_grpo.yaml", "tiny_clevr_mig.yaml"):
        assert load_config(CONFIGS / name).model.name_or_path == final


#: Where a tiny recipe may differ from the demo's run: the demo writes its scenes to files (the recipes draw
#: the same ones from ``synthetic:clevr``), validates the SFT run only at the end, and labels its bars; SFT
#: never samples, so its rollout settings do not matter.
_DEMO_ONLY = {"data.train", "data.format", "data.validation", "data.synthetic_n", "data.synthetic_mix",
              "data.synthetic_list_objects", "data.validation_n", "model.name_or_path", "trainer.output_dir",
              "trainer.progress_desc", "trainer.save_steps", "trainer.eval_steps", "trainer.progress", "eval.limit",
              "eval.batch_size"}


@pytest.mark.parametrize("name", ["tiny_clevr_sft.yaml", "tiny_clevr_grpo.yaml", "tiny_clevr_mig.yaml"])
def test_tiny_recipes_are_the_demo_runs(name, tmp_path):
    """The standalone recipes and ``vlm-mig demo`` run the same model, data and schedule (seed 0)."""
    from vlm_mig.demo import plan as demo

    cfg = load_config(CONFIGS / name)
    sft = name.endswith("_sft.yaml")
    train, val = tmp_path / "train.jsonl", tmp_path / "id.jsonl"
    if sft:
        recipe = demo.sft_recipe(demo.DEFAULT, train, tmp_path / "sft", 1, ["tensorboard"], teacher=True)
    else:
        method = name.removeprefix("tiny_clevr_").removesuffix(".yaml")
        recipe = demo.rl_recipe(demo.DEFAULT, method, 0, tmp_path / "ckpt", train, val, tmp_path / method, 1,
                                ["tensorboard"])
    ran = demo.write_recipe(recipe, tmp_path / "demo.yaml", "demo run")
    differ = {k: v for k, v in _differences(cfg, ran).items() if not (sft and k.startswith("rollout."))}
    assert set(differ) <= _DEMO_ONLY, differ
    # the scenes the recipe draws are the demo's: same count, condition, seed, objects and question style
    d = cfg.data
    assert (d.synthetic_n, d.synthetic_condition, d.synthetic_seed, d.max_objects) == (
        demo.DEFAULT.train_scenes, "A", demo.TRAIN_SEED, demo.TRAIN_OBJECTS[1])
    assert (d.synthetic_mix, d.synthetic_list_objects) == (demo.QUESTION_MIX, False)
    assert demo.ID_SEED == demo.TRAIN_SEED + 1000 and d.validation_n <= demo.DEFAULT.test_scenes
    assert cfg.model.tiny_warmup_steps == demo.DEFAULT.warmup_steps
    assert cfg.trainer.threads == 1


def _differences(a: Config, b: Config) -> dict[str, tuple]:
    da, db = a.to_dict(), b.to_dict()
    return {f"{s}.{k}": (da[s][k], db[s][k]) for s in da for k in da[s] if da[s][k] != db[s][k]}


@pytest.mark.parametrize("grpo, mig", [
    ("tiny_clevr_grpo.yaml", "tiny_clevr_mig.yaml"),
    ("qwen2vl_2b_superclevr_grpo.yaml", "qwen2vl_2b_superclevr_mig.yaml"),
])
def test_grpo_and_mig_recipes_differ_only_in_the_loss(grpo, mig):
    g, m = load_config(CONFIGS / grpo), load_config(CONFIGS / mig)
    assert (g.loss.alpha, g.loss.gamma) == (0.0, 0.0)
    # MIG = the SPEC loss (only kl_coef may differ: 0 on CPU saves the reference model)
    assert dataclasses.replace(m.loss, kl_coef=Config().loss.kl_coef) == Config().loss
    assert m.advantage == Config().advantage and m.mig == Config().mig and m.reward == Config().reward
    assert _differences(g, m) == {"loss.alpha": (0.0, 1.0), "loss.gamma": (0.0, 0.1),
                                  "trainer.output_dir": (g.trainer.output_dir, m.trainer.output_dir)}


def test_tiny_rl_recipes_are_cpu_sized():
    cfg = load_config(CONFIGS / "tiny_clevr_mig.yaml")
    assert cfg.rollout.num_generations == 8 and 2 <= cfg.trainer.prompts_per_step <= 4
    assert cfg.rollout.max_new_tokens <= 128 and not cfg.trainer.bf16 and cfg.model.dtype == "float32"
    assert cfg.loss.kl_coef == 0.0  # no reference model on CPU (documented in the header)


@pytest.mark.parametrize("name", ["qwen2vl_2b_superclevr_grpo.yaml", "qwen2vl_2b_superclevr_mig.yaml"])
def test_qwen2vl_recipes_follow_r1v(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.name_or_path == "Qwen/Qwen2-VL-2B-Instruct"
    # fp32 master weights + bf16 autocast under DDP (the trainer does not run under DeepSpeed yet)
    assert cfg.model.dtype == "float32" and cfg.trainer.bf16 and cfg.model.gradient_checkpointing
    assert cfg.model.attn_implementation != "flash_attention_2"  # the packed pass needs a 4D float mask
    assert cfg.rollout.num_generations == 8 and cfg.rollout.max_new_tokens == 1024 and cfg.optim.lr == 1e-6
    assert cfg.data.task == "count" and cfg.data.format == "auto"  # train (HF folder) and validation differ
    assert not cfg.data.train.startswith("synthetic:") and not cfg.data.validation.startswith("synthetic:")
    assert cfg.data.system_prompt is None and cfg.data.question_suffix == QUESTION_SUFFIX
    assert cfg.trainer.prompts_per_step * 8 * cfg.rollout.num_generations == 128  # per GPU x 8 GPUs x G
    assert "configs/accelerate/ddp.yaml" in (CONFIGS / name).read_text()


def test_math_recipe():
    cfg = load_config(CONFIGS / "qwen25_math_mig.yaml")
    assert cfg.model.name_or_path.startswith("Qwen/Qwen2.5-Math-") and cfg.data.task == "math"
    assert cfg.data.validation == "math500" and cfg.data.train.endswith(".jsonl")
    assert cfg.loss == Config().loss and cfg.trainer.bf16 and cfg.optim.lr == 1e-6


def test_eval_defaults_have_one_home():
    """Validation (``cfg.eval``) and ``vlm-mig eval`` (``EvalOptions``) share one completion budget and batch
    size, and the budget is the training rollout budget (validation must not cut off what training allows)."""
    from vlm_mig.config import EvalConfig
    from vlm_mig.evaluation.options import EvalOptions
    from vlm_mig.rollout.base import RolloutConfig

    assert EvalOptions().max_new_tokens == EvalConfig().max_new_tokens == RolloutConfig().max_new_tokens
    assert EvalOptions().batch_size == EvalConfig().batch_size


def test_config_does_not_import_the_model_building_modules():
    """``import vlm_mig.config`` reads the arch and dtype names and the warm-up defaults from
    ``vlm_mig.model_options``, not from ``vlm_mig.models`` / ``vlm_mig.warmup``."""
    import subprocess
    import sys

    code = ("import sys, vlm_mig.config; "
            "print(sorted(m for m in ('vlm_mig.models', 'vlm_mig.warmup') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_model_options_match_the_model_code():
    """The light names the config validates against are the ones the model code builds and loads."""
    from vlm_mig import model_options, models, warmup
    from vlm_mig.config import ModelConfig

    assert models.ARCHES is model_options.ARCHES  # one tuple, imported
    assert set(models.DTYPES) == set(model_options.DTYPE_NAMES)
    assert warmup.WarmupConfig is model_options.WarmupConfig
    assert ModelConfig().tiny_warmup_steps == model_options.WarmupConfig.steps
