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
#: to run both paths on the same configuration). A numpy flush call costs about 30 us at reference
#: speed whatever the span up to a few hundred targets, a Python loop 1.3-1.7 us a target, and the
#: properties cost the run loop a little: default config x 10 ms, best of 3 alternating in one process
#: (2026-12-02), arrays / plain 1.30 at 16 VPs, 1.26 at 64, 0.95 at 128, 0.72 at 256.
ARRAYS_FROM_VPS = 128

#: The rows of ``VpArrays.f``: the VP's fields, then its TLB's (occupancy, then the constants Tlb.__init__
#: sets, read by the vectorised flush only). flushes_applied is counted in a double (exact below 2**53).
ROWS = ("since", "hv_debt_us", "refill_debt_us", "hv_flush_us", "refill_us", "refill_entries", "collateral_entries",
        "flushes_applied", "nonglobal", "global_entries", "nonglobal_cap", "global_cap", "rate_nonglobal",
        "rate_global", "working_set", "address_space")
(SINCE, HV_DEBT, REFILL_DEBT, HV_FLUSH, REFILL, REFILL_ENTRIES, COLLATERAL, FLUSHES, NONGLOBAL, GLOBAL,
 NONGLOBAL_CAP, GLOBAL_CAP, RATE_NONGLOBAL, RATE_GLOBAL, WORKING_SET, ADDRESS_SPACE) = range(len(ROWS))


class VpArrays:
    """The per-VP flush state of one partition's ``n`` VPs: the doubles in one ``array.array``
    (``buf``, row r of the fields ``ROWS[r]`` at ``r * n``) with a (rows, n) numpy view of it (``f``),
    the state (``state``, ``array('q')``) and whether each VP is on an LP (``on_lp_buf``,
    ``array('b')``) with theirs, and each VP's time per state (``state_us_buf``, a row of
    N_STATES per VP; ``guest_us`` its GUEST column)."""

    def __init__(self, n: int):
        self.n = n
        self.buf = array("d", bytes(8 * n * len(ROWS)))
        self.f = np.frombuffer(self.buf, dtype=np.float64).reshape(len(ROWS), n)
        self.state_buf = array("q", bytes(8 * n))
        self.state = np.frombuffer(self.state_buf, dtype=np.int64)
        self.on_lp_buf = array("b", bytes(n))
        self.on_lp = np.frombuffer(self.on_lp_buf, dtype=np.int8).view(np.bool_)
        self.state_us_buf = array("d", bytes(8 * n * N_STATES))
        self.guest_us = np.frombuffer(self.state_us_buf, dtype=np.float64).reshape(n, N_STATES)[:, GUEST]
        self._state_rows = memoryview(self.state_us_buf)
        self.working_set_or_1 = np.ones(n)  # the divisor of a page flush (1 where there is no working set)

    def state_us_of(self, index: int) -> memoryview:
        """VP ``index``'s time per state: a row of the shared buffer (item reads are floats)."""
        return self._state_rows[index * N_STATES:(index + 1) * N_STATES]


def _field(buf: array, offset: int, attr: str = "index", kind=None) -> property:
    """A property over ``buf[offset + self.index]`` (``self._i`` with ``attr`` "_i"): a float (an int
    from an integer array), or with ``kind`` an int or a bool read from a double / byte."""
    if kind is bool:
        def get(self, _b=buf, _o=offset):
            return _b[_o + self.index] == 1

        def put(self, value, _b=buf, _o=offset):
            _b[_o + self.index] = 1 if value else 0
        return property(get, put)
    if kind is int:
        def get(self, _b=buf, _o=offset):
            return int(_b[_o + self.index])
    elif attr == "index":
        def get(self, _b=buf, _o=offset):
            return _b[_o + self.index]
    else:
        def get(self, _b=buf, _o=offset):
            return _b[_o + self._i]
    if attr == "index":
        def put(self, value, _b=buf, _o=offset):
            _b[_o + self.index] = value
    else:
        def put(self, value, _b=buf, _o=offset):
            _b[_o + self._i] = value
    return property(get, put)


class ArrayTlb(Tlb):
    """A ``Tlb`` whose occupancy lives in a partition's ``VpArrays`` (its subclass per partition,
    ``array_vp_class``, binds the properties)."""

    __slots__ = ("_i",)


def array_vp_class(vp_class: type, arrays: VpArrays) -> type:
    """A subclass of ``vp_class`` (``vp.VP``) whose flush state lives in ``arrays``."""
    b, n = arrays.buf, arrays.n
    tlb_ns = {"__slots__": (), "nonglobal": _field(b, NONGLOBAL * n, "_i"),
              "global_entries": _field(b, GLOBAL * n, "_i")}
    tlb_class = type("PartitionArrayTlb", (ArrayTlb,), tlb_ns)
    f = arrays.f

    def build_tlb(self, index, address_space, capacity, working_set, global_pages, fill_rate_per_us, warm):
        tlb = tlb_class.__new__(tlb_class)
        tlb._i = index
        Tlb.__init__(tlb, address_space, capacity, working_set, global_pages, fill_rate_per_us, warm)
        f[NONGLOBAL_CAP, index] = tlb.nonglobal_cap
        f[GLOBAL_CAP, index] = tlb.global_cap
        f[RATE_NONGLOBAL, index] = tlb._rate_nonglobal
        f[RATE_GLOBAL, index] = tlb._rate_global
        f[WORKING_SET, index] = tlb.working_set
        f[ADDRESS_SPACE, index] = address_space
        arrays.working_set_or_1[index] = tlb.working_set or 1.0
        return tlb

    def init(self, part, index, *args, **kwargs):
        self.index = index  # the properties below need it before VP.__init__ sets them
        vp_class.__init__(self, part, index, *args, **kwargs)
        self.state_us = arrays.state_us_of(index)  # nothing accounted yet: its run starts later

    # TimeAccount's hot methods on the arrays directly (the same statements, without a property call
    # per field): every state change and every settle of a large partition's VP runs them
    state_b = arrays.state_buf
    o_since, o_ng, o_gl = SINCE * n, NONGLOBAL * n, GLOBAL * n
    o_ng_cap, o_gl_cap, o_r_ng, o_r_gl = NONGLOBAL_CAP * n, GLOBAL_CAP * n, RATE_NONGLOBAL * n, RATE_GLOBAL * n
    o_hv_debt, o_refill_debt, o_hv_flush, o_refill = HV_DEBT * n, REFILL_DEBT * n, HV_FLUSH * n, REFILL * n

    def set_state(self, new, now=None):
        if now is None:
            now = self.env.now
        i = self.index
        dt = now - b[o_since + i]
        if dt > 0:
            old = state_b[i]
            if old == GUEST:
                self.account_guest(dt)
            else:
                self.state_us[old] += dt
        state_b[i] = new
        b[o_since + i] = now

    def advance_guest(self, now):
        i = self.index
        if state_b[i] == GUEST and now > b[o_since + i]:
            self.account_guest(now - b[o_since + i])
            b[o_since + i] = now

    def account_guest(self, dt):
        i = self.index
        occ, cap = b[o_ng + i], b[o_ng_cap + i]
        if occ < cap:  # Tlb.advance
            filled = occ + b[o_r_ng + i] * dt
            b[o_ng + i] = filled if filled < cap else cap
        occ, cap = b[o_gl + i], b[o_gl_cap + i]
        if occ < cap:
            filled = occ + b[o_r_gl + i] * dt
            b[o_gl + i] = filled if filled < cap else cap
        hv_debt, refill_debt = b[o_hv_debt + i], b[o_refill_debt + i]
        if not (hv_debt or refill_debt):
            self.state_us[GUEST] += dt
            return
        left = dt
        if hv_debt:
            take = hv_debt if hv_debt < left else left
            b[o_hv_debt + i] = hv_debt - take
            b[o_hv_flush + i] += take
            left -= take
        if refill_debt and left:
            take = refill_debt if refill_debt < left else left
            b[o_refill_debt + i] = refill_debt - take
            b[o_refill + i] += take
            left -= take
        self.state_us[GUEST] += left

    ns = {"__slots__": (), "__init__": init, "_build_tlb": build_tlb, "arrays": arrays,
          "set_state": set_state, "advance_guest": advance_guest, "account_guest": account_guest,
          "state": _field(arrays.state_buf, 0), "on_lp": _field(arrays.on_lp_buf, 0, kind=bool),
          "flushes_applied": _field(b, FLUSHES * n, kind=int)}
    for row in (SINCE, HV_DEBT, REFILL_DEBT, HV_FLUSH, REFILL, REFILL_ENTRIES, COLLATERAL):
        ns[ROWS[row]] = _field(b, row * n)
    return type("ArrayVP", (vp_class,), ns)


def flush_running(arrays: VpArrays, lo: int, sel: np.ndarray, has: np.ndarray, now: float, debt_us: float,
                  pages: int | None, whole_context: bool, refill_us: float) -> tuple[np.ndarray, np.ndarray | None]:
    """``VP.flush_by_hypervisor`` (``flush_pages_by_hypervisor``'s arithmetic for a page scope of
    ``pages``) on every VP ``lo + i`` with ``sel[i]`` (each on an LP), at ``now``, vectorised: the
    same operations in the same order on each VP, so the same bits. ``has[i]``: VP ``lo + i`` is
    selected and the flush applies to its TLB (its address space matches the scope's and, for a
    page scope, it has a working set; ``CallPlan.flushable``). ``pages`` None: a whole address
    space's non-global entries (``Tlb.flush_space_nonglobal``); the caller keeps the scopes with
    global entries on the per-VP path.

    Returns the entries each flush required and the entries removed (None for a page scope:
    exact, removed = required), over the whole span with 0.0 for the VPs not flushed (a row's
    sum over them in order is the sum over the flushed ones: + 0.0 changes no sum that is never
    -0.0).

    It works in place on the span of VPs lo .. lo + len(sel) - 1 (views, no gather): a VP of the
    span that is not selected, or not in guest code since before ``now``, gets a guest time of 0
    and a flush of nothing, with which every step leaves its fields as they are, exactly (the
    occupancy never exceeds its cap, min(debt, 0) = 0, and x + 0.0 = x for the non-negative
    fields, none of which is ever -0.0)."""
    hi = lo + len(sel)
    g = arrays.f[:, lo:hi]
    since = g[SINCE]
    # advance_guest(now) (TimeAccount.account_guest): fill the TLB, repay the debts in order, the rest is work.
    # min(a, b) is the model's "a if a < b else b" (the same double either way when they are equal)
    dt = now - since
    in_guest = arrays.state[lo:hi] == GUEST
    in_guest &= sel
    in_guest &= dt > 0.0
    dt *= in_guest  # 0 (or -0.0: the same no-op below) where no guest time is accounted
    for occ, cap, rate in ((NONGLOBAL, NONGLOBAL_CAP, RATE_NONGLOBAL), (GLOBAL, GLOBAL_CAP, RATE_GLOBAL)):
        if occ == GLOBAL and not (g[GLOBAL] < g[GLOBAL_CAP]).any():
            continue  # every one at its cap (advance leaves it)
        filled = g[rate] * dt
        filled += g[occ]
        np.minimum(filled, g[cap], out=g[occ])
    left = dt
    for debt, paid in ((HV_DEBT, HV_FLUSH), (REFILL_DEBT, REFILL)):
        owed = g[debt]
        take = np.minimum(owed, left)
        owed -= take
        g[paid] += take
        left -= take
    guest = arrays.guest_us[lo:hi]
    guest += left
    np.copyto(since, now, where=in_guest)
    np.add(g[HV_DEBT], debt_us, out=g[HV_DEBT], where=sel)
    # the flush (Tlb.flush_pages / Tlb.flush_space_nonglobal)
    nonglobal = g[NONGLOBAL]
    if pages is not None:
        required = pages * nonglobal
        required /= arrays.working_set_or_1[lo:hi]
        np.minimum(required, nonglobal, out=required)
        required *= has  # 0.0 where the flush requires nothing (required is never negative)
        nonglobal -= required
        removed = None
        booked = required
    else:
        required = nonglobal * has
        removed = nonglobal * sel if whole_context else required
        nonglobal -= removed
        booked = removed
    g[REFILL_DEBT] += booked * refill_us
    g[REFILL_ENTRIES] += required
    if removed is not None:
        removed = removed - required  # collateral
        g[COLLATERAL] += removed
    g[FLUSHES] += sel
    return required, removed


def row_sum(start: float, values: np.ndarray) -> float:
    """``start`` plus each of ``values`` in order, one addition at a time (a Python loop's sum; not
    ``sum()``, which compensates from Python 3.12)."""
    if len(values) < 64:
        for v in values.tolist():
            start += v
        return start
    acc = np.empty(len(values) + 1)
    acc[0] = start
    acc[1:] = values
    return float(np.add.accumulate(acc)[-1])
