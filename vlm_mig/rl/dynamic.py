"""Dynamic sampling (SPEC section 4.1): draw prompts until the step has a batch of groups that carry a signal.

A group whose chosen signal does not spread (``advantages.flat_groups``) gives that signal's advantage 0 to every
rollout; with ``advantage.filter_groups`` such groups are dropped and the step draws the next ``prompts_per_step``
prompts of the data order, up to ``advantage.filter_max_draws`` draws, keeping the first groups that spread until
it holds ``prompts_per_step`` of them (DAPO's dynamic sampling, verl's ``filter_groups``).

Several processes: each fills its own batch of ``prompts_per_step`` groups from its own share of each draw, and
all make the same number of draws (a process that is full draws no more rollouts, but its share of the draw is
used up like the others': the data position is one count for every process, and a resumed run continues from it
exactly). When the draws run out, a short process fills its batch with the groups it dropped, first drawn first:
every process trains on a full batch, so the update's micro-batches, its loss denominators and its collective
calls are those of an unfiltered step, and a flat group adds to each term what it adds without the filter
(nothing to a term whose signal is flat). Every count is logged over all processes (``Draws.metrics``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from vlm_mig.advantages import flat_groups
from vlm_mig.rl.batch import RLBatch
from vlm_mig.rl.collective import Collective, sum_over_processes


@dataclass
class Draws:
    """What dynamic sampling did in one step; every count is over all processes."""

    draws: int = 0  #: draws made (the same on every process); the data position moved by this many
    groups_drawn: int = 0  #: groups generated
    groups_kept: int = 0  #: groups trained on that spread (the rest of the batch is ``groups_filled``)
    dropped_solved: int = 0  #: flat groups drawn where every rollout was right
    dropped_unsolved: int = 0  #: flat groups drawn where every rollout was wrong
    dropped_flat: int = 0  #: other flat groups drawn (equal partial rewards, or a flat process reward)
    groups_surplus: int = 0  #: groups that spread but came after the process's batch was full (not trained on)
    groups_filled: int = 0  #: of the flat groups, those trained on anyway because the draws ran out
    prompts_unused: int = 0  #: prompts of a draw that a full process did not generate
    rollouts_drawn: int = 0  #: rollouts generated (``groups_drawn`` x G)
    rollouts_correct: int = 0  #: of them, those whose answer was right (accuracy 1)

    def metrics(self) -> dict[str, float]:
        """``filter/<count>`` for each count, and ``filter/accuracy_drawn``: the accuracy of every rollout drawn,
        the training accuracy of the policy (``reward/accuracy`` is the kept groups', which the filter biases)."""
        out = {f"filter/{f.name}": float(getattr(self, f.name)) for f in fields(self)}
        out["filter/accuracy_drawn"] = self.rollouts_correct / self.rollouts_drawn if self.rollouts_drawn else 0.0
        return out


def fill_batch(draw: Callable[[int], RLBatch], groups: int, signal: str, max_draws: int, min_spread: float,
               dist: Collective, pad_id: int) -> tuple[RLBatch, Draws]:
    """This process's batch of ``groups`` groups, from ``draw(i)`` (the i-th draw of the step, 0-based: rollouts
    of this process's ``groups`` prompts, with rewards, and the step scores where ``signal`` reads R_proc), and
    the step's ``Draws``. A first draw whose groups all spread is returned as it is; otherwise the kept groups
    of every draw, then the fill, are joined into one batch (``RLBatch.of_groups``, padding with ``pad_id``)."""
    kept: list[tuple[RLBatch, list[int]]] = []
    dropped: list[tuple[RLBatch, list[int]]] = []
    local = Draws()
    need = groups
    for i in range(max_draws):
        local.draws += 1
        if need == 0:
            local.prompts_unused += groups
        else:
            batch = draw(i)
            flat = flat_groups(batch.r_out, batch.r_proc, batch.group_size, signal, min_spread)
            spread = [g for g in range(groups) if not flat[g]]
            flat_ids = [g for g in range(groups) if flat[g]]
            kept.append((batch, spread[:need]))
            dropped.append((batch, flat_ids))
            local.groups_drawn += groups
            local.rollouts_drawn += batch.n
            local.rollouts_correct += int((batch.acc == 1).sum())
            local.groups_surplus += max(0, len(spread) - need)
            need -= len(kept[-1][1])
            acc = batch.acc.view(-1, batch.group_size)
            for g in flat_ids:
                if bool((acc[g] == 1).all()):
                    local.dropped_solved += 1
                elif bool((acc[g] == 0).all()):
                    local.dropped_unsolved += 1
                else:
                    local.dropped_flat += 1
        (short,) = sum_over_processes(dist, [float(need)])
        if short == 0:
            break
    fill = []
    for batch, flat_ids in dropped:
        if need > 0 and flat_ids:
            fill.append((batch, flat_ids[:need]))
            need -= len(fill[-1][1])
    local.groups_filled = sum(len(ids) for _, ids in fill)
    local.groups_kept = groups - local.groups_filled
    counts = [f.name for f in fields(Draws) if f.name != "draws"]
    totals = sum_over_processes(dist, [float(getattr(local, name)) for name in counts])
    step = Draws(draws=local.draws, **{name: int(v) for name, v in zip(counts, totals)})
    parts = [(b, ids) for b, ids in kept + fill if ids]
    if len(parts) == 1 and parts[0][1] == list(range(groups)):
        return parts[0][0], step
    return RLBatch.of_groups(parts, pad_id), step
