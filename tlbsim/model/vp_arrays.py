"""Array-backed VP state for large partitions (issue 26): the fields a hypervisor flush reads and
writes on every running target live in one typed array per field, shared by all VPs of the
partition, so that a flush call over thousands of targets is a few numpy operations instead of a
Python loop.

Owns one question: "where does a large partition's per-VP flush state live?". A partition of at
least ``ARRAYS_FROM_VPS`` VPs (and no timeline) builds its VPs from ``array_vp_class``: a subclass
of ``vp.VP`` whose fields ``state``, ``since``, ``on_lp``, the debts, the guest-time shares, the
flush counters and the TLB's occupancy (``ArrayTlb``) are properties over ``VpArrays``; everything
else about the VP, and every line of the model that reads these fields one VP at a time, is
unchanged. The arrays are ``array.array`` buffers (an item read is a Python float or int, as the
plain VP's slots give) with numpy views of the same memory for the vectorised flush
(``flush_running``). The result is the same bit for bit as the plain VPs' (tests/test_vp_arrays.py
runs both paths on the same configurations); below the switch the plain VP class runs untouched.
"""

from __future__ import annotations

from array import array

import numpy as np

from tlbsim.model.accounting import GUEST, N_STATES
from tlbsim.model.tlb import Tlb

#: Partitions of at least this many VPs keep their VPs' flush state in arrays (tests override it
#: to run both paths on the same configuration). The vectorised flush costs about 0.1 ms a call
#: whatever the size below a few hundred targets and a Python loop costs 1.3-1.7 us a target
#: (docs/performance.md), so the arrays pay from about 100 targets a call.
ARRAYS_FROM_VPS = 256

_DOUBLE_FIELDS = ("since", "hv_debt_us", "refill_debt_us", "hv_flush_us", "refill_us", "refill_entries",
                  "collateral_entries", "nonglobal", "global_entries")


class VpArrays:
    """The per-VP flush state of one partition's ``n`` VPs: ``array.array`` buffers (``buf``) and
    numpy views of the same memory (``np``), one per field; the TLB's constants as numpy arrays,
    filled as the VPs are built."""

    def __init__(self, n: int):
        self.n = n
        self.buf: dict[str, array] = {name: array("d", bytes(8 * n)) for name in _DOUBLE_FIELDS}
        self.buf["state"] = array("q", bytes(8 * n))
        self.buf["on_lp"] = array("b", bytes(n))
        self.buf["flushes_applied"] = array("q", bytes(8 * n))
        self.state_us_buf = array("d", bytes(8 * n * N_STATES))
        self.np = {name: np.frombuffer(b, dtype=np.float64 if b.typecode == "d" else
                                       (np.int64 if b.typecode == "q" else np.int8))
                   for name, b in self.buf.items()}
        self.on_lp = self.np["on_lp"].view(np.bool_)
        self.guest_us = np.frombuffer(self.state_us_buf, dtype=np.float64).reshape(n, N_STATES)[:, GUEST]
        self.state_rows = memoryview(self.state_us_buf)
        # the TLB's constants (Tlb.__init__), by VP
        self.nonglobal_cap = np.zeros(n)
        self.global_cap = np.zeros(n)
        self.rate_nonglobal = np.zeros(n)
        self.rate_global = np.zeros(n)
        self.working_set = np.zeros(n)
        self.address_space = np.zeros(n, dtype=np.int64)
        self.all_idle_traced = False

    def state_us_of(self, index: int) -> memoryview:
        """VP ``index``'s time per state: a row of the shared buffer (item reads are floats)."""
        return self.state_rows[index * N_STATES:(index + 1) * N_STATES]


def _field(buf: array, as_bool: bool = False) -> property:
    if as_bool:
        def get(self, _b=buf):
            return _b[self.index] == 1

        def put(self, value, _b=buf):
            _b[self.index] = 1 if value else 0
    else:
        def get(self, _b=buf):
            return _b[self.index]

        def put(self, value, _b=buf):
            _b[self.index] = value
    return property(get, put)


def _tlb_field(buf: array) -> property:
    def get(self, _b=buf):
        return _b[self._i]

    def put(self, value, _b=buf):
        _b[self._i] = value
    return property(get, put)


class ArrayTlb(Tlb):
    """A ``Tlb`` whose occupancy lives in a partition's ``VpArrays`` (its subclass per partition,
    ``array_vp_class``, binds the properties)."""

    __slots__ = ("_i",)


def array_vp_class(vp_class: type, arrays: VpArrays) -> type:
    """A subclass of ``vp_class`` (``vp.VP``) whose flush state lives in ``arrays``."""
    b = arrays.buf
    tlb_ns = {"__slots__": (), "nonglobal": _tlb_field(b["nonglobal"]),
              "global_entries": _tlb_field(b["global_entries"])}
    tlb_class = type("PartitionArrayTlb", (ArrayTlb,), tlb_ns)

    def build_tlb(self, index, address_space, capacity, working_set, global_pages, fill_rate_per_us, warm):
        tlb = tlb_class.__new__(tlb_class)
        tlb._i = index
        Tlb.__init__(tlb, address_space, capacity, working_set, global_pages, fill_rate_per_us, warm)
        arrays.nonglobal_cap[index] = tlb.nonglobal_cap
        arrays.global_cap[index] = tlb.global_cap
        arrays.rate_nonglobal[index] = tlb._rate_nonglobal
        arrays.rate_global[index] = tlb._rate_global
        arrays.working_set[index] = tlb.working_set
        arrays.address_space[index] = address_space
        return tlb

    def init(self, part, index, *args, **kwargs):
        self.index = index  # the properties below need it before VP.__init__ sets them
        vp_class.__init__(self, part, index, *args, **kwargs)
        self.state_us = arrays.state_us_of(index)  # nothing accounted yet: its run starts later

    ns = {"__slots__": (), "__init__": init, "_build_tlb": build_tlb, "arrays": arrays,
          "state": _field(b["state"]), "since": _field(b["since"]), "on_lp": _field(b["on_lp"], True),
          "flushes_applied": _field(b["flushes_applied"])}
    for name in ("hv_debt_us", "refill_debt_us", "hv_flush_us", "refill_us", "refill_entries", "collateral_entries"):
        ns[name] = _field(b[name])
    return type("ArrayVP", (vp_class,), ns)


def flush_running(arrays: VpArrays, lo: int, hi: int, sel: np.ndarray, now: float, debt_us: float, scope,
                  whole_context: bool, refill_us: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``VP.flush_by_hypervisor`` (``flush_pages_by_hypervisor``'s arithmetic for a page scope) on
    every VP ``lo + i`` with ``sel[i]`` (on an LP, a plain VP's state), at ``now``, vectorised: the
    same operations in the same order on each VP, so the same bits. Returns the entries each
    flush required, in VP order, and the entries removed (None for a page scope: exact, removed =
    required). The scope is a page scope or a whole address space's non-global entries
    (``Tlb.flush_space_nonglobal``); the caller keeps the others on the per-VP path."""
    b = arrays.np
    span = slice(lo, hi)
    # advance_guest(now): VPs in guest code since before now account the guest time up to now
    since = b["since"][span]
    g = sel & (b["state"][span] == GUEST) & (since < now)
    if g.any():
        dt = now - since
        for level, cap, rate in (("nonglobal", arrays.nonglobal_cap, arrays.rate_nonglobal),
                                 ("global_entries", arrays.global_cap, arrays.rate_global)):
            occ = b[level][span]
            cap = cap[span]
            below = g & (occ < cap)
            if below.any():
                filled = occ + rate[span] * dt
                np.copyto(occ, np.where(filled < cap, filled, cap), where=below)
        # debts repaid in order from the guest time (TimeAccount.account_guest): a debt of 0 takes 0
        left = dt.copy()
        for debt_name, paid_name in (("hv_debt_us", "hv_flush_us"), ("refill_debt_us", "refill_us")):
            owed = b[debt_name][span]
            take = np.where(owed < left, owed, left)
            np.subtract(owed, take, out=owed, where=g)
            paid = b[paid_name][span]
            np.add(paid, take, out=paid, where=g)
            np.subtract(left, take, out=left)
        guest = arrays.guest_us[span]
        np.add(guest, left, out=guest, where=g)
        np.copyto(since, now, where=g)
    hv_debt = b["hv_debt_us"][span]
    np.add(hv_debt, debt_us, out=hv_debt, where=sel)
    nonglobal = b["nonglobal"][span][sel]
    a_space = scope.address_space
    matches = None if a_space is None else arrays.address_space[span][sel] == a_space
    if scope.pages is not None:  # Tlb.flush_pages
        working_set = arrays.working_set[span][sel]
        has = working_set != 0
        if matches is not None:
            has &= matches
        required = scope.pages * nonglobal / np.where(has, working_set, 1.0)
        required = np.where(required > nonglobal, nonglobal, required)
        required = np.where(has, required, 0.0)
        removed = None
        b["nonglobal"][span][sel] = nonglobal - required
        booked = required
    else:  # Tlb.flush_space_nonglobal
        required = nonglobal if matches is None else np.where(matches, nonglobal, 0.0)
        removed = nonglobal if whole_context else required
        b["nonglobal"][span][sel] = nonglobal - removed
        booked = removed
    for name, add in (("refill_debt_us", booked * refill_us), ("refill_entries", required)):
        col = b[name][span]
        col[sel] = col[sel] + add
    if removed is not None:
        col = b["collateral_entries"][span]
        col[sel] = col[sel] + (removed - required)
    fa = b["flushes_applied"][span]
    fa[sel] += 1
    return required, removed


def row_sum(start: float, values: np.ndarray) -> float:
    """``start`` plus each of ``values`` in order, one addition at a time (a Python loop's sum)."""
    if not len(values):
        return start
    acc = np.empty(len(values) + 1)
    acc[0] = start
    acc[1:] = values
    return float(np.add.accumulate(acc)[-1])
