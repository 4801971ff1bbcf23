"""One RL step as stages over one batch object: ``RLBatch`` (``batch``), the stages that fill it in turn
(``stages``: rollout -> segment -> reward -> score -> advantages -> update), the cross-process reductions they
make (``collective``) and the step's metrics (``metrics``)."""

from vlm_mig.rl.batch import RLBatch

__all__ = ["RLBatch"]
