"""What the config needs to know about models, without importing the model-building code (torch, transformers).

``vlm_mig.config`` validates ``model.tiny_arch``, ``model.dtype`` and ``model.tiny_warmup_steps`` against these;
``vlm_mig.models`` and ``vlm_mig.warmup`` build and train the models they name. Keep this module free of torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from vlm_mig.data.clevr import DEFAULT_CONDITION, NUM_OBJECTS

#: Architectures of the embedded tiny model (``vlm-mig build-tiny --arch``, ``model.tiny_arch``); the first is
#: the default.
ARCHES = ("qwen2-vl", "qwen2.5-vl", "qwen2")
#: Names of the parameter dtypes ``models.load_model`` reads (``model.dtype``); ``models.DTYPES`` maps each to
#: its torch dtype.
DTYPE_NAMES = ("float32", "bfloat16", "float16", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class WarmupConfig:
    """How the vision tower is warmed up (defaults measured to fit CPU minutes; see README). The warm-up itself
    is ``vlm_mig.warmup.warm_up_vision``."""

    steps: int = 1500  #: optimizer steps
    batch_size: int = 32  #: scenes per step
    lr: float = 2e-3  #: peak AdamW learning rate (the heads and the tower alike), decaying linearly to 0
    #: weight of the whole-image count loss against the per-cell one (1.0: after the same SFT the language model
    #: reads the scenes better than with 0.1; README "The embedded default model")
    whole_image_weight: float = 1.0
    scenes: int = 3000  #: training scenes (condition A, 1-6 objects), cycled through in a seeded order
    eval_scenes: int = 300  #: held-out scenes for the accuracy recorded in the model folder
    condition: str = DEFAULT_CONDITION  #: CLEVR-CoGenT condition of the scenes (the training data's)
    max_objects: int = NUM_OBJECTS[1]  #: scenes hold 1..max_objects objects
    threads: int = 1  #: torch threads while warming up (pinned: the result depends on the thread count)
    data_seed: int = 7_000  #: seed of the warm-up scenes (disjoint from the demo's and the tests' seeds)

    @classmethod
    def for_steps(cls, steps: int) -> WarmupConfig:
        """The default recipe cut to ``steps`` (a short warm-up draws only the scenes it can use)."""
        scenes = min(cls.scenes, steps * cls.batch_size)
        return cls(steps=steps, scenes=scenes, eval_scenes=min(cls.eval_scenes, max(32, scenes // 10)))
