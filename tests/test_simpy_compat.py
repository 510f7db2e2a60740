"""The SimPy internals the model uses (tlbsim.model.simpy_compat) still exist and still behave as the
model assumes: this fails on a SimPy release that changes them."""

import simpy
from simpy import Interrupt
from simpy.events import Event

from tlbsim.model.simpy_compat import resume_with_interrupt


def test_the_private_attributes_the_model_uses_exist():
    env = simpy.Environment()

    def waiting():
        yield env.timeout(10)

    proc = env.process(waiting())
    env.run(until=1)
    assert isinstance(proc._target, Event) and proc._resume in proc._target.callbacks
    failed = env.event()
    failed.fail(RuntimeError("x"))
    failed.defused = True
    for name in ("_value", "_ok", "_defused", "callbacks"):  # what simpy_compat sets on its failed event
        assert hasattr(failed, name), name


def test_resuming_with_interrupt_is_what_an_interruption_does():
    """A process waiting on a timeout, resumed from another event's callback, receives Interrupt at
    that instant, stops waiting for its timeout (whose later firing does not resume it again), and
    can go on waiting for new events."""
    env = simpy.Environment()
    seen = []

    def sleeper():
        try:
            yield env.timeout(100)
            seen.append(("timeout", env.now))
        except Interrupt as e:
            seen.append(("interrupted", env.now, e.cause))
        yield env.timeout(5)
        seen.append(("after", env.now))

    proc = env.process(sleeper())
    env.timeout(3).callbacks.append(lambda _event: resume_with_interrupt(proc, env))
    env.run(until=200)
    assert seen == [("interrupted", 3, None), ("after", 8)]
    assert not proc.is_alive


def _wake_at_7(shim: bool) -> list:
    """A sleeper woken at t = 7 (by the shim, or by Process.interrupt from the same callback) and a
    bystander process whose timeout also ends at t = 7, scheduled after the waking one."""
    env = simpy.Environment()
    log = []

    def sleeper():
        try:
            yield env.timeout(50)
        except Interrupt:
            log.append(("sleeper", env.now))

    def bystander():
        yield env.timeout(7)
        log.append(("bystander", env.now))

    proc = env.process(sleeper())

    def wake(_event):
        if shim:
            resume_with_interrupt(proc, env)
        else:
            proc.interrupt()

    env.timeout(7).callbacks.append(wake)
    env.process(bystander())
    env.run()
    return log


def test_same_order_as_simpy_s_own_interrupt():
    """SimPy's Interruption is an URGENT event: the woken process runs before any other event of
    the same instant. The shim resumes it inside the waking callback: the same order."""
    assert _wake_at_7(True) == _wake_at_7(False) == [("sleeper", 7), ("bystander", 7)]
