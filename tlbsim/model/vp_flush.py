"""How flushes reach a VP (a mixin of ``vp.VP``): the hypervisor flushing it on its LP, deferring its
flush to its next entry, a broadcast reaching it off its LP, the guest's own flush, and the TLB
entries it loses when it runs on an LP others used meanwhile. Every flush is booked once
(``book_flush``: refill debt, the VP's counters, the recorder)."""

from __future__ import annotations

import math

from tlbsim.hv import GVA_RANGE_MAX_PAGES
from tlbsim.model.accounting import GUEST
from tlbsim.model.tlb import EVERYTHING, FlushScope


class FlushTarget:
    """The flush verbs of a VP (``flush_by_hypervisor``, ``defer_flush`` then
    ``apply_deferred_flushes``, ``flush_now_idle``, ``flush_locally``) and ``_evict``."""

    __slots__ = ()  # the fields are VP's (one slot layout)

    def requires(self, scope: FlushScope) -> bool:
        """Does this VP's TLB hold anything ``scope`` must remove (TLFS: "requires a flush")? Drawn
        from its occupancy (``Tlb.require_probability``) on its own stream: the expected count of
        cached entries is positive for any warm TLB, so asking it instead made every lock holder
        block every call."""
        if self.state == GUEST:
            self.settle()
        p = self.tlb.require_probability(scope)
        return p >= 1.0 or (p > 0.0 and self.streams["tlbcheck"].uniform() < p)

    def flush_now_idle(self, scope: FlushScope, shootdown, whole_context: bool) -> None:
        """A hardware broadcast (INVLPGB) flushed this VP's entries on every LP while it was not
        running: applied now, at no cost to it but the refills."""
        required, removed = self.tlb.flush(scope, whole_context)
        self.book_flush(shootdown, required, removed)

    def book_flush(self, shootdown, required: float, removed: float) -> None:
        """Refills owed for ``removed`` entries; the flush reported to the recorder."""
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        if shootdown is not None:
            self.recorder.flushed(shootdown, required, removed)
            if self.applied_ids is not None:
                self.applied_ids.add(shootdown.id)

    def flush_by_hypervisor(self, scope: FlushScope, shootdown, whole_context: bool, now: float, debt_us: float):
        """The hypervisor flushes this VP on its LP at ``now``: ``debt_us`` of
        interruption and flush work (0 under a hardware broadcast) plus the
        refills, both repaid from guest time. Returns (required, removed) for the hypervisor to report to the
        recorder (``ShootdownRecorder.running_flushed``, one call for all
        running targets).

        Once per running target of every Space call (List calls go through
        ``flush_pages_by_hypervisor``, the batched form of this with the page
        scope): a Space call's scope takes the TLB's address-space fast path,
        and ``book_flush``'s VP half is done in place (the recorder hears of every running target
        in one ``running_flushed`` call)."""
        self.advance_guest(now)
        self.hv_debt_us += debt_us
        pages = scope.pages
        if pages is not None:
            flushed = self.tlb.flush_pages(scope.address_space, pages)
        elif scope.non_global_only:
            flushed = self.tlb.flush_space_nonglobal(scope.address_space, whole_context)
        else:
            flushed = self.tlb.flush(scope, whole_context)
        required, removed = flushed
        self.refill_debt_us += removed * self._refill_us
        self.refill_entries += required
        self.collateral_entries += removed - required
        self.flushes_applied += 1
        if self.applied_ids is not None:
            self.applied_ids.add(shootdown.id)
        return flushed

    def defer_flush(self, scope: FlushScope, shootdown, whole_context: bool) -> None:
        """This VP is not on an LP: flush it before it next runs guest code."""
        self.deferred.append((shootdown, scope, whole_context))
        self.recorder.deferred(shootdown)

    def flush_locally(self, scope: FlushScope, shootdown) -> None:
        """The guest's own flush (INVLPG / CR3 reload): exact."""
        required, removed = self.tlb.flush(scope, False)
        self.book_flush(shootdown, required, removed)

    def apply_deferred_flushes(self) -> None:
        """Flushes deferred while this VP was off its LP, applied before it
        runs guest code. Under a profile with a flush queue (KVM), more
        queued page-range flushes than the queue holds become one flush of
        everything (charged to the first)."""
        deferred = self.deferred
        limit = self.part.profile.flush_queue_ranges
        overflow = False
        if limit:  # KVM: the FIFO's entries are GVA ranges; one slot is kept for "flush everything"
            ranges = sum(-(-scope.pages // GVA_RANGE_MAX_PAGES) for _, scope, w in deferred
                         if scope.pages is not None and w is not None)
            if ranges > limit - 1:  # KVM_HV_TLB_FLUSH_FIFO_SIZE 16: more than 15 ranges
                overflow = True
                deferred = [(sd, scope, w) if w is None else (sd, EVERYTHING, True) for sd, scope, w in deferred]
        charged = False
        for shootdown, scope, whole_context in deferred:
            required, removed = self.tlb.flush(scope, bool(whole_context))
            self.book_flush(shootdown, required, removed)
            if whole_context is None:  # the guest's own (lazy TLB): its flush when it runs again
                self.guest_flush_due_us += self.costs.local_flush_cost_us(scope.pages)
            elif not (overflow and charged):  # an overflow is one flush of everything: charged once
                self.hv_debt_us += self.costs.deferred_flush_us
                charged = True
            self.deferred_applied += 1
        self.deferred.clear()

    def _evict(self) -> None:
        """Dispatched again: back on the LP it left, it keeps exp(-t / tau) of its TLB, t the time
        other entities ran on that LP meanwhile (their working sets evicted the rest); on another LP
        it keeps nothing (its entries are on the one it left). The rest are refills."""
        lp = self.lp
        if lp == self.left_lp:
            foreign = self.host.lp_busy_us[lp] - self.left_busy_us
            if foreign <= 0.0:
                return
            retained = math.exp(-foreign / self.retention_tau_us)
        else:
            retained = 0.0
        gone = self.tlb.evict(retained)
        self.evicted_entries += gone
        self.refill_debt_us += gone * self._refill_us
