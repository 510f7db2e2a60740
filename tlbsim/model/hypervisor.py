"""The hypervisor's flush hypercall service.

One call: entry and decode (under the partition's profile), the lock check,
then the flush, in one or more segments (docs/model.md "Hypervisor
fan-out"). A segment costs the caller

    entry  = vmexit_roundtrip + hypercall_decode [+ vtl2_roundtrip: OpenHCL on SNP / TDX]
             + mask_per_vp x |named VPs| (none with ALL_PROCESSORS) + vp_set_per_bank x |bank words|
    + list_per_range x (its reps)                                   (List calls)
    + fan-out, by how the running targets are reached:
      IPIs       hv_ipi_send_us x k + (k > 0) x (hv_ipi_roundtrip_us + target_interrupt_us
                 [+ vtl2_roundtrip: TDX] + target work)
                 target work = invlpg x (its pages), or hv_context_flush for a whole space:
                 sent back to back, acknowledged in parallel: the slowest target is any one
      INVLPGB    broadcast_issue x (instructions) + broadcast_sync          (host.broadcast_flush, SNP)
      RAR        hv_ipi_send_us x k + broadcast_issue x (payloads) + broadcast_sync

The targets' side is arithmetic (no event per target): a running target
interrupted by an IPI owes its interruption and flush work as debt; a
broadcast interrupts nobody; a target off its LP gets the flush at its next
entry (``deferred_flush_us``), except under INVLPGB, which reaches every LP.

A rep (List) call returns to its caller at a rep boundary once a segment has
run ``continuation_limit_us`` (TLFS: "The hypervisor attempts to limit
hypercall execution to 50us or less before returning control", rep calls
continue from RepStartIndex): at most reps - 1 continuations, each a real
return to the guest (the host may preempt the caller there) and a new entry.
A Space call is a simple hypercall: the TLFS gives it no continuation ("a
small number of simple hypercalls might require more time"), so it runs to
the end however many targets it has.

If a target *requires* the flush (drawn from its TLB's occupancy: locks.py)
and its TLB is locked when decode ends (with lock sources, the entry is a
timeout of its own and the check runs at its end), the caller waits as the
profile says:
``reissue`` (TLFS: the running targets before the first locked one, in VP
order, are flushed and interrupted, the caller is suspended until the first
lock lifts, then the whole call is reissued, re-interrupting them:
starvation is possible) or
``snapshot`` (OpenHCL, hardware_cvm/tlb_lock.rs: the flush is done, then the
caller halts until the holders at that moment release, woken by the last).
A wait for a lock due to lift within ``locks.wait_spin_us`` is spent spinning
on the LP. What the shootdown's row says goes through the recorder.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from tlbsim import hv
from tlbsim.hv import FlushCall, HvStatus
from tlbsim.model.accounting import GUEST, HYPERCALL, SPINNING, SUSPENDED
from tlbsim.model.tlb import EVERYTHING, FlushScope
from tlbsim.model.vp_arrays import ADDRESS_SPACE, HV_DEBT, WORKING_SET, flush_running

if TYPE_CHECKING:
    from tlbsim.model.partition import Partition

_INDEX = attrgetter("index")

#: How a call reaches its running targets (``Hypervisor.fanout_mode``).
IPI, INVLPGB, RAR = "ipi", "invlpgb", "rar"
#: Pages one RAR payload covers (RAR_INVLPG_MAX_PAGES, Intel RAR RFC, 2025).
RAR_MAX_PAGES = 63
#: OpenHCL on SNP: a List call with more ranges, or a range of more pages, becomes a flush of the whole
#: space (openvmm processor/snp: do_flush_virtual_address_list)
SNP_LIST_MAX = 16
#: OpenHCL on TDX: the per-VP ring of pending GVA ranges (FLUSH_GVA_LIST_SIZE, processor/tdx/tlb_flush.rs);
#: more becomes a full flush
TDX_RING_RANGES = 32


def target_indices(targets) -> tuple[int, ...]:
    """The VP index of each target, in order (a partition.OtherVPs view has them at hand)."""
    indices = getattr(targets, "indices", None)
    return indices() if indices is not None else tuple(map(_INDEX, targets))


class CallPlan:
    """Everything about one (caller, call) pair that does not change during a
    run: the decoded call, its status, its target VPs and its segments by
    number of running targets. Guests issue the same few calls again and
    again; a plan is built once and reused, so the hot path hashes no call.

    A partition of n VPs holds up to n plans of up to n - 1 targets, so a plan
    keeps no more per target than the target list itself: the validation's
    target tuple is dropped once counted, membership is a bitmask (512 bytes
    at 4,096 VPs, where a dict of positions took 300 KB), and segments are kept
    only for the running-target counts that occur."""

    __slots__ = ("call", "scope", "status", "ok", "all_processors", "n_named", "call_code", "flags", "targets",
                 "member", "rep_pages", "entry_us", "segments_us", "fanouts_us", "lo", "hi", "vmask",
                 "flushable")

    def __init__(self, call: FlushCall, scope: FlushScope, validation: hv.Validation, targets: list, member: int,
                 rep_pages: tuple[int, ...], entry_us: float):
        self.call = call
        self.scope = scope
        self.status = validation.status
        self.ok = validation.ok
        self.all_processors = validation.all_processors
        self.n_named = len(validation.targets) + len(validation.ignored_vps)  # VPs the call names or walks
        self.call_code = call.call_code
        self.flags = call.flags
        self.targets = targets  # ascending VP index: the lock-holder order
        self.member = member  # bit i set: VP i is a target
        self.rep_pages = rep_pages  # pages of each rep still to do (List calls; () for Space calls)
        self.entry_us = entry_us  # entry, decode and the VP-set walk: paid again at every continuation
        self.segments_us: dict[int, tuple[float, ...]] = {}  # by running targets
        self.fanouts_us: dict[int, tuple[float, ...]] = {}  # of each segment: reaching the running targets
        # array-backed partitions (vp_arrays.py): the targets as a mask over VPs lo .. hi - 1
        self.lo = self.hi = 0
        self.vmask = None
        self.flushable = None  # ... of which those whose TLB the scope applies to (vp_arrays.flush_running)


class Hypervisor:
    def __init__(self, part: Partition):
        self.part = part
        self.env = part.env
        self.costs = part.config.costs
        self.profile = part.profile
        self.locks = part.locks
        self.recorder = part.recorder
        self.whole_context = part.config.tlb.hypervisor_flush == "vpid"
        self.record_ids = part.config.run.check_invariants  # every VP keeps applied_ids (VP.__init__)
        self.traced = part.timeline is not None  # its VPs are TracingVPs
        self.n_vps = part.config.partition.vps
        # large partitions: the VPs' flush state in arrays, flushed by vp_arrays.flush_running (the
        # per-VP verbs where the arrays do not apply: a timeline's TracingVPs, scopes with global entries)
        self.arrays = part.vp_arrays
        locks = part.config.locks
        self.lock_wait = self.profile.lock_wait if locks.wait == "profile" else locks.wait
        if not self.profile.suspends_on_tlb_lock:
            self.lock_wait = "none"  # the hypervisor has no TLB locks to wait for (KVM)
        self.wait_spin_us = locks.wait_spin_us
        # With TLB locks to check (reissue), the check happens when the decode ends: one timeout for the
        # entry, then the rest of the first segment (a call with no lock source costs one timeout). The
        # partition registers its lock sources before it builds the hypervisor.
        self.checks_locks = self.lock_wait == "reissue" and bool(self.locks.sources)
        host = part.config.host
        self.isolation = part.isolation  # "none", "snp" or "tdx" (OpenHCL)
        self.broadcast = host.broadcast_flush
        self.broadcast_min_cpus = host.broadcast_min_cpus
        self.invlpgb_max_pages = host.invlpgb_max_pages
        c = self.costs
        self.vtl2_us = c.vtl2_roundtrip_us if self.isolation != "none" else 0.0
        # what an IPI-reached running target owes (its interruption; TDX: its exit into VTL2 too), before
        # its flush work
        self.target_hit_us = c.target_interrupt_us + (c.vtl2_roundtrip_us if self.isolation == "tdx" else 0.0)

    def plan(self, vp, call: FlushCall, scope: FlushScope, named: list | None = None) -> CallPlan:
        """The plan of ``call`` issued by ``vp``, flushing ``scope`` on its
        targets: validated (under the partition's profile) once, when the
        policy first needs it. ``named``: the VPs the guest built the call
        from; when the validated targets are exactly these, the plan shares
        the list instead of holding a copy."""
        validation = self.profile.validate(call, self.n_vps)
        if self.part.config.run.inject_fault == "deny_hypercalls":
            validation = hv.Validation(HvStatus.ACCESS_DENIED, reason="run.inject_fault = deny_hypercalls")
        vps = self.part.vps
        indices = validation.targets if validation.ok else ()  # ascending
        at = bisect_left(indices, vp.index)
        if at < len(indices) and indices[at] == vp.index:  # the caller is no target of its own call
            indices = indices[:at] + indices[at + 1:]
        flags = None
        if self.arrays is not None and indices and indices[0] >= 0 and indices[-1] < self.n_vps:
            # an array-backed plan's targets as flags over the VPs, and its membership bits packed from
            # them: the same int as hv.bits_of (validated targets are ints of the partition), without
            # its per-index type checks
            flags = np.zeros(self.n_vps, dtype=np.bool_)
            flags[np.fromiter(indices, np.int64, len(indices))] = True
            member = int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")
        else:
            member = hv.bits_of(indices, hv.MAX_VP_INDEX)
        if named is not None and len(named) == len(indices) and target_indices(named) == indices:
            targets = named  # the same VPs in the same (ascending) order: share the list
        else:
            targets = [vps[i] for i in indices]
        ranges = call.gva_ranges[call.control.rep_start_index:call.control.rep_count] if call.gva_ranges else ()
        rep_pages = tuple(hv.gva_range_pages([r]) for r in ranges)
        if self.profile.flush_whole_tlb:
            limit = self.profile.flush_queue_ranges - 1  # one slot is kept for "flush everything"
            if call.gva_ranges is None or len(rep_pages) > limit:
                scope = EVERYTHING  # KVM: the whole guest TLB, NON_GLOBAL and AddressSpace ignored
        if scope.pages is not None and (
                (self.isolation == "snp" and (len(rep_pages) > SNP_LIST_MAX or max(rep_pages) > SNP_LIST_MAX))
                or (self.isolation == "tdx" and len(rep_pages) > TDX_RING_RANGES)):
            scope = FlushScope(scope.address_space, True, None)  # OpenHCL turns the list into a full flush
        c = self.costs
        entry = c.vmexit_roundtrip_us + c.hypercall_decode_us + self.vtl2_us
        if validation.ok:
            if not validation.all_processors:
                entry += c.mask_per_vp_us * (len(validation.targets) + len(validation.ignored_vps))
            if call.vp_set is not None:
                entry += c.vp_set_per_bank_us * len(call.vp_set.banks)
        plan = CallPlan(call, scope, validation, targets, member, rep_pages, entry)
        if flags is not None:
            plan.lo, plan.hi = indices[0], indices[-1] + 1
            plan.vmask = flags[plan.lo:plan.hi]
            f = self.arrays.f[:, plan.lo:plan.hi]
            flushable = plan.vmask.copy()
            if scope.address_space is not None:
                flushable &= f[ADDRESS_SPACE] == scope.address_space
            if scope.pages is not None:
                flushable &= f[WORKING_SET] != 0.0
            plan.flushable = flushable
        return plan

    # ------------------------------------------------------------ costs
    def fanout_mode(self, k_running: int) -> str:
        """How a call reaches ``k_running`` running targets: IPIs, or a hardware broadcast when the
        host has one and more than ``broadcast_min_cpus - 1`` CPUs (the caller's included) run the
        context (Linux 6.15's rule, arch/x86/mm/tlb.c). OpenHCL on SNP always broadcasts (its VTL2
        flush handler issues INVLPGB + TLBSYNC); on TDX it kicks the targets (IPIs)."""
        if self.isolation == "snp":
            return INVLPGB
        if self.isolation == "tdx" or self.broadcast == "none" or k_running + 1 < self.broadcast_min_cpus:
            return IPI
        return self.broadcast

    def target_work_us(self, pages: int | None) -> float:
        """A running target's flush work on its LP: INVLPG per page, or a context flush."""
        return self.costs.hv_context_flush_us if pages is None else self.costs.invlpg_us * pages

    def fanout_us(self, mode: str, k_running: int, rep_pages: tuple[int, ...]) -> float:
        """What reaching the running targets costs the caller for one segment that flushes the reps
        ``rep_pages`` (() for a whole space)."""
        c = self.costs
        pages = sum(rep_pages) if rep_pages else None
        if mode == IPI:
            if not k_running:
                return 0.0
            return (c.hv_ipi_send_us * k_running + c.hv_ipi_roundtrip_us + self.target_hit_us
                    + self.target_work_us(pages))
        per = self.invlpgb_max_pages if mode == INVLPGB else RAR_MAX_PAGES
        instructions = sum(-(-p // per) for p in rep_pages) if rep_pages else 1
        cost = c.broadcast_issue_us * instructions + c.broadcast_sync_us
        return cost + c.hv_ipi_send_us * k_running if mode == RAR else cost

    def segments_us(self, plan: CallPlan, k_running: int) -> tuple[float, ...]:
        """The call's segments with ``k_running`` targets on their LPs, us: one for a Space call or a
        failed call; a List call returns to its caller at the first rep boundary after
        ``continuation_limit_us`` of a segment, at most reps - 1 times."""
        found = plan.segments_us.get(k_running)
        if found is not None:
            return found
        c = self.costs
        fanouts: tuple[float, ...] = ()
        if not plan.ok:
            out = (c.vmexit_roundtrip_us + c.hypercall_decode_us + self.vtl2_us,)
        else:
            mode = self.fanout_mode(k_running)
            reps = plan.rep_pages if plan.scope.pages is not None else ()
            if not reps:  # a Space call, or a List call turned into a whole flush (its ranges still read)
                fanout = self.fanout_us(mode, k_running, ())
                out = (plan.entry_us + c.list_per_range_us * len(plan.rep_pages) + fanout,)
                fanouts = (fanout,)
            else:
                limit = c.continuation_limit_us
                segments, segment_fanouts, batch = [], [], []
                for i, pages in enumerate(reps):
                    batch.append(pages)
                    fanout = self.fanout_us(mode, k_running, tuple(batch))
                    elapsed = plan.entry_us + c.list_per_range_us * len(batch) + fanout
                    if i == len(reps) - 1 or (limit > 0 and elapsed >= limit):
                        segments.append(elapsed)
                        segment_fanouts.append(fanout)
                        batch = []
                out = tuple(segments)
                fanouts = tuple(segment_fanouts)
        plan.segments_us[k_running] = out
        plan.fanouts_us[k_running] = fanouts
        return out

    def call_cost_us(self, plan: CallPlan, k_running: int) -> float:
        """What the call costs its caller with ``k_running`` targets on their LPs, us (every segment)."""
        return sum(self.segments_us(plan, k_running))

    # ------------------------------------------------------------ the call
    def flush(self, vp, plan: CallPlan, sd):
        """Run one flush hypercall for ``vp`` (a generator); returns its HvStatus."""
        env = self.env
        recorder = self.recorder
        if not plan.ok:
            recorder.call_issued(sd, plan.call_code, plan.flags, 0)
            yield from self._in_hypercall(vp, sd, self.segments_us(plan, 0)[0])
            recorder.call_returned(sd, plan.status)
            return plan.status
        targets = plan.targets
        scope = plan.scope
        recorder.call_issued(sd, plan.call_code, plan.flags, len(targets))
        checked = self.checks_locks
        c_range = self.costs.list_per_range_us
        while checked:
            yield from self._in_hypercall(vp, sd, plan.entry_us)
            holders = self.locks.holders(self.part.vps, plan.member, scope, env.now)
            if not holders:
                break
            # the call walks its targets in VP order, flushing (interrupting) the running ones, until it meets
            # the first holder; the caller is then suspended until the first lock lifts and reissues the
            # whole call, which interrupts those targets again
            first = holders[0][2].index  # holders are in VP order
            if plan.vmask is not None and self._vectorised(scope):
                k = self._flush_running_arrays(plan, first, scope, sd, env.now)
                mode = self.fanout_mode(k)
            else:
                free = []
                for t in targets:
                    if t.index >= first:
                        break
                    if t.on_lp:
                        free.append(t)
                mode = self.fanout_mode(len(free))
                k = self._flush_running(free, scope, sd, env.now, mode)
            fanout = self.fanout_us(mode, k, self._reps(plan))
            yield from self._in_hypercall(vp, sd, c_range * len(plan.rep_pages) + fanout, fanout=fanout)
            yield from self._wait_for_locks(vp, sd, holders, reissue=True)
        now = env.now
        vectorised = plan.vmask is not None and self._vectorised(scope)
        if self.broadcast != "none" and self.isolation == "none":  # broadcast or IPIs: by the running count
            mode = self.fanout_mode(self._running_count(plan) if vectorised else sum(1 for t in targets if t.on_lp))
        else:
            mode = self.fanout_mode(0)
        if vectorised:
            running = self._flush_targets_arrays(plan, scope, sd, now, mode)
        else:
            running = self.flush_targets(targets, scope, sd, now, mode)
        segments = self.segments_us(plan, running)
        fanouts = plan.fanouts_us[running] if plan.ok else ()
        if len(segments) > 1 and mode == IPI and running:  # each segment interrupts its targets again
            again = (len(segments) - 1) * self.target_hit_us
            if vectorised:
                hv_debt = self.arrays.f[HV_DEBT, plan.lo:plan.hi]
                np.add(hv_debt, again, out=hv_debt, where=plan.vmask & self.arrays.on_lp[plan.lo:plan.hi])
            else:
                for t in targets:
                    if t.on_lp:
                        t.hv_debt_us += again
        first = segments[0] - plan.entry_us if checked else segments[0]  # the entry is paid already
        yield from self._in_hypercall(vp, sd, first, now, fanouts[0])
        for cost, fanout in zip(segments[1:], fanouts[1:], strict=True):
            # continuations: a return to the guest at a rep boundary, then a new entry
            recorder.continued(sd)
            if vp.preempt_pending:  # the host takes the LP at the return
                vp.give_up_lp_preempted()
                yield from vp.wait_for_lp()
            yield from self._in_hypercall(vp, sd, cost, fanout=fanout)
        if self.lock_wait == "snapshot" and self.locks.any_active():
            # set_wait_for_tlb_locks: every VP of the partition holding a TLB lock now, target or not, with
            # no "requires" test (the flush is already done)
            holders = self.locks.all_holders(self.part.vps, env.now)
            if holders:  # the flush is done; the caller halts until the holders at this moment release
                yield from self._wait_for_locks(vp, sd, holders, reissue=False)
        recorder.call_returned(sd, HvStatus.SUCCESS)
        return HvStatus.SUCCESS

    @staticmethod
    def _reps(plan: CallPlan) -> tuple[int, ...]:
        return plan.rep_pages if plan.scope.pages is not None else ()

    def _debt_us(self, mode: str, scope: FlushScope) -> float:
        """What a running target owes for the flush: its interruption and its flush work (IPIs), or
        nothing (a broadcast invalidates its TLB without interrupting it)."""
        return self.target_hit_us + self.target_work_us(scope.pages) if mode == IPI else 0.0

    def flush_targets(self, targets, scope: FlushScope, sd, now: float, mode: str) -> int:
        """Flush every running target now and defer the others (INVLPGB reaches every LP: flushed now
        too); returns how many were running. A function of its own so that its per-target list dies
        before the caller waits out the call's cost (kept in the generator's frame, 4,096 such lists
        of 4,095 tuples held 1.2 GB)."""
        whole_context = self.whole_context
        debt = self._debt_us(mode, scope)
        defer_idle = mode != INVLPGB
        if scope.pages is not None:  # every List call: the fast path
            required, deferred = flush_pages_by_hypervisor(targets, scope, whole_context, sd, now, debt,
                                                           self.costs.refill_us, self.record_ids, defer_idle,
                                                           self.traced)
            if deferred:
                self.recorder.deferred(sd, deferred)
            elif not defer_idle and len(required) < len(targets):
                self.recorder.flushed_off_lp(sd, len(targets) - len(required))
            self.recorder.running_flushed_pages(sd, required)
            return len(required)
        flushed = []  # (required, removed) of each running target
        for t in targets:
            if t.on_lp:
                flushed.append(t.flush_by_hypervisor(scope, sd, whole_context, now, debt))
            elif defer_idle:
                t.defer_flush(scope, sd, whole_context)
            else:
                t.flush_now_idle(scope, sd, whole_context)
        if not defer_idle and len(flushed) < len(targets):
            self.recorder.flushed_off_lp(sd, len(targets) - len(flushed))
        self.recorder.running_flushed(sd, flushed)
        return len(flushed)

    # ------------------------------------------------------------ array-backed partitions
    def _vectorised(self, scope: FlushScope) -> bool:
        """Does ``vp_arrays.flush_running`` do this scope (a page scope, or an address space's
        non-global entries)?"""
        return scope.pages is not None or scope.non_global_only

    def _running_count(self, plan: CallPlan) -> int:
        return int(np.count_nonzero(plan.vmask & self.arrays.on_lp[plan.lo:plan.hi]))

    def _flush_running_arrays(self, plan: CallPlan, first: int, scope: FlushScope, sd, now: float) -> int:
        """``_flush_running`` of the running targets before VP ``first`` (the first lock holder), on
        the arrays; returns how many."""
        lo, hi = plan.lo, min(plan.hi, first)
        if hi <= lo:
            self.recorder.running_flushed_arrays(sd, 0, None, None)
            return 0
        on = self.arrays.on_lp[lo:hi]
        sel = plan.vmask[:hi - lo] & on
        k = int(np.count_nonzero(sel))
        if k:
            debt = self._debt_us(self.fanout_mode(k), scope)
            required, removed = flush_running(self.arrays, lo, sel, plan.flushable[:hi - lo] & on, now, debt,
                                              scope.pages, self.whole_context, self.costs.refill_us)
            self._record_ids(lo, sel, sd)
        else:
            required = removed = None
        self.recorder.running_flushed_arrays(sd, k, required, removed)
        return k

    def _flush_targets_arrays(self, plan: CallPlan, scope: FlushScope, sd, now: float, mode: str) -> int:
        """``flush_targets`` on the arrays: the targets off their LPs one by one (deferred, or under
        INVLPGB flushed now), then every running one by ``vp_arrays.flush_running``; returns how many
        were running."""
        lo, hi = plan.lo, plan.hi
        on = self.arrays.on_lp[lo:hi]
        sel = plan.vmask & on
        off = np.flatnonzero(plan.vmask & ~on)
        whole_context = self.whole_context
        defer_idle = mode != INVLPGB
        vps = self.part.vps
        if len(off):
            if defer_idle:  # VP.defer_flush, reported once
                item = (sd, scope, whole_context)
                for i in off.tolist():
                    vps[lo + i].deferred.append(item)
                self.recorder.deferred(sd, len(off))
            else:
                for i in off.tolist():
                    vps[lo + i].flush_now_idle(scope, sd, whole_context)
                self.recorder.flushed_off_lp(sd, len(off))
        k = int(np.count_nonzero(sel))
        if k:
            required, removed = flush_running(self.arrays, lo, sel, plan.flushable & on, now,
                                              self._debt_us(mode, scope), scope.pages, whole_context,
                                              self.costs.refill_us)
            self._record_ids(lo, sel, sd)
        else:
            required = removed = None
        self.recorder.running_flushed_arrays(sd, k, required, removed)
        return k

    def _record_ids(self, lo: int, sel, sd) -> None:
        """Under the invariant checks every flushed VP keeps the shootdown's id (VP.applied_ids)."""
        if self.record_ids:
            vps = self.part.vps
            for i in np.flatnonzero(sel).tolist():
                vps[lo + i].applied_ids.add(sd.id)

    def _flush_running(self, free, scope: FlushScope, sd, now: float, mode: str) -> int:
        """A call that met a locked TLB flushes the running targets that are not locked (they are
        flushed again when it is reissued); returns how many."""
        debt = self._debt_us(mode, scope)
        flushed = [t.flush_by_hypervisor(scope, sd, self.whole_context, now, debt) for t in free]
        self.recorder.running_flushed(sd, flushed)  # their refills are the row's (running_targets: the last try's)
        return len(free)

    def _in_hypercall(self, vp, sd, cost_us: float, now: float | None = None, fanout: float = 0.0):
        """``cost_us`` in the hypercall, of which ``fanout`` us reaching the running targets."""
        vp.set_state(HYPERCALL, now)
        yield self.env.timeout(cost_us)
        if fanout:
            self.recorder.fanned_out(sd, fanout)

    def _wait_for_locks(self, vp, sd, holders, reissue: bool):
        """The caller waits for the lock holders. ``reissue`` (TLFS): suspended until the *first* lock
        lifts, then (on an LP again) it reissues the call. Otherwise (OpenHCL's
        should_halt_for_tlb_unlock): halted until the *last* holder releases and wakes it (wake_vtl2:
        ``lock_release_wake_us``); no reissue. A lift due within ``wait_spin_us`` is waited for
        spinning on the LP (spin time, not suspended time). A holder preempted while holding its
        lock has no known end: the caller waits for its release event."""
        env = self.env
        start = env.now
        self.recorder.suspended(sd)
        ends = [end for end, _, _ in holders]
        lift_us = min(ends) if reissue else max(ends)
        if lift_us - start <= self.wait_spin_us:
            vp.set_state(SPINNING)
            yield env.timeout(max(0.0, lift_us - start))
            if reissue:
                self.recorder.resumed(sd)
            return
        vp.give_up_lp(SUSPENDED)
        wake_us = 0.0 if reissue else self.costs.lock_release_wake_us
        if max(ends) < math.inf:  # every end known: one timeout (the lift, then any wake-up)
            yield env.timeout(max(0.0, lift_us - start) + wake_us)
        else:
            yield self._lifted(holders, first=reissue)
            if wake_us:
                yield env.timeout(wake_us)
        if reissue:
            self.recorder.resumed(sd)
        yield from vp.wait_for_lp()

    def _lifted(self, holders, first: bool):
        """With some holders' ends unknown (preempted while holding): the event of the first (or last)
        release, from their release events and a timeout for the first (last) of the known ends."""
        env = self.env
        known = [end for end, _, _ in holders if end < math.inf]
        events = [t.lock_release_event() for end, _, t in holders if end == math.inf]
        if known:
            events.append(env.timeout(max(0.0, (min(known) if first else max(known)) - env.now)))
        return env.any_of(events) if first else env.all_of(events)


def flush_pages_by_hypervisor(targets, scope: FlushScope, whole_context: bool, shootdown, now: float,
                              debt_us: float, refill_us: float, record_ids: bool,
                              defer_idle: bool = True, traced: bool = False) -> tuple[list[float], int]:
    """The hypervisor flushes a page scope (``scope.pages`` is set) on every target at ``now``: each
    target on an LP as ``VP.flush_by_hypervisor`` does it (a List call's scope, ``debt_us`` of
    interruption and flush work owed by each), each other one deferred (``VP.defer_flush``), or, with
    ``defer_idle`` False (a hardware broadcast reaches every LP), flushed now at no cost to it. Returns
    the entries each running target's flush required, in target order (page flushes are exact: removed
    = required, no collateral), and how many targets were deferred, for the caller to report
    (``ShootdownRecorder.running_flushed_pages`` and ``deferred``).

    The one fast path of the hottest loop of a large partition (a 1-page List call to 4,095
    running targets, every shootdown of the default guest): the same arithmetic in the same
    order as ``flush_by_hypervisor`` with ``Tlb.flush_pages`` (tests/test_model.py checks the
    results bit for bit), inline, without two calls and a tuple per target (docs/performance.md says
    what that saves). Collateral entries are left alone: adding ``removed - required`` (+0.0) to a sum
    that starts at 0.0 and never falls below it changes no bit (the VP's ``collateral_entries`` and the
    row's alike). ``refill_us`` and ``record_ids`` (the invariant checks are on: every VP keeps
    ``applied_ids``) are passed, not read per target."""
    address_space, pages = scope.address_space, scope.pages
    required_list = []
    append = required_list.append
    deferred = 0
    for t in targets:
        if not t.on_lp:
            if defer_idle:  # VP.defer_flush, inline; the caller reports the count
                t.deferred.append((shootdown, scope, whole_context))
                deferred += 1
            else:  # VP.flush_now_idle
                t.book_flush(shootdown, *t.tlb.flush_pages(address_space, pages))
            continue
        if traced:  # a TracingVP: its timeline sees the guest time accounted
            t.advance_guest(now)
        elif t.state == GUEST and now > t.since:  # TimeAccount.advance_guest, inline
            t.account_guest(now - t.since)
            t.since = now
        tlb = t.tlb
        t.hv_debt_us += debt_us
        working_set = tlb.working_set
        if (address_space is not None and address_space != tlb.address_space) or not working_set:
            required = 0.0
        else:
            nonglobal = tlb.nonglobal
            required = pages * nonglobal / working_set
            if required > nonglobal:
                required = nonglobal
            tlb.nonglobal = nonglobal - required
        t.refill_debt_us += required * refill_us
        t.refill_entries += required
        t.flushes_applied += 1
        if record_ids:
            t.applied_ids.add(shootdown.id)
        append(required)
    return required_list, deferred
