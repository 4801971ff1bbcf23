"""vlm_mig.timing.StageClock: the one phase timer of the trainer, the demo and the benchmarks."""

from __future__ import annotations

import time

import pytest

from vlm_mig.timing import StageClock


def test_phases_add_up_in_entry_order(monkeypatch):
    ticks = iter([0.0, 1.5, 2.0, 2.25, 3.0, 4.0])  # a clock read at each phase's start and end
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    clock = StageClock()
    with clock("rollout"):
        pass
    with clock("update"):
        pass
    with clock("rollout"):  # entered twice: adds up
        pass
    assert clock.times == {"rollout": 2.5, "update": 0.25}
    assert clock.total == pytest.approx(2.75)


def test_run_add_and_rounded():
    clock = StageClock()
    assert clock.run("data", lambda a, b=0: a + b, 2, b=3) == 5
    clock.add("build", 1.23456)
    clock.add("build", 1.0)
    assert clock.times["build"] == pytest.approx(2.23456)
    assert clock.rounded(1)["build"] == 2.2
    assert set(clock.rounded()) == {"data", "build"}


def test_a_phase_that_raises_is_still_timed():
    def boom():
        raise ValueError("x")

    clock = StageClock()
    with pytest.raises(ValueError):
        clock.run("boom", boom)
    with pytest.raises(KeyError), clock("ctx"):
        raise KeyError("y")
    assert set(clock.times) == {"boom", "ctx"}


def test_the_demo_and_the_benchmarks_use_it():
    """No private timer left: the demo files its phases in a StageClock (bench/tiny_learnability.py too)."""
    import inspect

    from vlm_mig.demo import run

    assert not hasattr(run, "_Timer")
    assert inspect.signature(run.model_and_data).parameters["timer"].annotation in ("StageClock", StageClock)
