"""Feasibility measurement, not part of the model: what would a hypervisor flush cost if the
running targets' TLB occupancy, debts and counters lived in numpy arrays (struct of arrays)
instead of in each VP object, and would its arithmetic stay bit-identical?

    python benchmarks/vectorised_flush.py [VPS ...]     (default: 16 256 4096)

For each partition size it puts every other VP in guest code with a random TLB occupancy, debts
and last-flush time, then runs the model's own per-target loop (``Hypervisor.flush_targets``,
the batched page flush of a 1-page List call) and a vectorised version of the same steps (settle
guest time: TLB fill, debts repaid in order, the rest guest work; the interruption's debt; the
page flush; the refill debt; the row's refill sum taken in target order by ``np.add.accumulate``)
over 5 calls, compares every field bit for bit, and prints both costs (best of 5 rounds of 20
calls). docs/performance.md quotes its figures. This was the feasibility study; the model's own
array-backed path (issue 26) is tlbsim/model/vp_arrays.py, where the VPs' fields live in the arrays
for the whole run in partitions of vp_arrays.ARRAYS_FROM_VPS VPs or more.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from tlbsim.bench import standard
from tlbsim.model.accounting import GUEST
from tlbsim.model.partition import Partition
from tlbsim.model.tlb import FlushScope
from tlbsim.model.workload import Request

#: array name -> how to read it from a target VP
FIELDS = {
    "since": lambda t: t.since,
    "nonglobal": lambda t: t.tlb.nonglobal,
    "global_entries": lambda t: t.tlb.global_entries,
    "nonglobal_cap": lambda t: t.tlb.nonglobal_cap,
    "global_cap": lambda t: t.tlb.global_cap,
    "rate_nonglobal": lambda t: t.tlb._rate_nonglobal,
    "rate_global": lambda t: t.tlb._rate_global,
    "working_set": lambda t: t.tlb.working_set,
    "hv_debt_us": lambda t: t.hv_debt_us,
    "refill_debt_us": lambda t: t.refill_debt_us,
    "hv_flush_us": lambda t: t.hv_flush_us,
    "refill_us": lambda t: t.refill_us,
    "guest_us": lambda t: t.state_us[GUEST],
    "refill_entries": lambda t: t.refill_entries,
    "flushes_applied": lambda t: t.flushes_applied,
}


def gather(targets) -> dict[str, np.ndarray]:
    return {name: np.array([get(t) for t in targets], dtype=float) for name, get in FIELDS.items()}


def flush_vectorised(a: dict, matches: np.ndarray, pages: int, now: float, interrupt_us: float,
                     refill_us: float, row_sum: float) -> float:
    """The batched page flush's steps on arrays; returns the row's refill sum."""
    dt = now - a["since"]
    settle = dt > 0
    for level, cap, rate in (("nonglobal", "nonglobal_cap", "rate_nonglobal"),
                             ("global_entries", "global_cap", "rate_global")):
        below = settle & (a[level] < a[cap])
        a[level] = np.where(below, np.minimum(a[level] + a[rate] * dt, a[cap]), a[level])
    left = np.where(settle, dt, 0.0)
    for debt, repaid, also in (("hv_debt_us", "hv_flush_us", None), ("refill_debt_us", "refill_us", "left")):
        owed = settle & (a[debt] != 0)
        if also:
            owed &= left != 0
        take = np.where(owed, np.minimum(a[debt], left), 0.0)
        a[debt] = np.where(owed, a[debt] - take, a[debt])
        a[repaid] = np.where(owed, a[repaid] + take, a[repaid])
        left = np.where(owed, left - take, left)
    a["guest_us"] = np.where(settle, a["guest_us"] + left, a["guest_us"])
    a["since"] = np.where(settle, now, a["since"])
    a["hv_debt_us"] = a["hv_debt_us"] + interrupt_us
    ws = a["working_set"]
    flushed = matches & (ws > 0)
    ng = a["nonglobal"]
    required = np.where(flushed, np.minimum(pages * ng / np.where(ws > 0, ws, 1.0), ng), 0.0)
    a["nonglobal"] = ng - required
    a["refill_debt_us"] = a["refill_debt_us"] + required * refill_us
    a["refill_entries"] = a["refill_entries"] + required
    a["flushes_applied"] = a["flushes_applied"] + 1
    return float(np.add.accumulate(np.concatenate(([row_sum], required)))[-1])


def measure(n_vps: int, calls: int = 20, rounds: int = 5) -> tuple[bool, float, float]:
    """(bit-identical, loop us per target, vectorised us per target) at ``n_vps`` VPs."""
    part = Partition(standard(1000.0, **{"partition.vps": n_vps, "partition.lps": n_vps}), 0)
    targets = part.vps[1:]
    rng = np.random.default_rng(1)
    for vp in targets:
        vp.state, vp.on_lp = GUEST, True
        vp.tlb.nonglobal = vp.tlb.nonglobal_cap * rng.uniform(0.5, 1.0)
        vp.hv_debt_us = float(rng.choice([0.0, rng.uniform(0, 3)]))
        vp.refill_debt_us = float(rng.choice([0.0, rng.uniform(0, 3)]))
        vp.since = float(rng.uniform(0, 40))
    pages = 1
    scope = FlushScope(targets[0].address_space, True, pages)
    row = part.recorder.started(0, "mask", Request(0.0, scope.address_space, pages), 0.0, targets, 0,
                                part.vps[0].clock())
    costs = part.config.costs
    matches = np.array([t.tlb.address_space == scope.address_space for t in targets])
    flush = part.hypervisor.flush_targets
    arrays = gather(targets)
    # 1 us apart: the TLBs stay below their caps, so every target's share of the row sum differs
    sums_vec = [flush_vectorised(arrays, matches, pages, 41.0 + i, costs.target_interrupt_us,
                                 costs.refill_us, 0.0) for i in range(5)]
    sums_loop = []
    for i in range(5):
        row.refill_entries = 0.0
        flush(targets, scope, row, 41.0 + i)
        sums_loop.append(row.refill_entries)
    after = gather(targets)
    same = sums_vec == sums_loop and all(np.array_equal(arrays[k], after[k]) for k in FIELDS)

    def best(step) -> float:
        out = float("inf")
        for r in range(rounds):
            t = time.perf_counter()
            for i in range(calls):
                step(1000.0 * (r + 1) + 50.0 * i)
            out = min(out, time.perf_counter() - t)
        return out / (calls * len(targets)) * 1e6

    loop_us = best(lambda now: flush(targets, scope, row, now))
    vec_us = best(lambda now: flush_vectorised(arrays, matches, pages, now, costs.target_interrupt_us,
                                               costs.refill_us, 0.0))
    return same, loop_us, vec_us


def main(sizes: list[int]) -> int:
    print("VPs   bit-identical   loop us/target (ms/call)   vectorised us/target (ms/call)   loop / vectorised")
    for n in sizes:
        same, loop_us, vec_us = measure(n)
        k = n - 1
        print(f"{n:5d}  {str(same):13s}  {loop_us:8.3f} ({loop_us * k / 1000:7.3f})        "
              f"{vec_us:8.4f} ({vec_us * k / 1000:7.3f})              {loop_us / vec_us:8.2f}")
    return 0


if __name__ == "__main__":
    try:
        sizes = [int(a) for a in sys.argv[1:]] or [16, 256, 4096]
        if any(n < 2 for n in sizes):
            raise ValueError
    except ValueError:
        print("usage: python benchmarks/vectorised_flush.py [VPS ...]  (each an integer >= 2)", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sizes))
