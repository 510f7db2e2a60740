"""Guest flush policies: how the guest OS shoots down a TLB entry.

Every policy first flushes the initiator's own TLB (as Linux and Windows do),
then reaches the other VPs that may cache the address space ("targets"):

- ``ipi``: a virtual IPI per target (a trapped x2APIC ICR write: one
  X64MsrAccess exit each on the sender), the targets flush locally and ack,
  the sender spins until every ack is in.
- ``mask``: a flush hypercall with a ProcessorMask of exactly the targets
  (the Ex call with an HV_VP_SET when an index is >= 64); no call when there
  is no target. With ``guest.call_form = "list"`` (default) a range of up to
  ``costs.flush_ceiling_pages`` pages is flushed with
  HvCallFlushVirtualAddressList, a larger one or a whole address space with
  HvCallFlushVirtualAddressSpace(NON_GLOBAL_MAPPINGS_ONLY), as Windows and
  Linux do; ``"space"`` always uses the Space call.
- ``all``: the same calls with HV_FLUSH_ALL_PROCESSORS.
- ``linux``: arch/x86/hyperv/mmu.c's choices (TLFS; arch/x86/hyperv/mmu.c),
  falling back to IPIs on any failure status.
- ``kvm-pv``: KVM's PV flush: preempted targets are flagged to flush at
  their next entry, the others get IPIs (one PV send-IPI hypercall) and the
  initiator waits for them.

Guest options ([guest]): lazy TLB (Linux skips idle CPUs, for IPIs and in
the ProcessorMask; they flush when they next run) and Linux's PV sched
yield (after sending IPIs, a directed yield to a preempted target).
"""

from __future__ import annotations

from functools import partial

from tlbsim import hv
from tlbsim.hv import FlushCall, HvFlushFlags, HvStatus, VpSet
from tlbsim.model.accounting import CHARGE_SCHED_YIELD, CHARGE_SEND, I_HYPERCALL, I_MSR
from tlbsim.model.hypervisor import target_indices
from tlbsim.model.tlb import EVERYTHING, FlushScope
from tlbsim.model.vp import EXIT, FLUSH, HALTED
from tlbsim.model.vp_interrupts import wake_for_ipi

NG = HvFlushFlags.NON_GLOBAL_MAPPINGS_ONLY
#: Linux: (PAGE_SIZE - sizeof(struct hv_tlb_flush)) / sizeof(u64) GVA entries per call: 509.
LINUX_MAX_GVAS = (4096 - 24) // 8
#: ... and for the Ex call (struct hv_tlb_flush_ex is 32 bytes before the banks): 508 - bank words.
LINUX_MAX_GVAS_EX = (4096 - 32) // 8
#: Policies that model a Linux guest (lazy TLB and PV sched yield apply with "auto").
LINUX_POLICIES = ("ipi", "linux", "kvm-pv")


class AckWait:
    """An initiator waiting for its IPI targets' acknowledgements (csd_lock_wait).

    ``due`` counts the pending acks whose handler is under way (a target in ``take_interrupts``
    cannot be stopped before it acks) and ``due_us`` is when the last of them comes: when every
    pending ack is due before a spin window would end, the spinner needs no window timer
    (``VP.spin_until_acked``)."""

    __slots__ = ("pending", "event", "due", "due_us")

    def __init__(self, env):
        self.pending = 0
        self.event = env.event()
        self.due = 0
        self.due_us = 0.0

    def handler_ends_at(self, end_us: float) -> None:
        """A target started the handler that acks this one; it acks at ``end_us``."""
        self.due += 1
        if end_us > self.due_us:
            self.due_us = end_us

    def acked_before(self, time_us: float) -> bool:
        """Every pending ack comes strictly before ``time_us``."""
        return self.due == self.pending and self.due_us < time_us

    def ack(self) -> None:
        self.pending -= 1
        self.due -= 1
        if self.pending == 0:
            self.event.succeed()


class Policy:
    name = ""

    def __init__(self, part):
        self.part = part
        self.env = part.env
        self.costs = part.config.costs
        self.recorder = part.recorder
        self.check = part.check
        g = part.config.guest
        linux_guest = self.name in LINUX_POLICIES
        self.lazy_tlb = g.lazy_tlb == "on" or (g.lazy_tlb == "auto" and linux_guest)
        self.pv_sched_yield = g.pv_sched_yield == "on" or (
            g.pv_sched_yield == "auto" and self.name in ("ipi", "kvm-pv") and part.profile.name == "kvm")
        self._local: dict = {}  # (address space, pages) -> (FlushScope, local flush cost in us)
        self.user_apic = part.config.partition.apic_emulation == "user"  # ICR writes exit to the stack

    def shootdown(self, vp, request):
        """One shootdown by ``vp`` (a generator): its own flush, then the remote part."""
        part = self.part
        targets = part.targets_of(vp, request.address_space)
        sd = self.recorder.started(vp.index, self.name, request, self.env.now, targets, part.index, vp.clock())
        local = self._local.get((request.address_space, request.pages))
        if local is None:
            local = self._local[(request.address_space, request.pages)] = (
                FlushScope(request.address_space, True, request.pages), self.costs.local_flush_cost_us(request.pages))
        scope, local_us = local
        if request.address_space == vp.address_space:
            self.recorder.flushing_locally(sd, local_us)
            vp.set_state(FLUSH)
            yield self.env.timeout(local_us)
            vp.flush_locally(scope, sd)
        if self.lazy_tlb and targets and not self.flushes_every_vp(targets):
            active = []  # idle (halted) VPs are in lazy-TLB mode: they flush when they next run
            for t in targets:
                if t.state == HALTED:
                    t.defer_flush(scope, sd, None)  # the guest's own deferral (None: not the hypervisor's)
                else:
                    active.append(t)
            if len(active) < len(targets):
                self.recorder.targets_named(sd, len(targets) - len(active))
            targets = active
        status = HvStatus.SUCCESS
        if targets:
            status = yield from self.remote(vp, sd, scope, targets)
        self.recorder.completed(sd, status, self.env.now, vp.clock())
        if self.check:
            part.check_flush_guarantee(sd)

    def flushes_every_vp(self, targets) -> bool:
        """The guest flushes every VP whatever their lazy state (Linux: mm_cpumask is every present
        CPU, tested before lazy CPUs are skipped)."""
        return False

    def remote(self, vp, sd, scope, targets):
        raise NotImplementedError

    # Shared by ipi, kvm-pv and the linux fallback.
    def _ipis(self, vp, sd, scope, targets, per_target_us: float, exit_index: int, staggered: bool):
        env = self.env
        k = len(targets)
        self.recorder.ipis_sent(sd, k)
        acks = AckWait(env)
        acks.pending = k
        # The IPI delivered when the send ends rides on the sender's own timeout (its callback runs
        # first, then the sender resumes): one event a shootdown fewer, the same order (see _sent).
        if staggered:  # one trapped ICR write per target: an exit to the stack only with a user-mode APIC
            if self.user_apic:
                vp.record_exit(exit_index, k, per_target_us * k)
            else:
                vp.icr_writes += k
            last = k - 1
            for i, t in enumerate(targets):
                if i < last:
                    env.timeout(per_target_us * (i + 1)).callbacks.append(partial(_deliver, t, sd, scope, acks))
            send_us = per_target_us * k
            sent = _sent(env, send_us, partial(_deliver, targets[last], sd, scope, acks))  # the last target
        else:  # one PV send-IPI hypercall for all of them
            send_us = self.costs.vmexit_roundtrip_us + per_target_us * k
            vp.pv_ipi_hypercalls += 1  # handled in the hypervisor (KVM): not an exit to the stack
            sent = _sent(env, send_us, partial(_deliver_all, targets, sd, scope, acks))
        vp.ipi_send_us += send_us
        until = env.now + send_us
        vp.charge = (((until, CHARGE_SEND, send_us), (until, exit_index, send_us)) if self.user_apic and staggered
                     else ((until, CHARGE_SEND, send_us),))
        vp.exit_index = exit_index if self.user_apic and staggered else -1
        vp.set_state(EXIT)
        yield sent
        vp.exit_index = -1
        if self.pv_sched_yield:  # kvm_smp_send_call_func_ipi: yield to the first preempted target, once
            for t in targets:
                if t.preempted and not t.on_lp:
                    cost = self.costs.vmexit_roundtrip_us + self.costs.sched_yield_hypercall_us
                    vp.sched_yield_hypercalls += 1  # KVM_HC_SCHED_YIELD, handled in the hypervisor
                    vp.sched_yield_us += cost
                    vp.charge = ((env.now + cost, CHARGE_SCHED_YIELD, cost),)
                    vp.set_state(EXIT)
                    yield env.timeout(cost)
                    if t.dispatch_event is not None and vp.on_lp and not vp.preempt_pending:
                        vp.yield_lp_to(t)
                    break
        yield from vp.spin_until_acked(acks)


def _sent(env, send_us: float, deliver):
    """The sender's timeout for its IPI send, carrying the delivery due at the same instant.
    Before, that delivery was a timeout of its own scheduled just before the sender's: two
    consecutive events at one time and priority. Nothing ran between them: what a woken target
    schedules at that instant is NORMAL (a timeout, another VP's dispatch), so it queued behind
    the sender's timeout anyway, and no URGENT event (an Interruption) can arise (a woken target
    is on its LP in guest code, a spin or HLT, never with a preemption pending, and the sender
    is not interruptible while it sends). As one event, the delivery callback runs first and the
    sender resumes right after: the order the two events had. The exact tier of
    ``tlbsim check`` and tests/test_mechanisms.py hold the results to that."""
    sent = env.timeout(send_us)
    sent.callbacks.append(deliver)
    return sent


def _deliver(target, sd, scope, acks, _event) -> None:
    target.recorder.ipi_delivered(sd, target.on_lp)
    if target.post_ipi(sd, scope, acks):
        wake_for_ipi(target)


def _deliver_all(targets, sd, scope, acks, _event) -> None:
    recorder = targets[0].recorder
    for t in targets:
        recorder.ipi_delivered(sd, t.on_lp)
    woken = [t for t in targets if t.post_ipi(sd, scope, acks)]  # every IPI posted before any VP runs
    for t in woken:
        wake_for_ipi(t)


class IpiPolicy(Policy):
    name = "ipi"

    def remote(self, vp, sd, scope, targets):
        self.recorder.targets_named(sd, len(targets))
        yield from self._ipis(vp, sd, scope, targets, self.costs.vipi_us(), I_MSR, staggered=True)
        return HvStatus.SUCCESS


class KvmPvPolicy(Policy):
    name = "kvm-pv"

    def remote(self, vp, sd, scope, targets):
        self.recorder.targets_named(sd, len(targets))
        others = []
        for t in targets:
            if t.preempted:  # KVM_VCPU_PREEMPTED: flag KVM_VCPU_FLUSH_TLB (the whole guest TLB), no IPI
                t.defer_flush(EVERYTHING, sd, True)
            else:  # running, or halted / woken (not "preempted"): an IPI
                others.append(t)
        if others:
            yield from self._ipis(vp, sd, scope, others, self.costs.pv_ipi_per_target_us, I_HYPERCALL, False)
        return HvStatus.SUCCESS


class HypercallPolicy(Policy):
    def __init__(self, part):
        super().__init__(part)
        self._plans: dict = {}  # (initiator, address space, pages) -> CallPlan, or None: no call

    def build(self, vp, sd, scope, targets) -> tuple[FlushCall, FlushScope] | None:
        raise NotImplementedError

    def remote(self, vp, sd, scope, targets):
        """The hypervisor's generator for this shootdown's call (the policy
        adds no generator level of its own), or an empty one if there is no call."""
        key = (vp.index, scope.address_space, scope.pages)
        if self.lazy_tlb:  # the target set depends on which VPs are idle now
            key = (*key, *(t.index for t in targets))
        try:
            plan = self._plans[key]
        except KeyError:  # a plan per (initiator, address space, pages[, targets])
            built = self.build(vp, sd, scope, targets)
            plan = self._plans[key] = None if built is None else self.part.hypervisor.plan(vp, *built, targets)
        if plan is None:
            return _no_call()
        return self.part.hypervisor.flush(vp, plan, sd)


def _no_call():
    return HvStatus.SUCCESS
    yield  # a generator that issues nothing


class WindowsStylePolicy(HypercallPolicy):
    """``mask`` and ``all``: the List call for a range up to the ceiling, the
    Space call (NON_GLOBAL) for more or a whole address space
    (``guest.call_form = "list"``), or always the Space call (``"space"``)."""

    all_processors = False

    def build(self, vp, sd, scope, targets):
        pages = scope.pages
        use_list = (self.part.config.guest.call_form == "list" and pages is not None
                    and pages <= self.costs.flush_ceiling_pages)
        flags = HvFlushFlags.ALL_PROCESSORS if self.all_processors else 0
        vps = () if self.all_processors else target_indices(targets)
        ex = bool(vps) and max(vps) >= 64
        vp_set = hv.vps_to_vp_set(vps) if ex else None
        mask = 0 if self.all_processors or ex else hv.vps_to_mask(vps)  # an Ex call has no ProcessorMask
        if use_list:  # NON_GLOBAL is invalid on the List calls; a page flush is exact on every target
            gvas = hv.gva_ranges_for(0x1000, pages)
            call = (FlushCall.list_ex(scope.address_space, flags, vp_set, gvas) if ex
                    else FlushCall.list(scope.address_space, flags, mask, gvas))
            return call, FlushScope(scope.address_space, True, pages)
        flags |= NG
        call = (FlushCall.space_ex(scope.address_space, flags, vp_set) if ex
                else FlushCall.space(scope.address_space, flags, mask))
        return call, FlushScope(scope.address_space, True, None)


class MaskPolicy(WindowsStylePolicy):
    name = "mask"


class AllPolicy(WindowsStylePolicy):
    name = "all"
    all_processors = True

    def flushes_every_vp(self, targets) -> bool:
        """HV_FLUSH_ALL_PROCESSORS reaches every VP, lazy or not: skipping lazy VPs would change nothing."""
        return True


class LinuxPolicy(HypercallPolicy):
    name = "linux"

    def flushes_every_vp(self, targets) -> bool:
        """hyperv_flush_tlb_multi (arch/x86/hyperv/mmu.c) tests cpumask_equal(cpus, cpu_present_mask)
        first and sends HV_FLUSH_ALL_PROCESSORS then; only a partial mask skips lazy CPUs
        (cpu_is_lazy, in the mask loop and in cpumask_to_vpset_skip). ``targets`` are mm_cpumask
        without the initiator."""
        return len(targets) + 1 == self.part.config.partition.vps

    def build(self, vp, sd, scope, targets):
        n_vps = self.part.config.partition.vps
        cpus = sorted({vp.index, *(t.index for t in targets)})  # mm_cpumask, the initiator included
        pages = scope.pages
        if pages is not None and pages > self.costs.flush_ceiling_pages:
            pages = None  # flush_tlb_mm_range turns a large range into a full flush
        flags = 0
        ex = False
        if len(cpus) == n_vps:
            flags |= HvFlushFlags.ALL_PROCESSORS
        elif cpus[-1] >= 64:
            ex = True
        if pages is None:
            flags |= NG
            hv_scope = FlushScope(scope.address_space, True, None)
            gvas = None
        else:
            n_banks = cpus[-1] // 64 + 1 if ex else 0
            gva_n = -(-pages // hv.GVA_RANGE_MAX_PAGES)
            limit = LINUX_MAX_GVAS_EX - n_banks if ex else LINUX_MAX_GVAS
            if gva_n > limit:
                hv_scope = FlushScope(scope.address_space, False, None)
                gvas = None
            else:
                hv_scope = FlushScope(scope.address_space, True, pages)
                gvas = hv.gva_ranges_for(0x1000, pages)
        if ex:
            top_bank = cpus[-1] // 64
            words = [0] * (top_bank + 1)  # Linux sends every bank up to the highest
            for c in cpus:
                words[c // 64] |= 1 << (c % 64)
            vp_set = VpSet(0, (1 << (top_bank + 1)) - 1, tuple(words))
            call = (FlushCall.space_ex(scope.address_space, flags, vp_set) if gvas is None
                    else FlushCall.list_ex(scope.address_space, flags, vp_set, gvas))
        else:
            mask = 0 if flags & HvFlushFlags.ALL_PROCESSORS else hv.vps_to_mask(cpus)
            call = (FlushCall.space(scope.address_space, flags, mask) if gvas is None
                    else FlushCall.list(scope.address_space, flags, mask, gvas))
        return call, hv_scope

    def remote(self, vp, sd, scope, targets):
        status = yield from super().remote(vp, sd, scope, targets)
        if status != HvStatus.SUCCESS:  # Linux falls back to native IPIs on any failure
            self.recorder.targets_named(sd, len(targets))
            yield from self._ipis(vp, sd, scope, targets, self.costs.vipi_us(), I_MSR, staggered=True)
            return HvStatus.SUCCESS  # the shootdown succeeded; hypercall_status keeps the call's failure
        return status


POLICY_CLASSES = {p.name: p for p in (IpiPolicy, MaskPolicy, AllPolicy, LinuxPolicy, KvmPvPolicy)}


def make_policy(name: str, part) -> Policy:
    return POLICY_CLASSES[name](part)

