"""Every use of SimPy internals in the model, in one place.

The model resumes a VP's process with ``simpy.Interrupt`` from the callback of the event that
delivered its IPI (``vp.wake_for_ipi``), instead of scheduling SimPy's own Interruption event for the
same instant: one event fewer per IPI target. That takes two private attributes of SimPy 4's
``Process`` (``_target``: the event it waits for; ``_resume``: its step callback) and an event built
already failed (``_value``, ``_ok``, ``_defused``), as ``simpy.events.Interruption._interrupt`` does.
tests/test_simpy_compat.py fails on a SimPy release that changes any of them.
"""

from __future__ import annotations

from simpy import Interrupt
from simpy.events import Event


class _FailedWithInterrupt(Event):
    """An event already processed and failed with ``simpy.Interrupt``: what a woken VP's process is
    resumed with (as by SimPy's own Interruption event)."""

    def __init__(self, env):
        self.env = env
        self.callbacks = None
        self._value = Interrupt(None)
        self._ok = False
        self._defused = True


def resume_with_interrupt(proc, env) -> None:
    """Resume the process ``proc`` (waiting on an event) with ``simpy.Interrupt`` now: it stops
    waiting for its target event and its generator receives the exception, as SimPy's Interruption
    does when it is processed. Only from an event's callback, never from inside a process step."""
    proc._target.callbacks.remove(proc._resume)
    proc._resume(_FailedWithInterrupt(env))
