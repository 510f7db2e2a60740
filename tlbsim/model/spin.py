"""Spinning for IPI acknowledgements, and how a spinning VP gives up its LP.

Owns one question: "what does a VP waiting for acks do with its LP?". A
spinner (csd_lock_wait: a PAUSE loop, interrupts on) burns its LP until every
target acked. With spinning that yields it leaves the loop now and then:

- ``ple`` (KVM, pause-loop exiting; arch/x86/kvm/vmx/vmx.c): the exit comes
  after the VP's own PLE window of spinning. The window belongs to the VP
  (``VP.spin_window_us``, vmx->ple_window): handle_pause grows it on every
  pause-loop exit (grow_ple_window, x ple_window_grow up to ple_window_max)
  and it goes back to the base when the VP is next loaded after being
  scheduled out (shrink_ple_window with ple_window_shrink = 0, from
  vmx_sched_in / vmx_vcpu_load; ``VP.wait_for_lp``). So a spinner whose
  yields fail keeps its LP for ever longer windows: spin time is CPU burnt.
- ``notify`` (Hyper-V): the guest calls HvCallNotifyLongSpinWait after the
  CPUID-recommended retries (TLFS CPUID 0x40000004 EBX), a fixed window.

On each exit the hypervisor looks for a VP to yield to, as
kvm_vcpu_on_spin (virt/kvm/kvm_main.c) does: round-robin over the
partition's VPs after the last one boosted, a candidate must be *ready*
(runnable and not running: ``spin.candidates = "ready"``, vcpu->ready from
commit d73eb57b, "KVM: Boost vCPUs that are delivering interrupts", Linux
5.3; ``"preempted"``: only VPs descheduled while runnable, vcpu->preempted,
the rule before it). A preempted candidate that was in user mode when
descheduled is skipped by a spinner in kernel mode (Linux 4.13+,
kvm_arch_vcpu_in_kernel), since 5.3 unless it has an interrupt pending
(kvm_arch_dy_has_pending_interrupt, with the ``ready`` rule). Candidates
get ``Host.yield_to`` in that order until one yield takes place (a
candidate that is no longer ready fails and the next is tried); a yield that
takes place does not hand the LP over (host.py), and under EEVDF it may
leave the spinner on its LP. A VP in a shootdown of its own is in kernel
mode whatever its state (``VP.in_shootdown``). KVM also skips a VP
preempted inside its own kvm_vcpu_on_spin every other time (in_spin_loop /
dy_eligible); a VP is in that handler for about a microsecond, so the model
does not track it. Hyper-V's choice of VP on a notification is not public:
the same rules stand in for it.

``ipi_aware`` (off by default: an unmerged 2025-26 KVM series) prefers a
candidate that has this spinner's IPI pending.
"""

from __future__ import annotations

from functools import partial

from simpy import Interrupt

from tlbsim.model.accounting import CHARGE_SPIN_EXIT, EXIT, SPINNING
from tlbsim.model.host import YIELD_FAILED


class SpinYield:
    """How a spinning VP gives up its LP (built from [spin] and the profile)."""

    __slots__ = ("form", "base_window_us", "grow", "max_window_us", "exit_cost_us", "ipi_aware",
                 "ready_candidates")

    def __init__(self, form: str, base_window_us: float, grow: float, max_window_us: float, exit_cost_us: float,
                 ipi_aware: bool, ready_candidates: bool = True):
        self.form = form  # "ple" or "notify"
        self.base_window_us = base_window_us
        self.grow = grow
        self.max_window_us = max_window_us
        self.exit_cost_us = exit_cost_us
        self.ipi_aware = ipi_aware
        self.ready_candidates = ready_candidates  # vcpu->ready (5.3+), else vcpu->preempted only

    def next_window(self, window_us: float) -> float:
        """grow_ple_window: x grow, capped at the maximum."""
        grown = window_us * self.grow
        return grown if grown < self.max_window_us else self.max_window_us


def _spin_window_over(vp, epoch: int, _event) -> None:
    if vp.spin_epoch == epoch and vp.state == SPINNING and vp.interruptible:
        vp.spin_exit_due = True
        vp.kick()


def spin_until_acked(vp, acks):
    """Busy-wait (interrupts on) until every target acked (``acks``: guest.AckWait). With spinning
    that yields, each window of spinning ends in a pause-loop exit or a long spin wait
    notification (``_spin_exit``)."""
    spin = vp.spin
    while acks.pending:
        if not vp.on_lp:
            yield from vp.wait_for_lp()
        elif vp.preempt_pending:
            vp.give_up_lp_preempted()
        elif vp.irqs:
            yield from vp.take_interrupts()
        else:
            vp.set_state(SPINNING)
            if spin is not None:
                vp.spin_epoch += 1
                window = vp.spin_window_us
                # a window ending after every ack would find the VP no longer spinning (this epoch):
                # its timer would do nothing, so it is not set (one event a shootdown fewer)
                if not acks.acked_before(vp.env.now + window):
                    vp.env.timeout(window).callbacks.append(partial(_spin_window_over, vp, vp.spin_epoch))
            vp.interruptible = True
            try:
                yield acks.event
            except Interrupt:
                pass
            vp.interruptible = False
            if vp.spin_exit_due:
                vp.spin_exit_due = False
                if acks.pending:
                    yield from _spin_exit(vp, acks)


def _spin_exit(vp, acks):
    """A pause-loop exit (handle_pause: the window grows, then kvm_vcpu_on_spin) or
    HvCallNotifyLongSpinWait: its cost, then a directed yield if a candidate takes it."""
    spin = vp.spin
    vp.spin_exits += 1
    vp.spin_window_us = spin.next_window(vp.spin_window_us)
    # a pause-loop exit and HvCallNotifyLongSpinWait are the hypervisor's own: counted in spin_exits,
    # not in the exits table (nothing reaches the virtualization stack)
    vp.spin_exit_us += spin.exit_cost_us
    vp.charge = ((vp.env.now + spin.exit_cost_us, CHARGE_SPIN_EXIT, spin.exit_cost_us),)
    vp.set_state(EXIT)
    yield vp.env.timeout(spin.exit_cost_us)
    if not acks.pending or not vp.on_lp or vp.preempt_pending:
        return
    prefer = None
    if spin.ipi_aware:
        def prefer(candidate):
            return any(a is acks for _, _, a in candidate.irqs)
    for target in yield_candidates(vp, prefer):  # up to the first yield that takes place (kvm_vcpu_on_spin)
        if vp.yield_lp_to(target) != YIELD_FAILED:
            return


def yield_candidates(spinner, prefer=None):
    """kvm_vcpu_on_spin's candidates, in its order: the partition's VPs round-robin after the last
    one boosted, each ready (or preempted, before 5.3), not the spinner, and, if preempted while
    in user mode, only with an interrupt pending (the spinner is in kernel mode). With ``prefer``
    (IPI-aware yield), the candidates it accepts come first."""
    part = spinner.part
    vps = part.vps
    n = len(vps)
    start = part.last_boosted + 1
    ready_rule = spinner.spin.ready_candidates
    found = (vp for vp in (vps[(start + i) % n] for i in range(n))
             # running, halted or suspended: not ready
             if vp is not spinner and vp.dispatch_event is not None
             and (ready_rule or vp.preempted)
             # a user-mode preempted candidate is skipped, since 5.3 unless an interrupt is pending for it
             and not (vp.preempted and not vp.preempted_in_kernel and not (ready_rule and vp.irqs)))
    if prefer is None:
        return found  # lazily: the scan usually stops at the first candidate
    return sorted(found, key=lambda vp: not prefer(vp))  # stable: round-robin order within each group
