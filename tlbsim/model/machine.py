"""One host: the SimPy environment, the LPs and their scheduler, the shootdown recorder, the guest
partitions on it and the co-tenants; runs them and returns plain records. No file I/O, no printing.

Owns one question: "what shares this host?". Each guest partition (partition.Partition) has its own
VPs, workload, policy, hypervisor service and random streams; they meet only here: on the host's
LPs under one scheduler (host.py), and in one recorder whose rows carry the partition's index.
Co-tenants (host.CoTenantVp) are the cheap stand-in for another partition: CPU-bound or on a duty
cycle, with no guest model.
"""

from __future__ import annotations

import simpy

from tlbsim.config import Config
from tlbsim.model import InvariantError, rng
from tlbsim.model.host import CoTenantVp, SchedParams, make_host
from tlbsim.model.profiles import profile_for
from tlbsim.model.recorder import Records, ShootdownRecorder, vp_tables
from tlbsim.model.vf import VF_COLUMNS

_schedule = simpy.Environment.schedule  # bound once: cheaper than super() on every event


class EventBudgetExceeded(Exception):
    """The run scheduled more events than run.max_events allows."""


class CountingEnvironment(simpy.Environment):
    """A SimPy environment that counts the events it schedules (the bench's
    and the summary's ``events``): every event passes through ``schedule``.
    Past ``max_events`` it raises EventBudgetExceeded: no configuration can
    make a run go on for hours unnoticed."""

    def __init__(self, initial_time: float = 0, max_events: int = 1 << 62):
        super().__init__(initial_time)
        self.events_scheduled = 0
        self.max_events = max_events

    def schedule(self, event, priority=simpy.core.NORMAL, delay=0) -> None:
        self.events_scheduled += 1
        if self.events_scheduled > self.max_events:
            raise EventBudgetExceeded(
                f"the run scheduled more than run.max_events = {self.max_events:,} SimPy events at "
                f"{self.now:,.1f} us of simulated time; shorten partition.duration_us, lower the rates, "
                "or raise run.max_events")
        _schedule(self, event, priority, delay)


def sched_params(config: Config) -> SchedParams:
    """The host scheduler: [host] scheduler over the (first guest's) profile's."""
    h = config.host
    kind = profile_for(config.partition.semantics).scheduler if h.scheduler == "profile" else h.scheduler
    if kind == "cfs":
        return SchedParams.cfs(config.partition.lps, h.sched_latency_us, h.sched_min_granularity_us,
                               h.sched_wakeup_granularity_us)
    if kind == "eevdf":
        return SchedParams.eevdf(config.partition.lps, h.sched_base_slice_us)
    return SchedParams.hyperv(config.partition.slice_us)


class Machine:
    def __init__(self, config: Config, spill=None):
        self.config = config
        self.env = CountingEnvironment(max_events=config.run.max_events)
        # spill: a sink for recorded rows (results.ShootdownSpill) or None: all rows stay in memory
        check = config.run.check_invariants
        self.recorder = (ShootdownRecorder(spill, spill.rows_per_group, check) if spill is not None
                         else ShootdownRecorder(check=check))
        self.host = make_host(self.env, config.partition.lps, sched_params(config), config.host.runqueues)
        self.guests: list = []  # partition.Partition, in index order
        self.cotenants: list[CoTenantVp] = []

    def start_cotenants(self, seed) -> None:
        """Other partitions' VPs on the same LPs, under the same scheduler (their own spawn keys)."""
        h = self.config.host
        self.cotenants = [CoTenantVp(self.env, self.host, stream, h.cotenant_load, h.cotenant_duty,
                                     h.cotenant_period_us)
                          for stream in rng.cotenant_streams(seed, h.cotenants * h.cotenant_vps)]

    @property
    def vps(self) -> list:
        """Every guest's VPs, partition by partition."""
        return [vp for g in self.guests for vp in g.vps]

    # ------------------------------------------------------------ running
    def run(self, progress=None, steps: int = 100) -> Records:
        """Run to the configured duration. ``progress(fraction)``, if given, is
        called as simulated time passes each 1/``steps`` of the duration, by a
        process of its own: the model's events keep their relative order, so
        the records are identical, and its events are not counted."""
        duration = self.config.partition.duration_us
        reporting_events = 0
        if progress is not None:
            self.env.process(self._report(progress, steps, duration))
            reporting_events = steps + 1  # its Initialize event and one timeout per step (the last never fires)
        self.env.run(until=duration)
        if progress is not None:
            progress(1.0)
        vps = self.vps
        for vp in vps:
            vp.settle()
            vp.trim_charges(duration)
        for g in self.guests:
            if g.timeline is not None:
                for vp in g.vps:
                    vp.close(duration)
        if self.config.run.check_invariants:
            self._check_end(duration)
        return self._records(duration, self.env.events_scheduled - reporting_events)

    def _report(self, progress, steps: int, duration: float):
        for i in range(1, steps + 1):
            yield self.env.timeout(duration / steps)
            progress(i / steps)

    def _check_end(self, duration: float) -> None:
        for g in self.guests:
            g.check_end(duration)
        ids = self.recorder.ids()
        if len(ids) != len(set(ids)) or len(ids) != self.recorder.issued:
            raise InvariantError(f"shootdowns lost or duplicated: {len(ids)} recorded of {self.recorder.issued} issued")

    def _queued(self, duration: float) -> int:
        """Every open-loop arrival up to the end that no VP had started becomes a QUEUED row (censored:
        the policies' tables then describe the same requests); returns how many."""
        n = 0
        for g in self.guests:
            for vp in g.vps:
                if not vp.closed:  # open loop: every arrival so far (none without a thread)
                    vp.requests.extend(vp.arrivals.requests(vp, duration))
                for request in vp.requests:
                    self.recorder.queued(vp.index, g.policy.name, request, g.index, duration)
                    n += 1
                vp.requests.clear()
        return n

    def _records(self, duration: float, events: int) -> Records:
        guests = self.guests
        self.recorder.finish(duration, lambda partition, vp: guests[partition].vps[vp].clock())
        queued = self._queued(duration)
        cols = self.recorder.columns()
        vps, exits = vp_tables(self.vps)
        vfs = [vf for g in self.guests for vf in g.vfs]
        vf_rows = None
        vf_stats: dict[str, int] = {}
        if vfs:
            rows = [(g.index, *r) for g in self.guests for vf in g.vfs for r in vf.rows()]
            vf_rows = {c: [r[i] for r in rows] for i, c in enumerate(("partition", *VF_COLUMNS))}
            vf_stats = {
                "vf_notifications": sum(len(vf.notifications) for vf in vfs),
                "vf_notifications_dropped": sum(n.dropped for vf in vfs for n in vf.notifications),
                "vf_block_reads": sum(len(r) for vf in vfs for r in vf.reads),
                "pf_other_oids": sum(g.pf.other_oids for g in self.guests if g.pf is not None),
                "vf_oid_backlog_max": max(vf.oid_backlog_max for vf in vfs),
            }
        host = self.host
        return Records(
            vf=vf_rows, vf_stats=vf_stats,
            shootdowns=cols, vps=vps, exits=exits, duration_us=duration,
            events=events,
            requests_queued=queued,
            host={"dispatches": host.dispatches, "preemptions": host.preemptions,
                  "wakeup_preemptions": host.wakeup_preemptions,
                  "directed_yields": host.yields,
                  "directed_yields_to_target": host.yields_to_target,
                  "directed_yield_failures": host.yield_failures,
                  "guest_partitions": len(self.guests),
                  "cotenant_vps": len(self.cotenants),
                  "cotenant_run_us": sum(c.run_us for c in self.cotenants),
                  **host.balance_counters()},
        )
