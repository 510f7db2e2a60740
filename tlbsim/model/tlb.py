"""A VP's TLB as occupancy, not as entries: no SimPy, no per-fill events.

The TLB holds ``ng`` non-global entries of the address space the VP runs and
``g`` global (PTE.G) entries. Occupancy grows linearly with guest execution
time, at ``fill_rate_per_us``, up to the working set scaled to capacity; a
flush removes what its scope says and returns how many entries went (each
one a future refill of ``refill_us``). Counts are expected values (floats):
a flush of p pages removes p x (ng / working set), the expected number of
those pages that were cached.
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


class Tlb:
    __slots__ = ("address_space", "ng", "g", "ng_cap", "g_cap", "_r_ng", "_r_g")

    def __init__(self, address_space: int, capacity: int, working_set: int, global_pages: int,
                 fill_rate_per_us: float, warm: bool):
        self.address_space = address_space
        total = working_set + global_pages
        scale = min(1.0, capacity / total) if total else 0.0
        self.ng_cap = working_set * scale
        self.g_cap = global_pages * scale
        share = self.ng_cap / (self.ng_cap + self.g_cap) if total else 0.0
        self._r_ng = fill_rate_per_us * share
        self._r_g = fill_rate_per_us * (1.0 - share)
        self.ng = self.ng_cap if warm else 0.0
        self.g = self.g_cap if warm else 0.0

    def advance(self, guest_us: float) -> None:
        """The VP executed guest code for ``guest_us``: fill toward the working set."""
        if self.ng < self.ng_cap:
            ng = self.ng + self._r_ng * guest_us
            self.ng = ng if ng < self.ng_cap else self.ng_cap
        if self.g < self.g_cap:
            g = self.g + self._r_g * guest_us
            self.g = g if g < self.g_cap else self.g_cap

    def _matches(self, scope: FlushScope) -> bool:
        return scope.address_space is None or scope.address_space == self.address_space

    def required(self, scope: FlushScope) -> float:
        """Entries this TLB holds that the flush must remove (0: the TLB does
        not "require" the flush, in the TLFS's sense)."""
        if scope.pages is not None:
            if not self._matches(scope) or self.ng_cap == 0:
                return 0.0
            return min(self.ng, scope.pages * self.ng / self.ng_cap)
        ng = self.ng if self._matches(scope) else 0.0
        return ng if scope.non_global_only else ng + self.g

    def flush(self, scope: FlushScope, whole_context: bool = False) -> tuple[float, float]:
        """Remove what the scope names; return (entries the scope required,
        entries removed): more go than required when ``whole_context``.

        ``whole_context``: the flush is done the way a hypervisor does it on
        VPID-tagged hardware (INVVPID single-context): an address-space flush
        drops the VP's non-global entries whatever address space they belong
        to. Page flushes are always exact (INVVPID individual-address).
        """
        required = self.required(scope)
        if scope.pages is not None:
            self.ng -= required
            return required, required
        removed = 0.0
        if whole_context or self._matches(scope):
            removed += self.ng
            self.ng = 0.0
        if not scope.non_global_only:
            removed += self.g
            self.g = 0.0
        return required, removed
