"""The hypervisor's flush hypercall service.

One call: decode and validate (under the partition's profile), check the TLB
locks of the targets, then flush: targets on an LP are interrupted (IPI to
the LP, flush, ack: the caller waits for them), targets that are not on an
LP get the flush deferred to their next entry and are not waited for. The
call costs the caller:

    vmexit_roundtrip + hypercall_decode
      + mask_per_vp x |named VPs|              (ProcessorMask or VP set walk; none with ALL_PROCESSORS)
      + vp_set_per_bank x |bank words|         (Ex calls)
      + flush_per_running_target x k_running   (every running target, mask or ALL_PROCESSORS alike)
      + list_per_range x reps + invlpg x pages (List calls)
      + vmexit_roundtrip x (continuations)     (rep calls longer than the ~50 us limit)

A ProcessorMask and HV_FLUSH_ALL_PROCESSORS reach each running target the
same way (its LP is interrupted and acknowledges); what differs is the mask
walk (mask only) and which VPs are flushed (ALL: every running VP of the
partition, sharers or not: collateral interruptions and refills).

If a target *requires* the flush and its TLB is locked (locks.TlbLocks
answers), the caller waits as the profile says: ``reissue`` (TLFS: pays the
entry and decode, is suspended off its LP until the lock lifts, then
reissues the whole call, which may find another lock: starvation is
possible) or ``snapshot`` (OpenHCL: waits, halted, only for the holders at
call time, is woken by the last to release, then flushes everyone). A lock
due to lift within ``locks.wait_spin_us`` is waited for on the LP. Applying
flushes to targets costs no events. What the shootdown's row says goes
through the recorder (records.py).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from operator import attrgetter
from typing import TYPE_CHECKING

from tlbsim import hv
from tlbsim.hv import FlushCall, HvStatus
from tlbsim.model.tlb import EVERYTHING, FlushScope
from tlbsim.model.vp import HYPERCALL, SUSPENDED, flush_pages_by_hypervisor

if TYPE_CHECKING:
    from tlbsim.model.partition import Partition

_INDEX = attrgetter("index")


class CallPlan:
    """Everything about one (caller, call) pair that does not change during a
    run: the decoded call, its status, its target VPs and its cost by
    number of running targets. Guests issue the same few calls again and
    again; a plan is built once and reused, so the hot path hashes no call.

    A partition of n VPs holds up to n plans of up to n - 1 targets, so a plan
    keeps no more per target than the target list itself: the validation's
    target tuple is dropped once counted, membership is a bitmask (512 bytes
    at 4,096 VPs, where a dict of positions took 300 KB), and costs are kept
    only for the running-target counts that occur."""

    __slots__ = ("call", "scope", "status", "ok", "all_processors", "n_named", "call_code", "flags", "targets",
                 "member", "cost_us")

    def __init__(self, call: FlushCall, scope: FlushScope, validation: hv.Validation, targets: list, member: int):
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
        self.cost_us: dict[int, float] = {}  # by running targets


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
        self.n_vps = part.config.partition.vps
        locks = part.config.locks
        self.lock_wait = self.profile.lock_wait if locks.wait == "profile" else locks.wait
        if not self.profile.suspends_on_tlb_lock:
            self.lock_wait = "none"  # the hypervisor has no TLB locks to wait for (KVM)
        self.wait_spin_us = locks.wait_spin_us

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
        member = hv.bits_of(indices, hv.MAX_VP_INDEX)
        if named is not None and len(named) == len(indices) and tuple(map(_INDEX, named)) == indices:
            targets = named  # the same VPs in the same (ascending) order: share the list
        else:
            targets = [vps[i] for i in indices]
        if self.profile.flush_whole_tlb:
            reps = call.control.rep_count if call.gva_ranges else 0
            limit = self.profile.flush_queue_ranges - 1  # one slot is kept for "flush everything"
            if call.gva_ranges is None or reps > limit:
                scope = EVERYTHING  # KVM: the whole guest TLB, NON_GLOBAL and AddressSpace ignored
        return CallPlan(call, scope, validation, targets, member)

    def call_cost_us(self, plan: CallPlan, k_running: int) -> float:
        """What the call costs its caller with ``k_running`` targets on their LPs, us."""
        c = self.costs
        call = plan.call
        cost = c.vmexit_roundtrip_us + c.hypercall_decode_us
        if not plan.ok:
            return cost
        if not plan.all_processors:
            cost += c.mask_per_vp_us * plan.n_named
        cost += c.flush_per_running_target_us * k_running
        if call.vp_set is not None:
            cost += c.vp_set_per_bank_us * len(call.vp_set.banks)
        reps = call.control.rep_count - call.control.rep_start_index if call.gva_ranges else 0
        if reps > 0:
            pages = hv.gva_range_pages(call.gva_ranges[call.control.rep_start_index : call.control.rep_count])
            work = c.list_per_range_us * reps + c.invlpg_us * pages
            cost += work
            if c.continuation_limit_us > 0:
                cost += c.vmexit_roundtrip_us * (math.ceil(cost / c.continuation_limit_us) - 1)
        return cost

    def flush(self, vp, plan: CallPlan, sd):
        """Run one flush hypercall for ``vp`` (a generator); returns its HvStatus."""
        env = self.env
        c = self.costs
        recorder = self.recorder
        if not plan.ok:
            recorder.call_issued(sd, plan.call_code, plan.flags, 0)
            yield from self._in_hypercall(vp, sd, self.call_cost_us(plan, 0))
            recorder.call_returned(sd, plan.status)
            return plan.status
        targets = plan.targets
        scope = plan.scope
        recorder.call_issued(sd, plan.call_code, plan.flags, len(targets))
        locks = self.locks if self.lock_wait != "none" else None
        while locks is not None and locks.any_active():
            now = env.now
            holders = locks.holders(self.part.vps, plan.member, scope, now)
            if not holders:
                break
            yield from self._in_hypercall(vp, sd, c.vmexit_roundtrip_us + c.hypercall_decode_us)
            if self.lock_wait == "snapshot":  # wait for these holders only, then flush everyone
                yield from self._wait_for_holders(vp, sd, max(end for end, _, _ in holders))
                break
            yield from self._suspend(vp, sd, holders[0][0])  # reissue: the whole call again
        now = env.now
        running = self._flush_targets(targets, scope, sd, now)
        cost = plan.cost_us.get(running)
        if cost is None:
            cost = plan.cost_us[running] = self.call_cost_us(plan, running)
        recorder.in_hypervisor(sd, cost)
        vp.set_state(HYPERCALL, now)
        yield env.timeout(cost)
        recorder.call_returned(sd, HvStatus.SUCCESS)
        return HvStatus.SUCCESS

    def _flush_targets(self, targets, scope: FlushScope, sd, now: float) -> int:
        """Flush every running target now and defer the others; returns how many were running.
        A function of its own so that its per-target list dies before the caller waits out the
        call's cost (kept in the generator's frame, 4,096 such lists of 4,095 tuples held 1.2 GB)."""
        whole_context = self.whole_context
        if scope.pages is not None:  # every List call: the fast path
            required, deferred = flush_pages_by_hypervisor(targets, scope, whole_context, sd, now, self.costs,
                                                           self.record_ids)
            if deferred:
                self.recorder.deferred(sd, deferred)
            self.recorder.running_flushed_pages(sd, required)
            return len(required)
        flushed = []  # (required, removed) of each running target
        for t in targets:
            if t.on_lp:
                flushed.append(t.flush_by_hypervisor(scope, sd, whole_context, now))
            else:
                t.defer_flush(scope, sd, whole_context)
        self.recorder.running_flushed(sd, flushed)
        return len(flushed)

    def _in_hypercall(self, vp, sd, cost_us: float):
        self.recorder.in_hypervisor(sd, cost_us)
        vp.set_state(HYPERCALL)
        yield self.env.timeout(cost_us)

    def _suspend(self, vp, sd, lock_end_us: float):
        """Suspend the caller until the lock lifts, then (on an LP again)
        let the caller reissue the call. A lock due to lift within
        ``wait_spin_us`` is waited for on the LP."""
        env = self.env
        start = env.now
        self.recorder.suspended(sd)
        if lock_end_us - start <= self.wait_spin_us:
            vp.set_state(SUSPENDED)
            yield env.timeout(max(0.0, lock_end_us - start))
            self.recorder.resumed(sd, env.now - start)
            return
        vp.give_up_lp(SUSPENDED)
        yield env.timeout(max(0.0, lock_end_us - start))
        self.recorder.resumed(sd, env.now - start)
        yield from vp.wait_for_lp()

    def _wait_for_holders(self, vp, sd, last_release_us: float):
        """OpenHCL's wait: halted until the last holder at call time releases
        its lock and wakes the caller (an IPI: ``halt_wake_us``); no reissue."""
        env = self.env
        start = env.now
        self.recorder.suspended(sd)
        if last_release_us - start <= self.wait_spin_us:
            vp.set_state(SUSPENDED)
            yield env.timeout(max(0.0, last_release_us - start))
            self.recorder.waited(sd, env.now - start)
            return
        vp.give_up_lp(SUSPENDED)
        yield env.timeout(max(0.0, last_release_us - start) + self.costs.halt_wake_us)
        self.recorder.waited(sd, env.now - start)
        yield from vp.wait_for_lp()
