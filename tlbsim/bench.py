"""Speed of the simulator, each figure beside its floor, measured in one run.

A floor is what the same work costs with nothing but the unavoidable parts: the
run's SimPy events as bare ``yield env.timeout()`` steps (raw SimPy, timed in
the same run) plus, for every running target a hypervisor flushed, the flush
arithmetic alone (``target_flush_us``, no SimPy). The machine is noisy, so the
ratios (wall / floor) mean more than the absolute times, and they are what
``--compare`` checks against a reference run.

Figures:
 1. raw SimPy timeouts per second (the reference of every floor);
 2. a skeleton of the VP loop (no mechanism) per event against a raw timeout; three scenarios,
    wall / floor: the standard one (16 VPs, default exits, ``mask``), a co-tenant
    overcommit (``ipi``, 3 co-tenant partitions of 16 VPs on 16 LPs, open loop) and a closed loop
    (KVM profile, 300 us of work per operation, ``mask``);
 3. per shootdown and policy: SimPy events and wall us, total and marginal (net of the same run with
    no shootdowns); ``mask`` with 15 running targets against its floor; SimPy events per running
    target of an ``ipi`` shootdown;
 4. marginal wall us per shootdown vs VP count at a fixed number of targets;
 5. a naive SimPy model of the standard scenario (one process per target flush, as a user would write
    it) against tlbsim on the same scenario;
 6. a large partition: 4,096 VPs, 10 ms simulated, default config (``--quick``: 1,024 VPs, 2 ms), in a
    child process: wall, wall at reference speed (``REFERENCE_RAW_US``), peak RSS, and the floor; the
    array-backed flush's cost per running target at that size (``array_target_flush_us``);
 7. peak memory of a process that records 1,000,000 shootdowns, beside the size of its table;
 8. a sweep of 32 points on 1 process vs on all cores.

``--json FILE`` writes every figure; ``--compare FILE`` prints each figure's ratio to a reference run
(``benchmarks/reference.json`` is the committed one).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from bisect import bisect_right
from pathlib import Path

import pandas as pd
import simpy

from tlbsim.config import Config
from tlbsim.model.partition import CountingEnvironment, simulate_records
from tlbsim.model.recorder import ROW_BYTES

#: how much worse than the reference a figure must be to be flagged, by default (``--tolerance``)
DEFAULT_TOLERANCE = 0.10


def raw_simpy_rate(n: int = 300_000, repeats: int = 3) -> float:
    """Timeouts per wall second of a bare SimPy process (best of ``repeats``)."""
    best = 0.0
    for _ in range(repeats):
        env = simpy.Environment()

        def proc(env):
            for _ in range(n):
                yield env.timeout(1.0)

        env.process(proc(env))
        t = time.perf_counter()
        env.run()
        best = max(best, n / (time.perf_counter() - t))
    return best


def skeleton_event_us(vps: int = 16, n: int = 200_000) -> float:
    """Wall us per event of the least a model of these VPs does: ``vps`` SimPy processes, each
    running guest code for an exponential draw, then exiting for a drawn reason's cost, with the
    time spent in each state accounted and the checks for pending work a VP loop makes at each
    step. No TLB, shootdowns, scheduler or records. Against a raw timeout (``raw_simpy_rate``, one
    process doing nothing) it says how far above the event part of a floor *any* model of a VP's
    state machine sits, before a single mechanism: most of the standard scenario's events are of
    this kind (guest intervals and exits)."""
    import numpy as np

    from tlbsim.model.rng import Stream

    env = simpy.Environment()
    steps = n // vps // 2
    cum, cost = (0.2, 0.5, 0.7, 0.9, 1.0), (1.0, 2.0, 3.0, 4.0, 5.0)

    class Vp:
        __slots__ = ("state", "since", "state_us", "exits", "irqs", "work", "requests", "preempt_pending")

        def __init__(self):
            self.state, self.since, self.state_us, self.exits = 0, 0.0, [0.0] * 10, [0] * len(cost)
            self.irqs, self.work, self.requests, self.preempt_pending = [], [], [], False

    def run(vp, stream):
        timeout, state_us = env.timeout, vp.state_us
        for _ in range(steps):
            if vp.preempt_pending or vp.irqs or vp.work or vp.requests:
                continue
            now = env.now
            state_us[vp.state] += now - vp.since
            vp.state, vp.since = 0, now
            yield timeout(stream.exp(50.0))
            end = env.now
            state_us[0] += end - vp.since
            vp.state, vp.since = 1, end
            reason = bisect_right(cum, stream.uniform())
            vp.exits[reason] += 1
            yield timeout(cost[reason])

    for i in range(vps):
        env.process(run(Vp(), Stream(np.random.SeedSequence(i))))
    t = time.perf_counter()
    env.run()
    return (time.perf_counter() - t) / (steps * 2 * vps) * 1e6


def timed(config: Config, seed: int = 0, repeats: int = 1):
    """(best wall seconds, records) of simulating ``config``."""
    best, rec = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        rec = simulate_records(config, seed)
        best = min(best, time.perf_counter() - t)
    return best, rec


def target_flush_us(n: int = 100_000, repeats: int = 3, pages: int | None = 1) -> float:
    """Wall us of the arithmetic one running target of a flush hypercall costs, with no SimPy at
    all: the hypervisor's own per-target loop (``Hypervisor.flush_targets``: for a page scope the
    fast path ``hypervisor.flush_pages_by_hypervisor``, else ``VP.flush_by_hypervisor`` per target, and the
    report to the recorder) over the 15 other VPs of the standard partition, all in guest code
    that ran 50 us since their last flush. What every mask / ALL_PROCESSORS shootdown pays per
    running target. ``pages``: the scope of the default guest's call (a 1-page List call); None
    for a Space call. Best of ``repeats``."""
    from tlbsim.model.hypervisor import IPI
    from tlbsim.model.partition import Partition
    from tlbsim.model.tlb import FlushScope
    from tlbsim.model.vp import GUEST
    from tlbsim.model.workload import Request

    part = Partition(standard(1000.0), 0)
    targets = part.vps[1:]
    for vp in targets:
        vp.state, vp.on_lp = GUEST, True
    row = part.recorder.started(0, "mask", Request(0.0, targets[0].address_space, pages), 0.0, targets, 0,
                                part.vps[0].clock())
    scope = FlushScope(targets[0].address_space, True, pages)
    flush = part.hypervisor.flush_targets
    calls = max(1, n // len(targets))
    best = float("inf")
    for r in range(repeats):
        base = r * calls * 50.0
        t = time.perf_counter()
        for i in range(calls):
            flush(targets, scope, row, base + i * 50.0, IPI)
        best = min(best, time.perf_counter() - t)
    return best / (calls * len(targets)) * 1e6


def standard(duration_us: float, **overrides) -> Config:
    base = {"partition.vps": 16, "partition.lps": 16, "workload.policy": "mask", "partition.duration_us": duration_us}
    return Config().with_overrides({**base, **overrides})


def _n_shootdowns(rec) -> int:
    return len(rec.shootdowns["id"])


def marginal(config: Config, repeats: int):
    """Per-shootdown events and wall us, total and net of the same run without shootdowns.
    The two runs alternate, ``repeats`` times each, and the best of each is kept, so a burst of
    noise on this shared machine is unlikely to hit all runs of one side only. Between them the
    floor's parts are measured again (``Floor``), so the floor is of the same moments."""
    idle_config = config.with_overrides({"workload.rate_per_ms": 0.0})
    wall = idle_wall = float("inf")
    floor = Floor()
    for _ in range(repeats):
        floor.sample()
        w, rec = timed(config)
        wall = min(wall, w)
        w, idle = timed(idle_config)
        idle_wall = min(idle_wall, w)
    n = max(1, _n_shootdowns(rec))
    return {
        "shootdowns": n,
        "events_per_sd": rec.events / n,
        "marginal_events_per_sd": (rec.events - idle.events) / n,
        "wall_us_per_sd": wall / n * 1e6,
        "marginal_wall_us_per_sd": max(0.0, wall - idle_wall) / n * 1e6,
        "raw_us": floor.raw_us,
        "target_flush_us": floor.target_flush_us,
    }


#: The raw SimPy timeout of the reference machine, us (benchmarks/reference.json's first run, 2026-12-01):
#: a wall time times REFERENCE_RAW_US / (this machine's raw timeout, measured in the same process) is the
#: wall at *reference speed*, which is what the issue 26 targets are stated in.
REFERENCE_RAW_US = 0.755


def array_target_flush_us(vps: int = 4096, calls: int = 200, repeats: int = 3) -> float:
    """Wall us per running target of the array-backed flush (``vp_arrays.flush_running`` through
    ``Hypervisor._flush_targets_arrays``, with the recorder's row sum) for the default guest's call
    (a 1-page List call) from VP 0 to the ``vps - 1`` others, all running guest code that ran 5 us
    since their last flush: what every shootdown of a large partition pays per running target.
    Best of ``repeats``."""
    from tlbsim.model import vp_arrays
    from tlbsim.model.hypervisor import IPI
    from tlbsim.model.partition import Partition
    from tlbsim.model.tlb import FlushScope
    from tlbsim.model.vp import GUEST
    from tlbsim.model.workload import Request

    old = vp_arrays.ARRAYS_FROM_VPS
    vp_arrays.ARRAYS_FROM_VPS = min(old, vps)
    try:
        part = Partition(standard(1000.0, **{"partition.vps": vps, "partition.lps": vps}), 0)
    finally:
        vp_arrays.ARRAYS_FROM_VPS = old
    caller, targets = part.vps[0], part.targets_of(part.vps[0], part.vps[0].address_space)
    for vp in targets:
        vp.state, vp.on_lp = GUEST, True
    hv = part.hypervisor
    scope = FlushScope(caller.address_space, True, 1)
    call, scope = part.policy.build(caller, None, scope, targets)
    plan = hv.plan(caller, call, scope, targets)
    row = part.recorder.started(0, "mask", Request(0.0, caller.address_space, 1), 0.0, targets, 0, caller.clock())
    best = float("inf")
    for r in range(repeats):
        base = r * calls * 5.0
        t = time.perf_counter()
        for i in range(calls):
            hv._flush_targets_arrays(plan, scope, row, base + (i + 1) * 5.0, IPI)
        best = min(best, time.perf_counter() - t)
    return best / (calls * len(targets)) * 1e6


class Floor:
    """The two parts of every floor, measured again beside each measured run (the machine's speed
    drifts by tens of percent within minutes): one raw SimPy timeout, and one running target's
    flush arithmetic. Keeps the best (fastest) of its samples, as the runs keep their best wall."""

    def __init__(self):
        self.raw_us = self.target_flush_us = float("inf")

    def sample(self) -> None:
        self.raw_us = min(self.raw_us, 1e6 / raw_simpy_rate(50_000, 1))
        self.target_flush_us = min(self.target_flush_us, target_flush_us(10_000, 1))

    def seconds(self, events: int, target_flushes: int) -> float:
        return (events * self.raw_us + target_flushes * self.target_flush_us) / 1e6


def sweep_speedup(points: int, duration_us: float, repeats: int) -> tuple[float, float, int]:
    """Wall time of the same sweep (tlbsim.sweep, with its Parquet parts) on 1 process and on all
    cores; best of ``repeats`` each (the two alternate), and the two must give identical tables."""
    from tlbsim.sweep import SweepSpec, run_sweep

    spec = SweepSpec.from_dict({
        "name": "bench", "replications": points // 4, "seed": 1,
        "fixed": {"partition.vps": 16, "partition.duration_us": duration_us},
        "grid": {"workload.policy": ["mask", "all", "linux", "kvm-pv"]},
    })
    jobs = os.cpu_count() or 1
    best = {}
    tables = {}
    for _ in range(repeats):  # alternate, so a slow spell of this shared machine hits both sides
        for n in (1, jobs):
            with tempfile.TemporaryDirectory() as d:
                out = run_sweep(spec, d, jobs=n, progress=False)
                best[n] = min(best.get(n, float("inf")), out.wall_s)
                tables[n] = out.points.drop(columns=["wall_s"])
    pd.testing.assert_frame_equal(tables[1], tables[jobs])
    return best[1], best[jobs], jobs


_MEMORY_SCRIPT = """
import sys
from tlbsim.config import Config
from tlbsim.runner import simulate
n = int(sys.argv[1])
q = {f"exits.{k}.rate_per_ms": 0.0 for k in Config().exits.specs()}
# 2 VPs sharing one address space, each starting a shootdown every 10 us on average
dur = n / 200 * 1000.0
cfg = Config().with_overrides({**q, "partition.vps": 2, "partition.lps": 2, "workload.rate_per_ms": 100.0,
                               "partition.duration_us": dur})
def status(key):  # VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
before = status("VmHWM")
res = simulate(cfg, seed=0)
after = status("VmHWM")
print(len(res.shootdowns), before, after)
"""


def memory_for(n: int) -> tuple[int, float, float]:
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n)], capture_output=True, text=True, check=True)
    rows, before_kb, after_kb = out.stdout.split()
    return int(rows), int(before_kb) / 1024, int(after_kb) / 1024



def naive_simpy_us_per_ms(vps: int, duration_us: float, seed: int = 0) -> tuple[float, int]:
    """The peer a user would otherwise write: the standard scenario (default config, ``mask``, one VP
    per LP) in plain SimPy. Each VP is a process that runs guest code until its next exit (the default
    exit mix: a timeout for its cost) or its next shootdown (exponential arrivals). A shootdown's
    initiator spends the hypercall's cost while every other VP gets its own flush process (its
    interruption and the TLB arithmetic), and waits for them all. No scheduler, locks, VTL1, lazy
    accounting or records: it does less than tlbsim, so the ratio understates what tlbsim saves.
    Returns (wall us per simulated ms, SimPy events processed)."""
    import numpy as np

    cfg = Config()
    c = cfg.costs
    specs = [s for s in cfg.exits.specs().values() if s.rate_per_ms > 0]
    exit_rate = sum(s.rate_per_ms for s in specs)
    exit_p = np.array([s.rate_per_ms for s in specs]) / exit_rate
    exit_cost = [s.cost_us for s in specs]
    rng = np.random.default_rng(seed)
    env = CountingEnvironment()
    tlb = [float(cfg.tlb.working_set_pages)] * vps  # non-global entries cached per VP
    working_set = float(cfg.tlb.working_set_pages)
    call_us = c.vmexit_roundtrip_us + c.hypercall_decode_us + c.mask_per_vp_us * (vps - 1)

    def target_flush(i):
        yield env.timeout(c.target_interrupt_us)
        tlb[i] -= tlb[i] / working_set

    def vp(i):
        next_exit = rng.exponential(1000.0 / exit_rate)
        next_shootdown = rng.exponential(1000.0 / cfg.workload.rate_per_ms)
        while True:
            if next_exit < next_shootdown:
                yield env.timeout(next_exit)
                next_shootdown -= next_exit
                yield env.timeout(exit_cost[rng.choice(len(exit_cost), p=exit_p)])
                next_exit = rng.exponential(1000.0 / exit_rate)
            else:
                yield env.timeout(next_shootdown)
                next_exit -= next_shootdown
                flushes = [env.process(target_flush(t)) for t in range(vps) if t != i]
                yield env.timeout(call_us + c.hv_ipi_send_us * (vps - 1) + c.hv_ipi_roundtrip_us)
                yield env.all_of(flushes)
                next_shootdown = rng.exponential(1000.0 / cfg.workload.rate_per_ms)

    for i in range(vps):
        env.process(vp(i))
    t = time.perf_counter()
    env.run(until=duration_us)
    wall = time.perf_counter() - t
    return wall / (duration_us / 1000.0) * 1e6, env.events_scheduled


_LARGE_SCRIPT = """
import json, sys, time
from tlbsim.bench import raw_simpy_rate
from tlbsim.config import Config
from tlbsim.model.partition import simulate_records
vps, dur = int(sys.argv[1]), float(sys.argv[2])
raw_before = 1e6 / raw_simpy_rate(100_000, 3)
cfg = Config().with_overrides({"partition.vps": vps, "partition.lps": vps, "partition.duration_us": dur})
t = time.perf_counter()
rec = simulate_records(cfg, 0)
wall = time.perf_counter() - t
raw_after = 1e6 / raw_simpy_rate(100_000, 3)
peak = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0] / 1024
print(json.dumps({"wall_s": wall, "peak_mb": peak, "events": rec.events, "shootdowns": len(rec.shootdowns["id"]),
                  "running_targets": int(sum(rec.shootdowns["running_targets"])),
                  "suspensions": int(sum(rec.shootdowns["suspensions"])),
                  "target_flushes": int(sum(rec.vps["flushes_applied"])),
                  "raw_us": min(raw_before, raw_after)}))
"""


def large_partition(vps: int, duration_us: float) -> dict:
    """Simulate a large partition (default config) in a child process: wall, peak RSS, counts."""
    out = subprocess.run([sys.executable, "-c", _LARGE_SCRIPT, str(vps), str(duration_us)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def _figure(figures: dict, name: str, value: float, unit: str, *, floor: float | None = None,
            target: str = "", better: str = "lower") -> dict:
    fig = {"value": float(value), "unit": unit, "better": better}
    if floor is not None:
        fig["floor"] = float(floor)
        fig["over_floor"] = float(value / floor) if floor else float("nan")
    if target:
        fig["target"] = target
    figures[name] = fig
    return fig


def scenario_over_floor(figures: dict, key: str, label: str, config: Config, repeats: int, target: str = "",
                        skeleton: float | None = None) -> None:
    """Wall of ``config`` (best of ``repeats``) against its floor, sampled between the runs. With
    ``skeleton`` (``skeleton_event_us`` over a raw timeout) it also prints where a model would sit
    whose every event cost what the skeleton's do, with the flushes at their floor."""
    floor, wall = Floor(), float("inf")
    for _ in range(repeats):
        floor.sample()
        w, rec = timed(config)
        wall = min(wall, w)
    flushed = sum(rec.shootdowns["running_targets"])
    floor_s = floor.seconds(rec.events, flushed)
    f = _figure(figures, key, wall, "s", floor=floor_s, target=target)
    print(f"   {label:44s} {rec.events:9,} events {flushed:9,} target flushes  {wall:6.2f} s, floor {floor_s:6.3f} s:"
          f" {f['over_floor']:5.2f} x floor" + (f" (target {target})" if target else ""))
    if skeleton is not None:
        events_s = rec.events * floor.raw_us / 1e6
        bound = (events_s * skeleton + (floor_s - events_s)) / floor_s
        print(f"   {'':44s} events are {events_s / floor_s:.0%} of the floor; at the skeleton's cost per event "
              f"it would be {bound:.2f} x floor: the rest ({f['over_floor'] - bound:.2f}) is the mechanisms' code")


def main(quick: bool = False, json_out: str | None = None, compare: str | None = None,
         tolerance: float = DEFAULT_TOLERANCE) -> int:
    dur = 100_000.0 if quick else 1_000_000.0
    reps = 1 if quick else 3
    figures: dict[str, dict] = {}
    meta = {"quick": quick, "python": sys.version.split()[0], "simpy": simpy.__version__, "cores": os.cpu_count(),
            "machine": platform.machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    print(f"tlbsim bench ({'quick' if quick else 'full'}), Python {meta['python']}, SimPy {meta['simpy']}, "
          f"{meta['cores']} cores")

    _bench_floor(figures, quick, dur, reps)
    _bench_scenarios(figures, quick, dur, reps)
    _bench_per_shootdown(figures, quick, dur, reps)
    _bench_growth(figures, quick, dur, reps)
    _bench_naive(figures, quick, dur, reps)
    _bench_large(figures, quick, dur, reps)
    _bench_memory(figures, quick, dur, reps)
    _bench_sweep(figures, quick, dur, reps)

    report = {"meta": meta, "figures": figures}
    if json_out:
        Path(json_out).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
        print(f"figures written to {json_out}")
    if compare:
        print_comparison(report, load_report(compare), compare, tolerance)
    return 0


def _bench_floor(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 1: raw SimPy and the flush arithmetic alone."""
    raw = raw_simpy_rate(100_000 if quick else 300_000)
    raw_us = 1e6 / raw
    _figure(figures, "raw_simpy_timeout_us", raw_us, "us", better="lower")
    per_target = target_flush_us(20_000 if quick else 100_000)
    _figure(figures, "target_flush_us", per_target, "us")
    space_target = target_flush_us(20_000 if quick else 100_000, pages=None)
    _figure(figures, "target_flush_space_us", space_target, "us")
    print(f"\n1. raw SimPy: {raw:,.0f} timeouts/s ({raw_us:.3f} us per timeout); one running target's flush "
          f"arithmetic alone (no SimPy): {per_target:.3f} us for the default 1-page List call, {space_target:.3f} us "
          "for a Space call (the whole address space refills between flushes)")


def _bench_scenarios(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 2: scenarios against their floor."""
    print(f"\n2. scenarios ({dur / 1000:,.0f} ms simulated), wall against floor (events as raw SimPy timeouts + "
          "target flushes as arithmetic alone)")
    reps_floor = max(reps, 2)
    raw_again = skeleton = float("inf")
    for _ in range(reps_floor + 1):  # alternate, best of each: the machine's speed drifts
        raw_again = min(raw_again, 1e6 / raw_simpy_rate(50_000, 1))
        skeleton = min(skeleton, skeleton_event_us(16, 50_000 if quick else 200_000))
    f = _figure(figures, "skeleton_event_over_raw", skeleton / raw_again, "ratio")
    print(f"   a skeleton of 16 VP loops (guest interval, drawn exit, time per state; no mechanism): "
          f"{skeleton:.3f} us per event, {f['value']:.2f} x a raw timeout: the least a model of VPs adds "
          "to the event part of a floor")
    scenario_over_floor(figures, "standard_wall_s", "standard (16 VPs, mask)", standard(dur), reps_floor, "<= 1.5",
                        skeleton=f["value"])
    scenario_over_floor(figures, "cotenant_wall_s", "co-tenants (16 VPs + 3 x 16 on 16 LPs, ipi)",
                        standard(dur / 2, **{"workload.policy": "ipi", "host.cotenants": 3, "host.cotenant_vps": 16,
                                             "partition.slice_us": 3000.0}), reps_floor)
    scenario_over_floor(figures, "closed_loop_wall_s", "closed loop (KVM, 300 us work, mask)",
                        standard(dur, **{"partition.semantics": "kvm", "workload.mode": "closed",
                                         "workload.closed_work_us": 300.0}), reps_floor)


def _bench_per_shootdown(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 3: events and wall time per shootdown, per policy."""
    print("\n3. per shootdown, standard scenario   total: events  wall us (x raw)   marginal: events  wall us (x raw)")
    per_policy = {}
    for policy in ("ipi", "mask", "all", "linux", "kvm-pv"):
        m = per_policy[policy] = marginal(standard(dur, **{"workload.policy": policy}), reps)
        _figure(figures, f"marginal_wall_us_per_sd.{policy}", m["marginal_wall_us_per_sd"], "us")
        print(f"   {policy:8s} ({m['shootdowns']:6,} shootdowns)    {m['events_per_sd']:6.1f} "
              f"{m['wall_us_per_sd']:8.1f} ({m['wall_us_per_sd'] / m['raw_us']:5.1f})"
              f"             {m['marginal_events_per_sd']:6.1f} {m['marginal_wall_us_per_sd']:8.1f} "
              f"({m['marginal_wall_us_per_sd'] / m['raw_us']:5.1f})")
    mask = per_policy["mask"]
    floor = mask["marginal_events_per_sd"] * mask["raw_us"] + 15 * mask["target_flush_us"]
    f = _figure(figures, "mask_15_targets_us", mask["marginal_wall_us_per_sd"], "us", floor=floor, target="<= 1.5")
    print(f"   mask, 15 running targets: {f['value']:.1f} us against a floor of {floor:.1f} us (its "
          f"{mask['marginal_events_per_sd']:.1f} marginal events as raw timeouts + 15 x {mask['target_flush_us']:.2f} "
          "us, both measured between its runs): "
          f"{f['over_floor']:.2f} x floor (target <= 1.5)")
    ipi = per_policy["ipi"]
    ipi_cfg = standard(dur, **{"workload.policy": "ipi"})
    _, ipi_rec = timed(ipi_cfg)
    n_sd = max(1, len(ipi_rec.shootdowns["id"]))
    ipis_per_sd = sum(ipi_rec.shootdowns["ipis"]) / n_sd
    per_target_events = ipi["marginal_events_per_sd"] / ipis_per_sd if ipis_per_sd else float("nan")
    _figure(figures, "ipi_events_per_target", per_target_events, "events", target="<= 3")
    print(f"   ipi: {ipi['marginal_events_per_sd']:.1f} marginal events per shootdown over {ipis_per_sd:.1f} IPIs: "
          f"{per_target_events:.2f} SimPy events per target (target <= 3; the floor is 2: the IPI's "
          "delivery, which wakes the target, and its handler)")


def _bench_growth(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 4: marginal wall time per shootdown against VP count."""
    print("\n4. marginal wall us per shootdown vs VP count (groups of 8 VPs share an address space: 7 targets)")
    sizes = (8, 16, 32, 64, 256)
    for policy in ("mask", "all", "ipi", "kvm-pv", "linux"):
        cells = []
        for n in sizes:
            d = max(20_000.0, dur * 8 / n / (4 if quick else 1))
            cfg = standard(d, **{"partition.vps": n, "partition.lps": n, "workload.policy": policy,
                                 "workload.sharing": "groups", "workload.group_size": 8})
            cells.append(marginal(cfg, reps)["marginal_wall_us_per_sd"])
        base8 = cells[0] or float("nan")
        _figure(figures, f"growth_64_over_8.{policy}", cells[3] / base8, "ratio")
        print(f"   {policy:8s} " + "  ".join(f"{n:>3} VPs {c:7.1f}" for n, c in zip(sizes, cells, strict=True))
              + f"   64/8 = {cells[3] / base8:4.2f}")
    print("   target: mask 64/8 <= 1.5; no policy faster than linear in VP count")


def _bench_naive(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 5: a naive SimPy model against tlbsim."""
    naive_dur = 50_000.0 if quick else 200_000.0
    print("\n5. a naive SimPy model (a process per target flush, exits as timeouts, no scheduler or records) against "
          "tlbsim, same scenario, wall us per simulated ms")
    for n in (16, 64):  # tlbsim's wall includes building the partition; the naive model's does not
        naive_us = wall = float("inf")
        for _ in range(reps):  # alternate, best of each: a slow spell of the machine hits both sides
            us, naive_events = naive_simpy_us_per_ms(n, naive_dur)
            naive_us = min(naive_us, us)
            w, rec = timed(standard(naive_dur, **{"partition.vps": n, "partition.lps": n}))
            wall = min(wall, w)
        ours_us = wall / (naive_dur / 1000.0) * 1e6
        f = _figure(figures, f"naive_over_tlbsim.{n}", naive_us / ours_us, "ratio", target=">= 5" if n == 16 else "",
                    better="higher")
        print(f"   {n} VPs (mask): naive {naive_us:8,.0f} ({naive_events:,} events), tlbsim {ours_us:8,.0f} "
              f"({rec.events:,} events): tlbsim is {f['value']:.2f} x faster" + (" (target >= 5)" if n == 16 else ""))


def _bench_large(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 6: a large partition."""
    big_vps, big_dur = (1024, 2_000.0) if quick else (4096, 10_000.0)
    big_floor = Floor()
    big_floor.sample()
    per_target = array_target_flush_us(big_vps, 50 if quick else 200)
    big = large_partition(big_vps, big_dur)
    big_floor.sample()
    per_target = min(per_target, array_target_flush_us(big_vps, 50 if quick else 200))
    # its floor: the events as raw timeouts, and every flush a VP took (those of calls that met a locked
    # TLB and were reissued included: a row counts only the last try's running targets) at the
    # array-backed flush's cost per running target
    floor = (big["events"] * big_floor.raw_us + big["target_flushes"] * per_target) / 1e6
    f = _figure(figures, "large_partition_wall_s", big["wall_s"], "s", floor=floor)
    ref_s = big["wall_s"] * REFERENCE_RAW_US / big["raw_us"]
    _figure(figures, "large_partition_reference_s", ref_s, "s", target="<= 10 s" if not quick else "")
    _figure(figures, "large_partition_peak_mb", big["peak_mb"], "MB", target="<= 500" if not quick else "")
    ref_target = per_target * REFERENCE_RAW_US / big_floor.raw_us
    _figure(figures, "large_partition_target_flush_us", per_target, "us")
    _figure(figures, "large_partition_target_flush_reference_us", ref_target, "us",
            target="<= 0.1" if not quick else "")
    print(f"\n6. {big_vps:,} VPs, {big_dur / 1000:g} ms simulated, default config: {big['wall_s']:.1f} s "
          f"({ref_s:.1f} s at reference speed: raw SimPy {big['raw_us']:.3f} us in its process against "
          f"{REFERENCE_RAW_US}), peak RSS {big['peak_mb']:,.0f} MB; {big['shootdowns']:,} shootdowns flushed "
          f"{big['running_targets']:,} running targets ({big['suspensions']:,} suspensions; {big['target_flushes']:,} "
          f"flushes applied to VPs, the reissued tries' included): floor {floor:.1f} s, "
          f"{f['over_floor']:.2f} x floor")
    print(f"   a running target of its flush (array-backed, {big_vps - 1:,} targets a call): {per_target:.3f} us, "
          f"{ref_target:.3f} us at reference speed" + ("" if quick else " (target <= 0.1)"))


def _bench_memory(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 7: peak memory recording many shootdowns."""
    n_rows = 100_000 if quick else 1_000_000
    rows, before, after = memory_for(n_rows)
    table_mb = rows * _ROW_BYTES / 2**20
    _figure(figures, "memory_per_shootdown_bytes", (after - before) * 2**20 / max(rows, 1), "B",
            floor=_ROW_BYTES)
    _figure(figures, "memory_peak_mb", after, "MB", floor=before + table_mb, target="<= 200" if not quick else "")
    print(f"\n7. peak memory recording {rows:,} shootdowns: {after:,.0f} MB peak RSS ({before:,.0f} MB after "
          f"imports, +{after - before:,.0f} MB for the run and its tables; the shootdown table alone is "
          f"{table_mb:,.0f} MB at {_ROW_BYTES} B a row): floor {before + table_mb:,.0f} MB")


def _bench_sweep(figures: dict, quick: bool, dur: float, reps: int) -> None:
    """Section 8: sweep speed-up on every core."""
    points = 8 if quick else 32
    one, many, jobs = sweep_speedup(points, 50_000.0 if quick else 200_000.0, 1 if quick else 3)
    _figure(figures, "sweep_speedup", one / many, "ratio", target=">= 1.7", better="higher")
    print(f"\n8. sweep of {points} points: {one:.2f} s on 1 process, {many:.2f} s on {jobs}: "
          f"speed-up {one / many:.2f}x (target >= 1.7x on 2 cores)")
    print(f"\npeak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


_ROW_BYTES = ROW_BYTES  # bytes of one recorded shootdown row


def load_report(path: str | Path) -> dict:
    """A bench JSON written by ``--json`` (ValueError with the reason if it is not one)."""
    from tlbsim.config import ConfigError, read_text

    try:
        report = json.loads(read_text(path, "bench figures"))  # a regular file (not a FIFO or a device)
    except ConfigError as e:
        raise ValueError(str(e)) from None
    except json.JSONDecodeError as e:
        raise ValueError(f"cannot read bench figures {path}: {e}") from None
    if not isinstance(report, dict) or not isinstance(report.get("figures"), dict):
        raise ValueError(f"{path} is not a tlbsim bench --json file (no 'figures')")
    return report


#: the figure that measures the machine itself: shown, never flagged, and the unit of the others
MACHINE = "raw_simpy_timeout_us"


def compare_reports(new: dict, ref: dict, tolerance: float = DEFAULT_TOLERANCE) -> list[dict]:
    """Per figure present in both: new and reference values of the measure that travels between
    machines, and new / reference. A wall figure with a floor is compared as its ratio to the floor;
    a time without a floor as a multiple of the same run's raw SimPy timeout (``x_raw``); counts,
    ratios and memory as they are. The raw timeout itself only says how fast each machine was.
    A figure is flagged (``regressed``) when it is worse by more than ``tolerance`` (a fraction)."""
    rows = []
    raw_new = new["figures"].get(MACHINE, {}).get("value")
    raw_ref = ref["figures"].get(MACHINE, {}).get("value")
    for name, fig in new["figures"].items():
        old = ref["figures"].get(name)
        if not isinstance(old, dict):
            continue
        if "over_floor" in fig and "over_floor" in old:
            key, a, b = "over_floor", fig["over_floor"], old["over_floor"]
        elif name != MACHINE and fig.get("unit") in ("us", "s") and raw_new and raw_ref:
            scale = 1e-6 if fig["unit"] == "s" else 1.0
            key, a, b = "x_raw", fig["value"] / (raw_new * scale), old.get("value", 0) / (raw_ref * scale)
        else:
            key, a, b = "value", fig["value"], old.get("value")
        if not isinstance(b, (int, float)) or not b:
            continue
        ratio = a / b
        worse = ratio > 1.0 if fig.get("better", "lower") == "lower" else ratio < 1.0
        rows.append({"figure": name, "measure": "machine" if name == MACHINE else key, "new": a, "reference": b,
                     "ratio": ratio, "regressed": name != MACHINE and worse and abs(ratio - 1.0) > tolerance})
    return rows


def print_comparison(new: dict, ref: dict, path, tolerance: float = DEFAULT_TOLERANCE) -> None:
    rows = compare_reports(new, ref, tolerance)
    print(f"\ncompared with {path} ({ref.get('meta', {}).get('when', '?')}, "
          f"{'quick' if ref.get('meta', {}).get('quick') else 'full'}): new / reference; "
          "wall figures as their ratio to their floor")
    for r in rows:
        flag = f"  <- slower by more than {tolerance:.0%}" if r["regressed"] else ""
        print(f"   {r['figure']:34s} {r['measure']:10s} {r['new']:10.3f} {r['reference']:10.3f}  "
              f"{r['ratio']:5.2f}{flag}")
    if any(r["regressed"] for r in rows):
        print("   note: on a shared machine two runs of the same code differ by up to 10-40 % on some figures "
              "(docs/performance.md); run again, or compare with --tolerance, before believing a flag")
    if new.get("meta", {}).get("quick") != ref.get("meta", {}).get("quick"):
        print("   note: one run is --quick and the other is not; their scenarios differ in size")
