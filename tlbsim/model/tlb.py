"""A VP's TLB as occupancy, not as entries: no SimPy, no per-fill events.

The TLB holds ``nonglobal`` entries of the address space the VP runs and
``global_entries`` (PTE.G) entries. Occupancy grows linearly with guest execution
time, at ``fill_rate_per_us``, up to the working set scaled to capacity; a
flush removes what its scope says and returns how many entries went (each
one a future refill of ``refill_us``). Counts are expected values (floats):
a flush of p pages removes p x (nonglobal / working set), the expected
number of those pages that were cached.

Owns one question: "what does a flush remove?". The VP asks (``flush``) and
books the refills that follow; nothing else edits the occupancy.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FlushScope:
    """What a flush must remove.

    address_space: the CR3 named, or None for every address space.
    non_global_only: global entries may stay.
    pages: number of pages named (a List call / INVLPG), or None for the
    whole address space.
    """

    address_space: int | None
    non_global_only: bool = True
    pages: int | None = None


#: Everything in the TLB: every address space, global entries included.
EVERYTHING = FlushScope(None, False, None)


class Tlb:
    __slots__ = ("address_space", "nonglobal", "global_entries", "nonglobal_cap", "global_cap", "working_set",
                 "_rate_nonglobal", "_rate_global")

    def __init__(self, address_space: int, capacity: int, working_set: int, global_pages: int,
                 fill_rate_per_us: float, warm: bool):
        self.address_space = address_space
        total = working_set + global_pages
        scale = min(1.0, capacity / total) if total else 0.0
        self.working_set = working_set  # non-global pages the VP touches (cached or not)
        self.nonglobal_cap = working_set * scale
        self.global_cap = global_pages * scale
        share = self.nonglobal_cap / (self.nonglobal_cap + self.global_cap) if total else 0.0
        self._rate_nonglobal = fill_rate_per_us * share
        self._rate_global = fill_rate_per_us * (1.0 - share)
        self.nonglobal = self.nonglobal_cap if warm else 0.0
        self.global_entries = self.global_cap if warm else 0.0

    def advance(self, guest_us: float) -> None:
        """The VP executed guest code for ``guest_us``: fill toward the working set."""
        if self.nonglobal < self.nonglobal_cap:
            filled = self.nonglobal + self._rate_nonglobal * guest_us
            self.nonglobal = filled if filled < self.nonglobal_cap else self.nonglobal_cap
        if self.global_entries < self.global_cap:
            filled = self.global_entries + self._rate_global * guest_us
            self.global_entries = filled if filled < self.global_cap else self.global_cap

    def _matches(self, scope: FlushScope) -> bool:
        return scope.address_space is None or scope.address_space == self.address_space

    def required(self, scope: FlushScope) -> float:
        """Entries this TLB holds that the flush must remove (0: the TLB does
        not "require" the flush, in the TLFS's sense)."""
        if scope.pages is not None:
            if not self._matches(scope) or self.working_set == 0:
                return 0.0
            # each named page is one of the working set's pages; it is cached with probability
            # nonglobal / working_set (the occupancy is spread over the whole working set)
            return min(self.nonglobal, scope.pages * self.nonglobal / self.working_set)
        nonglobal = self.nonglobal if self._matches(scope) else 0.0
        return nonglobal if scope.non_global_only else nonglobal + self.global_entries

    def require_probability(self, scope: FlushScope) -> float:
        """The probability that this TLB holds at least one entry ``scope`` must remove (the TLFS's
        "requires the flush"), with the occupancy spread evenly over the working set: a page scope of
        p pages is missed with probability (1 - f)^p, f = nonglobal / working set; a whole space with
        (1 - f)^working set; global entries, when the scope includes them, make it certain."""
        if not self._matches(scope) or not self.working_set:
            nonglobal_p = 0.0
        else:
            f = self.nonglobal / self.working_set
            if f >= 1.0:
                nonglobal_p = 1.0
            else:
                n = scope.pages if scope.pages is not None else self.working_set
                nonglobal_p = 1.0 - (1.0 - f) ** n
        if scope.pages is None and not scope.non_global_only and self.global_entries > 0:
            return 1.0
        return nonglobal_p

    def flush(self, scope: FlushScope, whole_context: bool = False) -> tuple[float, float]:
        """Remove what the scope names; return (entries the scope required,
        entries removed): more go than required when ``whole_context``.

        ``whole_context``: the flush is done the way a hypervisor does it on
        VPID-tagged hardware (INVVPID single-context): an address-space flush
        drops the VP's non-global entries whatever address space they belong
        to. Page flushes are always exact (INVVPID individual-address) and take
        ``flush_pages``.
        """
        if scope.pages is not None:
            return self.flush_pages(scope.address_space, scope.pages)
        required = self.required(scope)
        removed = 0.0
        if whole_context or self._matches(scope):
            removed += self.nonglobal
            self.nonglobal = 0.0
        if not scope.non_global_only:
            removed += self.global_entries
            self.global_entries = 0.0
        return required, removed

    def evict(self, retained_fraction: float) -> float:
        """Something else ran on the LP: keep ``retained_fraction`` of every
        entry; return how many entries went (future refills)."""
        gone = (self.nonglobal + self.global_entries) * (1.0 - retained_fraction)
        self.nonglobal *= retained_fraction
        self.global_entries *= retained_fraction
        return gone

    def flush_space_nonglobal(self, address_space: int | None, whole_context: bool) -> tuple[float, float]:
        """Fast path of ``flush`` for one scope: a whole address space, non-global
        entries only (``FlushScope(address_space, True, None)``: every Space call a
        guest makes). Same result as ``flush`` (tests/test_model.py checks it on
        random TLBs); it skips building and testing the scope, which is most of
        the per-target cost of a mask / ALL_PROCESSORS shootdown (bench.target_flush_us)."""
        removed = self.nonglobal
        required = removed if address_space is None or address_space == self.address_space else 0.0
        if not whole_context:
            removed = required
        self.nonglobal -= removed
        return required, removed

    def flush_pages(self, address_space: int | None, pages: int) -> tuple[float, float]:
        """``flush`` of a page scope (``FlushScope(address_space, _, pages)``: every List call and
        INVLPG; page flushes are exact, so ``whole_context`` and ``non_global_only`` do not matter):
        removes what ``required`` says the scope requires (tests/test_model.py checks it on random
        TLBs). Callers with the scope's fields at hand skip building and testing a scope."""
        if (address_space is not None and address_space != self.address_space) or not self.working_set:
            return 0.0, 0.0
        nonglobal = self.nonglobal
        required = pages * nonglobal / self.working_set
        if required > nonglobal:
            required = nonglobal
        self.nonglobal = nonglobal - required
        return required, required
