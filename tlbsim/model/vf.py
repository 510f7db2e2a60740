"""SR-IOV VF configuration-block invalidations as events.

The NdisMInvalidateConfigBlock chain (NDIS SR-IOV VF configuration blocks), per VF:

  PF miniport  NdisMInvalidateConfigBlock(BlockMask)            (PF process)
  stack        cache |= BlockMask; if the guest's IOCTL is at the host:
               send the cache, clear it                          (no VP time)
  VMBus        vmbus_message_us to the guest
  guest VP     IOCTL_VPCI_INVALIDATE_BLOCK completes (DISPATCH)  ioctl_complete_us
               hop to a PASSIVE_LEVEL worker                     passive_hop_us
               NDIS queues OID_SRIOV_VF_INVALIDATE_CONFIG_BLOCK to the VF
               miniport (OIDs to one miniport are serialized) and issues
               the next IOCTL                                    ioctl_issue_us
  VF miniport  OID handler                                       oid_dispatch_us
               per flagged block: NdisMReadConfigBlock, synchronous: VMBus
               to the host, OID_SRIOV_READ_VF_CONFIG_BLOCK queued at the PF
               behind its other OIDs (pf_read_oid_us), VMBus back, then the
               thread resumes on its VP                          block_read_guest_us
               completes the OID (and, optionally, flushes its address
               space when a block in flush_blocks changed)

Guest work runs on the VF's service VP through ``VP.post_work``: it takes
that VP's time (state ``vf``) and waits when the VP is descheduled, halted,
suspended or spinning. Host-side steps take no VP time.

Invariants (checked when ``run.check_invariants`` is on; the per-call status
in ``result.vf`` reports them either way):
- at most one IOCTL outstanding per VF;
- notifications delivered in order, one at a time;
- a sent mask is exactly the OR of the PF calls since the previous send (no
  bit invented, none left behind);
- no bit lost: for every PF call and every block it names, the VF read that
  block with data taken after the call, or the bit is still on its way (in
  the stack's cache or a notification not yet read). Fault injection
  (``drop_probability``) drops notifications in the guest; a dropped bit that
  no later call sets again is lost, and the checker says which call lost it.
"""

from __future__ import annotations

import bisect
import math
from typing import TYPE_CHECKING

import simpy

from tlbsim.hv import set_bits
from tlbsim.model import InvariantError
from tlbsim.model.workload import Request

if TYPE_CHECKING:
    from tlbsim.config import VfConfig
    from tlbsim.model.vp import VP

VF_COLUMNS = ("vf", "call", "block_mask", "pf_call_us", "notification", "sent_us", "delivered_us",
              "read_done_us", "latency_us", "coalesced", "dropped", "status")


class VfInvariantError(InvariantError):
    """The VF chain broke one of its invariants (a lost bit, two IOCTLs, ...)."""


class PfCall:
    __slots__ = ("index", "time_us", "mask", "notification", "sent_us", "delivered_us", "dropped")

    def __init__(self, index: int, time_us: float, mask: int):
        self.index = index
        self.time_us = time_us
        self.mask = mask
        self.notification = -1
        self.sent_us = math.nan
        self.delivered_us = math.nan
        self.dropped = False


class Notification:
    """One cached mask sent to the guest with one IOCTL completion."""

    __slots__ = ("seq", "mask", "calls", "sent_us", "remaining", "dropped")

    def __init__(self, seq: int, mask: int, calls: list[PfCall], sent_us: float):
        self.seq = seq
        self.mask = mask
        self.calls = calls
        self.sent_us = sent_us
        self.remaining = mask  # blocks not yet read
        self.dropped = False


class PhysicalFunction:
    """The PF miniport's OID queue on the host: one OID at a time; block
    reads queue behind the PF's other OIDs."""

    def __init__(self, env: simpy.Environment, cfg: VfConfig, stream):
        self.env = env
        self.cfg = cfg
        self.oids = simpy.Resource(env, capacity=1)
        self.other_oids = 0
        if cfg.pf_other_oid_rate_per_ms > 0:
            env.process(self._other_oids(stream))

    def _other_oids(self, stream):
        env, gap_mean = self.env, 1000.0 / self.cfg.pf_other_oid_rate_per_ms
        while True:
            yield env.timeout(stream.exp(gap_mean))
            env.process(self._hold(self.cfg.pf_other_oid_us))

    def _hold(self, us: float):
        with self.oids.request() as req:
            yield req
            self.other_oids += 1
            yield self.env.timeout(us)

    def read_block(self):
        """OID_SRIOV_READ_VF_CONFIG_BLOCK: waits for the PF's OID queue;
        returns the time the PF took the block's data."""
        with self.oids.request() as req:
            yield req
            taken_us = self.env.now
            yield self.env.timeout(self.cfg.pf_read_oid_us)
        return taken_us


class VirtualFunction:
    def __init__(self, env: simpy.Environment, index: int, vp: VP, pf: PhysicalFunction, cfg: VfConfig,
                 streams: dict, check: bool, trace: list[tuple[float, int]] | None = None):
        self.env = env
        self.index = index
        self.vp = vp
        self.pf = pf
        self.cfg = cfg
        self.streams = streams
        self.check = check
        self.calls: list[PfCall] = []
        self.notifications: list[Notification] = []
        self.cache = 0
        self.cache_calls: list[PfCall] = []
        self.ioctl_at_host = False  # the stack holds the guest's IOCTL
        self.ioctls_outstanding = 0  # issued by the guest, not yet completed
        self.delivered = 0  # notifications whose IOCTL completed
        self.unsent_from = 0  # first call not yet sent (the checker's own bookkeeping)
        self.inflight: list[Notification] = []  # sent, not yet read, not dropped
        self.miniport = simpy.Resource(env, capacity=1)  # OIDs to the VF miniport: one at a time
        self.oid_backlog_max = 0  # most invalidate OIDs queued or running at the miniport at once
        self.reads: list[list[tuple[float, float]]] = [[] for _ in range(64)]  # per block: (data_us, done_us)
        hot = list(range(cfg.hot_blocks))
        self._pools = (hot, list(range(cfg.hot_blocks, cfg.blocks)))
        self._issue_ioctl()  # the guest driver posts its first IOCTL at start
        if trace is not None:
            env.process(self._replay(trace))
        elif cfg.pf_call_rate_per_ms > 0:
            env.process(self._pf_calls())

    # ------------------------------------------------------------ PF side
    def _pf_calls(self):
        env, cfg, stream = self.env, self.cfg, self.streams["pf"]
        gap_mean = 1000.0 / cfg.pf_call_rate_per_ms
        while True:
            yield env.timeout(stream.exp(gap_mean))
            for k in range(cfg.pf_burst_calls):
                if k:
                    yield env.timeout(cfg.pf_burst_gap_us)
                self.pf_call(self._draw_mask(stream))

    def _draw_mask(self, stream) -> int:
        """blocks_per_call distinct blocks, each hot with probability hot_fraction."""
        hot, cold = self._pools
        mask, n = 0, 0
        while n < self.cfg.blocks_per_call:
            free_hot = [b for b in hot if not mask >> b & 1]
            free_cold = [b for b in cold if not mask >> b & 1]
            u = stream.uniform()
            pool = free_hot if (free_hot and (u < self.cfg.hot_fraction or not free_cold)) else free_cold
            mask |= 1 << pool[min(int(stream.uniform() * len(pool)), len(pool) - 1)]
            n += 1
        return mask

    def _replay(self, trace):
        env = self.env
        for time_us, mask in trace:
            if time_us > env.now:
                yield env.timeout(time_us - env.now)
            self.pf_call(mask)

    def pf_call(self, mask: int) -> None:
        """NdisMInvalidateConfigBlock: the stack ORs the mask into its cache."""
        call = PfCall(len(self.calls), self.env.now, mask)
        self.calls.append(call)
        self.cache |= mask
        self.cache_calls.append(call)
        self._maybe_send()

    # ------------------------------------------------------------ stack
    def _maybe_send(self) -> None:
        if not (self.ioctl_at_host and self.cache):
            return
        now = self.env.now
        n = Notification(len(self.notifications), self.cache, self.cache_calls, now)
        if self.check:
            since = self.calls[self.unsent_from:]
            expected = 0
            for c in since:
                expected |= c.mask
            if n.mask != expected or [c.index for c in n.calls] != [c.index for c in since]:
                raise VfInvariantError(f"VF {self.index}: notification {n.seq} carries {n.mask:#x} for calls "
                                       f"{[c.index for c in n.calls]}, but the PF calls since the previous "
                                       f"send OR to {expected:#x} ({[c.index for c in since]})")
        self.unsent_from = len(self.calls)
        for c in n.calls:
            c.notification = n.seq
            c.sent_us = now
        self.notifications.append(n)
        self.inflight.append(n)
        self.cache, self.cache_calls = 0, []
        self.ioctl_at_host = False
        self.env.process(self._deliver(n))

    def _issue_ioctl(self) -> None:
        self.ioctls_outstanding += 1
        if self.check and self.ioctls_outstanding > 1:
            raise VfInvariantError(f"VF {self.index}: {self.ioctls_outstanding} IOCTL_VPCI_INVALIDATE_BLOCK "
                                   f"outstanding at {self.env.now} us (at most one)")
        self.env.timeout(self.cfg.vmbus_message_us).callbacks.append(self._ioctl_at_host)

    def _ioctl_at_host(self, _event) -> None:
        self.ioctl_at_host = True
        self._maybe_send()

    # ------------------------------------------------------------ guest
    def _deliver(self, n: Notification):
        env, cfg, vp = self.env, self.cfg, self.vp
        yield env.timeout(cfg.vmbus_message_us)
        yield vp.post_work(cfg.ioctl_complete_us, True)  # VMBus interrupt: VPCI completes the IOCTL
        self.ioctls_outstanding -= 1
        if self.check and n.seq != self.delivered:
            raise VfInvariantError(f"VF {self.index}: notification {n.seq} delivered after {self.delivered - 1} "
                                   f"(out of order)")
        self.delivered += 1
        now = env.now
        for c in n.calls:
            c.delivered_us = now
        if cfg.drop_probability > 0 and self.streams["fault"].uniform() < cfg.drop_probability:
            n.dropped = True  # fault injection: the notification never reaches NDIS's worker
            self.inflight.remove(n)
            for c in n.calls:
                c.dropped = True
        yield vp.post_work(cfg.passive_hop_us, False)  # NDIS's PASSIVE_LEVEL worker
        if not n.dropped:
            env.process(self._oid(n))  # OID_SRIOV_VF_INVALIDATE_CONFIG_BLOCK, queued at the miniport
            backlog = len(self.miniport.users) + len(self.miniport.queue) + 1
            self.oid_backlog_max = max(self.oid_backlog_max, backlog)
        yield vp.post_work(cfg.ioctl_issue_us, False)  # and at once the next IOCTL
        self._issue_ioctl()

    def _oid(self, n: Notification):
        env, cfg, vp = self.env, self.cfg, self.vp
        with self.miniport.request() as req:
            yield req
            yield vp.post_work(cfg.oid_dispatch_us, False)
            for b in set_bits(n.mask):
                yield env.timeout(cfg.vmbus_message_us)
                taken_us = yield env.process(self.pf.read_block())
                yield env.timeout(cfg.vmbus_message_us)
                yield vp.post_work(cfg.block_read_guest_us, True)  # the host's reply wakes the thread
                self.reads[b].append((taken_us, env.now))
                n.remaining &= ~(1 << b)
            self.inflight.remove(n)
            if n.mask & cfg.flush_blocks:  # the VF driver remaps: a TLB flush of its address space
                vp.requests.append(Request(env.now, vp.address_space, cfg.flush_pages or None, "vf"))
                vp.kick()

    # ------------------------------------------------------------ results
    def read_done_us(self, call: PfCall) -> tuple[float, int]:
        """(when the VF had read every block of ``call`` with data taken after
        it, or nan; the mask of blocks it has not)."""
        done, missing = call.time_us, 0
        for b in set_bits(call.mask):
            reads = self.reads[b]
            i = bisect.bisect_left(reads, (call.time_us, -math.inf))
            if i == len(reads):
                missing |= 1 << b
            else:
                done = max(done, reads[i][1])
        return (math.nan if missing else done), missing

    def on_the_way(self) -> int:
        """Blocks still travelling: in the stack's cache or a notification not yet read."""
        mask = self.cache
        for n in self.inflight:
            mask |= n.remaining
        return mask

    def rows(self) -> list[tuple]:
        """One row per PF call (VF_COLUMNS); status: read / pending / lost."""
        travelling = self.on_the_way()
        coalesced = {n.seq: len(n.calls) for n in self.notifications}
        out = []
        for c in self.calls:
            done, missing = self.read_done_us(c)
            status = "read" if not missing else ("pending" if missing & ~travelling == 0 else "lost")
            out.append((self.index, c.index, c.mask, c.time_us, c.notification, c.sent_us, c.delivered_us, done,
                        done - c.time_us, coalesced.get(c.notification, 0), c.dropped, status))
        return out

    def check_end(self) -> None:
        travelling = self.on_the_way()
        for c in self.calls:
            _, missing = self.read_done_us(c)
            lost = missing & ~travelling
            if lost:
                how = (f"its notification {c.notification} was dropped by the guest" if c.dropped
                       else "it is in no cache, notification or read")
                raise VfInvariantError(f"VF {self.index}: PF call {c.index} at {c.time_us:.3f} us set blocks "
                                       f"{lost:#x} that the VF never read afterwards; {how} (bit lost)")
