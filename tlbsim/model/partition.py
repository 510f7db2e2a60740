"""Wires one run: environment, host, lock sources, hypervisor, policy, VPs;
runs it and returns plain records. No file I/O, no printing.

Reading order of the model: this module wires the parts; vp.py (run loop,
on accounting.py and tlb.py), hypervisor.py (with profiles.py and locks.py)
and guest.py (policies) behave; records.py's recorder writes what happened.
"""

from __future__ import annotations

import math
from itertools import chain, islice

import numpy as np

from tlbsim import hv
from tlbsim.config import Config, ExitSpec
from tlbsim.model import InvariantError, rng, vp_arrays
from tlbsim.model.accounting import EXIT_REASONS
from tlbsim.model.guest import make_policy
from tlbsim.model.hypervisor import Hypervisor
from tlbsim.model.locks import InterceptInhibit, TlbLocks, VsmSchedule, VsmTlbLocks
from tlbsim.model.machine import CountingEnvironment, EventBudgetExceeded, Machine  # noqa: F401 (re-exported)
from tlbsim.model.profiles import profile_for
from tlbsim.model.recorder import Records
from tlbsim.model.spin import SpinYield
from tlbsim.model.vf import PhysicalFunction, VirtualFunction
from tlbsim.model.vp import GUEST, VP
from tlbsim.model.vp_arrays import VpArrays, array_vp_class
from tlbsim.model.workload import ClosedLoop, PoissonArrivals, TraceArrivals, TraceEvent

#: Up to this many sharers of an address space, each VP's targets among them are a list of its own
#: (0.5 MB at 256 VPs): iterating a list is faster than the chained islices of an ``OtherVPs`` view
#: (docs/performance.md). Beyond, the view: lists would take n x (n - 1) pointers.
TARGET_LISTS_UP_TO = 256


class OtherVPs:
    """The VPs of a shared list but one, in the list's order, without a copy: the targets of a VP
    among the sharers of its address space. With every VP sharing one address space a list each
    took n x (n - 1) pointers (134 MB at 4,096 VPs); this takes two fields. Iteration runs at C
    speed (two islices chained). Read-only, like the list it views."""

    __slots__ = ("_vps", "_skip", "_indices")

    def __init__(self, vps: list, skip: int, indices: tuple[int, ...] | None = None):
        self._vps = vps  # shared, never mutated after the partition is built
        self._skip = skip  # position of the VP left out
        self._indices = indices  # the shared list's VP indices, shared too (None: read from the VPs)

    def __iter__(self):
        return chain(islice(self._vps, self._skip), islice(self._vps, self._skip + 1, None))

    def __len__(self) -> int:
        return len(self._vps) - 1

    def indices(self) -> tuple[int, ...]:
        """The VP index of each, in order (what a guest builds its call from: two tuple slices,
        not 4,095 attribute reads)."""
        every = self._indices if self._indices is not None else tuple(v.index for v in self._vps)
        return every[:self._skip] + every[self._skip + 1:]


class _LosingList(list):
    """run.inject_fault = "drop_deferred_flush": a deferred-flush list that loses what it is given."""

    def append(self, item) -> None:
        pass


def address_space_index(config: Config, vp: int) -> int:
    """The address space (index of the sharing pattern) VP ``vp`` runs."""
    w = config.workload
    if w.sharing == "all":
        return 0
    if w.sharing == "groups":
        return vp // w.group_size
    return vp


def cr3_of(as_index: int) -> int:
    """The CR3 value that names address space ``as_index``."""
    return (as_index + 1) << 12


class Partition:
    """One guest partition: its VPs, workload, policy, hypervisor service, TLB locks and VFs. The
    host they run on (environment, LPs, scheduler, recorder, co-tenants, other guests) is the
    ``Machine``: a Partition built without one builds it, with itself as guest 0 and, with
    ``host.guests`` > 1, the other guest partitions (identical but for ``host.guest_policies``,
    each with its own random streams) after it."""

    def __init__(self, config: Config, seed: int | np.random.SeedSequence = 0, trace: list[TraceEvent] | None = None,
                 vf_trace: dict[int, list[tuple[float, int]]] | None = None, timeline=None, spill=None,
                 machine: Machine | None = None, index: int = 0):
        owner = machine is None
        if owner:
            machine = Machine(config, spill)
        self.machine = machine
        self.index = index  # the partition column of every table
        machine.guests.append(self)
        self.config = config
        self.timeline = timeline  # model.timeline.Timeline, or None (no tracing: the plain VP class)
        self.env = machine.env
        p = config.partition
        w = config.workload
        self.check = config.run.check_invariants
        self.profile = profile_for(p.semantics)
        # OpenHCL's confidential VM (the flush path through VTL2): "snp", "tdx"; "none" otherwise
        self.isolation = (("snp" if p.semantics == "openhcl" else "none") if p.isolation == "profile"
                          else p.isolation)
        self.recorder = machine.recorder
        self.host = machine.host
        streams = rng.vp_streams(seed, p.vps)
        self.spin_yield = self._spin_yield(config)
        self.last_boosted = -1  # the VP the last directed yield went to (kvm_vcpu_on_spin's last_boosted_vcpu)

        # large partitions keep their VPs' flush state in arrays (vp_arrays.py); not with a timeline,
        # whose TracingVPs follow each VP's accounting one at a time
        self.vp_arrays = (VpArrays(p.vps) if p.vps >= vp_arrays.ARRAYS_FROM_VPS and timeline is None else None)
        self._register_locks(config, streams)
        self.hypervisor = Hypervisor(self)
        self.policy = make_policy(w.policy, self)
        specs = config.exits.specs()
        self.exit_specs = [
            specs[r.name.lower()] if r.name.lower() in specs else ExitSpec(0.0, config.costs.vmexit_roundtrip_us)
            for r in EXIT_REASONS
        ]

        self._build_vps(config, streams, trace, timeline)

        if owner:  # co-tenants start here, after guest 0's VPs and before its VFs (the order of their events)
            machine.start_cotenants(seed)
        if config.run.inject_fault == "drop_deferred_flush":
            for vp in self.vps:
                vp.deferred = _LosingList()
        self._mask_targets = hv.mask_to_vps(w.processor_mask) if w.processor_mask else None
        self._targets: dict[tuple[int, int], tuple[list[VP], tuple[int, ...]]] = {}
        self._sharer_indices: dict[int, tuple[int, ...]] = {}  # address space -> its sharers' indices

        self._build_vfs(config, seed, vf_trace)

        if owner:
            for g in range(1, config.host.guests):
                policies = config.host.guest_policies
                config_g = config.with_overrides({"workload.policy": policies[g - 1]}) if policies else config
                Partition(config_g, rng.guest_seed(seed, g), trace, vf_trace, None, None, machine, g)

    def _register_locks(self, config: Config, streams) -> None:
        """What can lock a TLB: registered sources, queried by the hypervisor. TlbFlushInhibit only
        when MemoryAccess exits happen (a source that can never lock costs every call a lock check)."""
        p, lk = config.partition, config.locks
        self.locks = TlbLocks()
        emulates = config.exits.memory_access.rate_per_ms > 0
        self.intercept_inhibit = InterceptInhibit() if lk.memory_access_inhibit and emulates else None
        if self.intercept_inhibit is not None:
            self.locks.register(self.intercept_inhibit)
        self._vsm: dict[int, VsmSchedule] = {}
        if lk.vsm_rate_per_ms > 0:
            vsm_vps = set(lk.vsm_vps) if lk.vsm_vps else set(range(p.vps))
            self._vsm = {i: VsmSchedule(streams[i]["vsm"], lk.vsm_rate_per_ms, lk.vsm_hold_mean_us,
                                        lk.vsm_hold_distribution == "fixed")
                         for i in range(p.vps) if i in vsm_vps}
            self.vsm_locks = VsmTlbLocks({})
            self.locks.register(self.vsm_locks)

    def _arrivals(self, config: Config, i: int, stream, threads: int, initiators: set, per_vp_trace: dict):
        """VP ``i``'s workload: none without a thread, its trace rows, a closed loop or Poisson arrivals."""
        w = config.workload
        if i >= threads:  # no thread: idle, no arrivals
            return PoissonArrivals(stream, 0.0, w.burst_size, w.pages, w.full_flush_fraction)
        if per_vp_trace is not None:
            return TraceArrivals(per_vp_trace.get(i, []), cr3_of)
        if w.mode == "closed":
            work_us = w.closed_work_us or (1000.0 / w.rate_per_ms)
            return ClosedLoop(stream, work_us if i in initiators else math.inf, w.closed_work_distribution == "fixed",
                              w.burst_size, w.pages, w.full_flush_fraction, w.sleep_us)
        rate = w.rate_per_ms if i in initiators else 0.0
        return PoissonArrivals(stream, rate, w.burst_size, w.pages, w.full_flush_fraction)

    def _build_vps(self, config: Config, streams, trace, timeline) -> None:
        """The VPs, in index order (a TracingVP each when a timeline is asked for), and the active set
        of each address space (``sharers``: the VPs with a thread that run it)."""
        p, w = config.partition, config.workload
        as_index = [self._as_index(i) for i in range(p.vps)]
        self.sharers: dict[int, list[VP]] = {}
        initiators = set(w.initiators) if w.initiators else set(range(p.vps))
        per_vp_trace: dict[int, list[TraceEvent]] | None = None
        if trace is not None:
            per_vp_trace = {}
            for e in trace:
                per_vp_trace.setdefault(e.vp, []).append(e)
        self.vps: list[VP] = []
        vp_class = VP
        if timeline is not None:
            from tlbsim.model.timeline import TracingVP, trace_recorder

            vp_class = TracingVP
            trace_recorder(self.recorder, timeline, self.index)
        elif self.vp_arrays is not None:
            vp_class = array_vp_class(VP, self.vp_arrays)
        threads = w.threads or p.vps  # VPs 0 .. threads - 1 run the workload's threads; the rest idle
        for i in range(p.vps):
            arrivals = self._arrivals(config, i, streams[i]["workload"], threads, initiators, per_vp_trace)
            vp = vp_class(self, i, cr3_of(as_index[i]), streams[i], arrivals, i < threads)
            self.vps.append(vp)
            if i < threads:  # the active set: VPs that ran the address space
                self.sharers.setdefault(vp.address_space, []).append(vp)
            if vp.vsm is not None:
                self.vsm_locks.by_vp[i] = vp

    def _build_vfs(self, config: Config, seed, vf_trace) -> None:
        """The PF and its VFs (none when vf.count = 0), each served by its service VP."""
        v = config.vf
        self.pf: PhysicalFunction | None = None
        self.vfs: list[VirtualFunction] = []
        if not v.count:
            return
        vf_streams, pf_stream = rng.vf_streams(seed, v.count)
        self.pf = PhysicalFunction(self.env, v, pf_stream)
        for j in range(v.count):
            vp = self.vps[v.service_vps[j % len(v.service_vps)]]
            replay = (vf_trace or {}).get(j, []) if vf_trace is not None else None
            self.vfs.append(VirtualFunction(self.env, j, vp, self.pf, v, vf_streams[j],
                                            config.run.check_invariants, replay))

    def vsm_for(self, vp_index: int) -> VsmSchedule | None:
        """The VTL1 entry schedule of a VP, or None if it has no VTL1."""
        return self._vsm.get(vp_index)

    def _spin_yield(self, config: Config) -> SpinYield | None:
        """How spinning VPs give up their LP: [spin] over the profile's form."""
        sp = config.spin
        form = self.profile.spin_yield if sp.mode == "profile" else sp.mode
        if form == "off":
            return None
        cost = config.costs.vmexit_roundtrip_us + sp.yield_cost_us
        if form == "ple":
            return SpinYield("ple", sp.ple_window_us, sp.ple_window_grow, sp.ple_window_max_us, cost, sp.ipi_aware,
                             sp.candidates == "ready")
        window = sp.notify_retries * sp.spin_iteration_us  # a fixed retry count, then the notification
        return SpinYield("notify", window, 1.0, window, cost, sp.ipi_aware, sp.candidates == "ready")

    def _as_index(self, vp: int) -> int:
        return address_space_index(self.config, vp)

    # ------------------------------------------------------------ policy API
    def targets_of(self, vp: VP, address_space: int) -> list[VP]:
        """The other VPs that may cache ``address_space`` (Linux's mm_cpumask), in
        VP index order: a list, or beyond ``TARGET_LISTS_UP_TO`` sharers a view of
        theirs (``OtherVPs``). Fixed for a run: computed once per (VP, address
        space), and the same sequence is the targets of the flush calls built from
        it (a partition of n VPs sharing one address space holds n of these, not 3n)."""
        key = (vp.index, address_space)
        found = self._targets.get(key)
        if found is None:
            if self._mask_targets is not None:
                found = [self.vps[i] for i in self._mask_targets if i != vp.index]
            else:
                sharers = self.sharers.get(address_space, [])
                try:
                    skip = sharers.index(vp)
                    if len(sharers) <= TARGET_LISTS_UP_TO:
                        found = sharers[:skip] + sharers[skip + 1:]
                    else:
                        every = self._sharer_indices.get(address_space)
                        if every is None:
                            every = self._sharer_indices[address_space] = tuple(v.index for v in sharers)
                        found = OtherVPs(sharers, skip, every)
                except ValueError:  # not a sharer (its own address space is another): every sharer
                    found = sharers
            self._targets[key] = found
        return found

    # ------------------------------------------------------------ invariants
    def check_flush_guarantee(self, sd) -> None:
        """After a flush returns, every targeted VP has had the flush applied,
        or has it pending and is not running guest code (with
        run.check_invariants; a no-op otherwise)."""
        if not self.check or sd.status != "SUCCESS":
            return
        for t in sd.targets:
            i = t.index
            if sd.id in t.applied_ids:
                continue
            pending = any(d[0] is sd for d in t.deferred)
            if not pending or t.state == GUEST:
                raise InvariantError(
                    f"shootdown {sd.id} by VP {sd.initiator} returned at {self.env.now} us but target VP {i} "
                    f"neither flushed nor holds it pending (state {t.state})"
                )

    def check_end(self, duration: float) -> None:
        """Every VP's time sums to the run; every VF's bits are accounted (run.check_invariants)."""
        for vp in self.vps:
            total = vp.total_us()
            if not math.isclose(total, duration, rel_tol=1e-9, abs_tol=1e-6):
                raise InvariantError(f"partition {self.index} VP {vp.index}: time by state sums to {total} us, "
                                     f"not {duration} us")
        for vf in self.vfs:
            vf.check_end()

    def run(self, progress=None, steps: int = 100) -> Records:
        """Run the machine this partition is on (every guest) to the configured duration."""
        return self.machine.run(progress, steps)


def simulate_records(config: Config, seed: int = 0, trace: list[TraceEvent] | None = None,
                     vf_trace: dict[int, list[tuple[float, int]]] | None = None, progress=None,
                     timeline=None, spill=None) -> Records:
    return Partition(config, seed, trace, vf_trace, timeline, spill).run(progress)

