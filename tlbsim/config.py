"""Typed, validated configuration.

Every cost is a named parameter in microseconds whose default traces to a row
of docs/calibration.md (the ``# src:`` comments and
experiments/configs/default.toml say which); defaults marked *estimate* are
reasoned, not measured.

Validation happens here, at the edge: the model receives a ``Config`` it can
trust. Every error names the dotted key that is wrong.
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import functools
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tlbsim import hv

POLICIES = ("ipi", "mask", "all", "linux", "kvm-pv")
SHARING = ("all", "groups", "private")
SEMANTICS = ("tlfs", "kvm", "openhcl")
#: keys that existed once and were removed, with what to do instead
REMOVED_KEYS = {
    "costs.flush_all_broadcast_us": "ALL_PROCESSORS now costs what the mask path costs per running target "
    "(hv_ipi_send_us), with no mask walk; hardware broadcast is host.broadcast_flush (docs/model.md)",
    "costs.flush_all_per_running_target_us": "ALL_PROCESSORS targets now cost hv_ipi_send_us like "
    "mask targets: each target LP is interrupted and acknowledges either way (docs/model.md)",
    "costs.flush_per_running_target_us": "a hypervisor flush now sends its IPIs back to back "
    "(costs.hv_ipi_send_us per running target) and waits once for the slowest acknowledgement "
    "(costs.hv_ipi_roundtrip_us + the target's exit and flush work); docs/model.md \"Hypervisor fan-out\"",
    "tlb.retained_fraction": "what a VP keeps of its TLB now depends on how long others ran on its LP while it "
    "was away: exp(-foreign time / tlb.retention_tau_us); docs/model.md \"TLB contents across descheduling\"",
}
#: Upper bounds on counts and sizes, so no input can make a run take forever or exhaust memory.
MAX_COUNT = 1 << 20


class ConfigError(ValueError):
    """A configuration problem, always naming the key it is about."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


#: the largest input file read (a config, a spec, a trace: about 8 million trace rows)
MAX_INPUT_BYTES = 256 << 20


def read_text(path: str | Path, what: str, key: str = "") -> str:
    """A user-supplied text file, or a ConfigError naming it (missing,
    unreadable, not UTF-8 text, larger than MAX_INPUT_BYTES, or not a regular
    file: a device such as /dev/zero would be read until memory runs out, a
    FIFO would block; neither is waited for)."""
    import stat

    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; a regular file reads as usual
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise ConfigError(key, f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(key, f"{what} {path} is a directory, not a file") from None
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise ConfigError(key, f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(key, f"{what} {path} is a directory, not a file")
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a character device" if stat.S_ISCHR(mode)
                    else "a block device" if stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode)
                    else "not a regular file")
            raise ConfigError(key, f"{what} {path} is {kind}, not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_INPUT_BYTES + 1)
        if len(data) > MAX_INPUT_BYTES:
            raise ConfigError(key, f"{what} {path} is larger than {MAX_INPUT_BYTES >> 20:,} MiB")
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as open()
    except OSError as e:
        raise ConfigError(key, f"cannot read {what} {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{what} {path} is not UTF-8 text") from None
    finally:
        os.close(fd)


def read_toml(path: str | Path, what: str, key: str = "") -> dict[str, Any]:
    text = read_text(path, what, key)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark (Windows editors) is not part of the TOML
        text = text[1:]
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(key, f"{what} {path} is not valid TOML: {e}") from None
    except RecursionError:
        raise ConfigError(key, f"{what} {path} nests arrays or tables too deeply") from None
    if not isinstance(data, dict):  # pragma: no cover - tomllib always returns a table
        raise ConfigError(key, f"{what} {path} is not a TOML table")
    return data


_BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("tlbsim_config_building", default=False)


class _Section:
    """A configuration section checks itself when it is built directly (``PartitionConfig(vps=16.5)`` is
    a ConfigError at once, not a TypeError deep in a run): every field's type as a TOML value's would be
    (an int where a float goes becomes a float), then the section's own ``check``. Sections built from a
    table (Config.from_dict, with_overrides) are coerced by _build and checked by Config with their keys."""

    def __post_init__(self) -> None:
        if _BUILDING.get() or "SECTION_KEYS" not in globals():  # (the defaults, made as this module loads)
            return
        key = SECTION_KEYS.get(type(self), type(self).__name__)
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            coerced = _coerce(value, hints[f.name], f"{key}.{f.name}")
            if coerced is not value:
                object.__setattr__(self, f.name, coerced)
        self.check(key)


@dataclass(frozen=True)
class PartitionConfig(_Section):
    vps: int = 16  # virtual processors; > 64 means the Ex calls
    lps: int = 16  # host logical processors, shared with any co-tenants ([host]); fewer than VPs is overcommit
    # hypervisor profile (model/profiles.py): "tlfs" (Hyper-V), "kvm" (KVM emulating the Hyper-V
    # calls), "openhcl" (Hyper-V with the OpenHCL paravisor's TLB-lock waits)
    semantics: str = "tlfs"
    # where the partition runs under OpenHCL: "profile" (openhcl: "snp"; others: "none"), "snp" (AMD SEV-SNP: the
    # paravisor in VTL2 handles the flush hypercall with INVLPGB + TLBSYNC, openvmm processor/snp), "tdx" (Intel
    # TDX: it queues the flush per target and kicks the running targets into VTL2, processor/tdx/tlb_flush.rs)
    isolation: str = "profile"
    # where the local APIC is emulated: "hypervisor" (Hyper-V's and KVM's in-kernel APIC: an ICR write, an IPI's
    # delivery and its EOI are the hypervisor's business, no exit to the virtualization stack) or "user" (a
    # user-mode APIC in the stack: each ICR write is an X64MsrAccess exit, each delivery a Canceled exit)
    apic_emulation: str = "hypervisor"
    slice_us: float = 10_000.0  # src: calibration "host scheduler slice", Hyper-V 10 ms
    duration_us: float = 100_000.0  # simulated time per run

    def check(self, key: str) -> None:
        _positive(self.vps, f"{key}.vps")
        _positive(self.lps, f"{key}.lps")
        if self.vps > hv.MAX_VP_INDEX + 1:
            raise ConfigError(f"{key}.vps", f"at most {hv.MAX_VP_INDEX + 1} VPs (64 banks x 64)")
        if self.lps > MAX_COUNT:
            raise ConfigError(f"{key}.lps", f"at most {MAX_COUNT:,} LPs")
        _one_of(self.semantics, SEMANTICS, f"{key}.semantics")
        _one_of(self.isolation, ("profile", "none", "snp", "tdx"), f"{key}.isolation")
        if self.isolation in ("snp", "tdx") and self.semantics != "openhcl":
            raise ConfigError(f"{key}.isolation", f"\"{self.isolation}\" is a confidential VM under the OpenHCL "
                              "paravisor: set partition.semantics = \"openhcl\"")
        if self.isolation == "none" and self.semantics == "openhcl":
            raise ConfigError(f"{key}.isolation", "the openhcl profile models a hardware-isolated VM (its TLB-lock "
                              "wait is hardware_cvm's): \"snp\" or \"tdx\"; a VBS partition is the tlfs profile")
        _one_of(self.apic_emulation, ("hypervisor", "user"), f"{key}.apic_emulation")
        _positive(self.slice_us, f"{key}.slice_us")
        if self.slice_us < 10.0:
            raise ConfigError(f"{key}.slice_us", "at least 10 us (host schedulers slice in milliseconds)")
        _positive(self.duration_us, f"{key}.duration_us")
        if self.duration_us > 1e10:
            raise ConfigError(f"{key}.duration_us", "at most 1e10 us (about 3 simulated hours)")


#: The range a [costs] key may take, us: what a hypervisor could take for it, generously (every key's
#: default, source and plausible range are in docs/calibration.md, which also states these bounds). An
#: operation: at most 1 ms, a tenth of Hyper-V's 10 ms scheduler slice and 200 times the largest figure
#: published for any of them (5 us); a step repeated per item (a VP, a bank, a range, a page, a TLB entry):
#: at most 10 us, 40 times the largest plausible one; the continuation limit: at most 10 ms (0: none).
COST_OPERATION_MAX_US, COST_STEP_MAX_US, CONTINUATION_MAX_US = 1000.0, 10.0, 10_000.0
COST_STEPS = ("mask_per_vp_us", "vp_set_per_bank_us", "list_per_range_us", "invlpg_us", "refill_us")
COST_OPERATIONS = ("vmexit_roundtrip_us", "hypercall_decode_us", "hv_ipi_send_us", "hv_ipi_roundtrip_us",
                   "hv_context_flush_us", "vtl2_roundtrip_us", "broadcast_issue_us", "broadcast_sync_us",
                   "target_interrupt_us", "deferred_flush_us", "local_flush_us", "full_flush_us", "vipi_send_us",
                   "pv_ipi_per_target_us", "halt_wake_us", "lock_release_wake_us", "sched_yield_hypercall_us")
COST_LIMITS_US = {**{k: COST_OPERATION_MAX_US for k in COST_OPERATIONS}, **{k: COST_STEP_MAX_US for k in COST_STEPS},
                  "continuation_limit_us": CONTINUATION_MAX_US}
COST_LIMIT_REASONS = {**{k: "a hypervisor operation: at most a tenth of a 10 ms scheduler slice"
                         for k in COST_OPERATIONS},
                      **{k: "a step repeated per item: at most 40 times the largest plausible one" for k in COST_STEPS},
                      "continuation_limit_us": "a rep call returns to its caller within 10 ms; 0: never early"}


@dataclass(frozen=True)
class CostConfig(_Section):
    """Costs of the flush paths, microseconds."""

    vmexit_roundtrip_us: float = 0.6  # src: calibration "VM exit + entry round trip"
    hypercall_decode_us: float = 0.1  # estimate: decode + validate the input block
    # Hypervisor fan-out (docs/model.md "Hypervisor fan-out"): the IPIs go out back to back, one
    # hv_ipi_send_us each, and the caller waits once for the slowest acknowledgement: hv_ipi_roundtrip_us
    # + the target's interruption (target_interrupt_us) + its flush work (invlpg_us per page, or
    # hv_context_flush_us for a whole space). A ProcessorMask and HV_FLUSH_ALL_PROCESSORS alike.
    # src: Amit 2019 (calibration): bare-metal MADV_DONTNEED + touch, 1,436 ns at 2 threads, 1,571 at 4:
    # (1,571 - 1,436) / 2 = 67.5 ns per further target
    hv_ipi_send_us: float = 0.07
    # src: Amit 2019: one remote target adds 1,436 - 661 = 775 ns (IPI, its handler, the ack); less the
    # handler's flush (local_flush_us 0.28): the split is an estimate
    hv_ipi_roundtrip_us: float = 0.5
    hv_context_flush_us: float = 0.4  # estimate: INVVPID single-context on a target (order of full_flush_us)
    # OpenHCL on SNP / TDX: a flush hypercall exits to the paravisor in VTL2 user mode and back; a TDX target
    # kicked by it does too. estimate: no public figure (openvmm issue 1145 calls the path "significantly slower")
    vtl2_roundtrip_us: float = 5.0
    # Hardware broadcast invalidation (host.broadcast_flush): one INVLPGB (or RAR payload) per range, then
    # one wait. src: Linux commit 4afeb0ed1753 (will-it-scale tlb_flush2_threads, 72-CPU Milan): 4 threads
    # 4 / 1,032k = 3.88 us a loop against 1 / 304k = 3.29 us alone: 0.59 us for a broadcast flush of one
    # page (issue + TLBSYNC); the split between the two is an estimate
    broadcast_issue_us: float = 0.05
    broadcast_sync_us: float = 0.54
    mask_per_vp_us: float = 0.02  # estimate: walking one set bit of a ProcessorMask / VP set
    vp_set_per_bank_us: float = 0.05  # estimate: reading one HV_VP_SET bank word
    list_per_range_us: float = 0.05  # estimate: one GVA range entry
    continuation_limit_us: float = 50.0  # src: calibration "hypercall continuation limit" (TLFS)
    target_interrupt_us: float = 0.6  # src: calibration VM exit round trip: a running target's LP is interrupted
    # estimate: the hypervisor's flush of a target that was not on an LP, before its next VM entry (an
    # INVVPID; the local flush path's order of size, calibration "local single-page flush path")
    deferred_flush_us: float = 0.28
    invlpg_us: float = 0.08  # src: calibration "INVLPG, one page"
    local_flush_us: float = 0.28  # src: calibration "local single-page flush path"
    full_flush_us: float = 0.4  # estimate: CR3 reload path (local path + a CR3 write)
    flush_ceiling_pages: int = 33  # src: calibration, Linux tlb_single_page_flush_ceiling
    vipi_send_us: float = 2.5  # src: calibration "virtual IPI with trapped ICR, per target"
    posted_interrupts: bool = False  # src: calibration IPIv: -20 % on virtual IPIs when on
    posted_interrupt_discount: float = 0.20  # src: calibration "posted interrupts / IPIv discount"
    pv_ipi_per_target_us: float = 1.0  # src: calibration "KVM PV IPI hypercall, ~1 us per target"
    halt_wake_us: float = 2.5  # estimate: waking a halted VP (same order as a unicast virtual IPI)
    # estimate: OpenHCL's last TLB-lock holder wakes the halted caller (wake_vtl2: a cross-VP wake, the
    # order of a unicast virtual IPI)
    lock_release_wake_us: float = 2.5
    # estimate: KVM_HC_SCHED_YIELD beyond its exit round trip (kvm_sched_yield: find the target, yield_to)
    sched_yield_hypercall_us: float = 1.0
    refill_us: float = 0.036  # src: calibration "refill cost, nested" (90 cycles, estimate)

    def check(self, key: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, bool):
                _finite_non_negative(value, f"{key}.{f.name}")
            if f.name in COST_LIMITS_US and value > COST_LIMITS_US[f.name]:
                raise ConfigError(f"{key}.{f.name}", f"must be in 0-{COST_LIMITS_US[f.name]:,g} us, got {value!r} "
                                  f"({COST_LIMIT_REASONS[f.name]}; docs/calibration.md)")
        if self.flush_ceiling_pages > hv.GVA_RANGE_MAX_PAGES * 4096:
            raise ConfigError(f"{key}.flush_ceiling_pages", f"at most {hv.GVA_RANGE_MAX_PAGES * 4096:,} pages")
        if not 0 <= self.posted_interrupt_discount < 1:
            raise ConfigError(f"{key}.posted_interrupt_discount", "must be in [0, 1)")

    def vipi_us(self) -> float:
        """A virtual IPI's cost to its sender, per target (the IPIv discount with posted interrupts)."""
        return self.vipi_us_posted() if self.posted_interrupts else self.vipi_send_us

    def vipi_us_posted(self) -> float:
        return self.vipi_send_us * (1.0 - self.posted_interrupt_discount)

    def local_flush_cost_us(self, pages: int | None) -> float:
        """A guest's own flush: INVLPG per page up to the ceiling, else a full flush."""
        if pages is None or pages > self.flush_ceiling_pages:
            return self.full_flush_us
        return self.local_flush_us + (pages - 1) * self.invlpg_us


@dataclass(frozen=True)
class TlbConfig(_Section):
    capacity: int = 1536  # entries; src: calibration "second-level TLB entries" (Skylake STLB)
    working_set_pages: int = 1024  # non-global pages a VP touches in its address space (estimate)
    global_pages: int = 256  # global (PTE.G, kernel) pages a VP touches (estimate)
    # entries filled per us of guest execution (estimate: a 1024-page working set refills in ~50 us)
    fill_rate_per_us: float = 20.0
    start_warm: bool = True  # TLBs start full to their working set (no warm-up transient)
    hypervisor_flush: str = "vpid"  # "vpid": an address-space flush by the hypervisor drops every
    # non-global entry of the VP (INVVPID single-context); "exact": only the named address space
    # What a VP keeps of its TLB when it runs again: VPID-tagged entries survive a switch but the other
    # working sets that ran on its LP meanwhile evict them. A VP back on the LP it left keeps
    # exp(-t / retention_tau_us) of its entries, t the time others ran on that LP meanwhile; a VP on another
    # LP keeps none. 0: tau = capacity / fill_rate_per_us (the time another working set takes to refill the
    # whole STLB: 77 us by default; estimate). inf: nothing is evicted.
    retention_tau_us: float = 0.0

    def check(self, key: str) -> None:
        _positive(self.capacity, f"{key}.capacity")
        for name in ("capacity", "working_set_pages", "global_pages"):
            _non_negative(getattr(self, name), f"{key}.{name}")
            if getattr(self, name) > MAX_COUNT:
                raise ConfigError(f"{key}.{name}", f"at most {MAX_COUNT:,} entries")
        _finite_non_negative(self.fill_rate_per_us, f"{key}.fill_rate_per_us")
        if not (self.retention_tau_us >= 0):  # inf allowed: nothing is evicted
            raise ConfigError(f"{key}.retention_tau_us", "must be >= 0 (0: capacity / fill_rate_per_us; inf: no "
                              "eviction)")
        _one_of(self.hypervisor_flush, ("vpid", "exact"), f"{key}.hypervisor_flush")


@dataclass(frozen=True)
class ExitSpec(_Section):
    rate_per_ms: float = 0.0  # exits per ms of guest execution
    cost_us: float = 1.0  # time the virtualization stack takes to handle one

    def check(self, key: str) -> None:
        _finite_non_negative(self.rate_per_ms, f"{key}.rate_per_ms")
        _finite_non_negative(self.cost_us, f"{key}.cost_us")
        if self.rate_per_ms > MAX_RATE_PER_MS:
            raise ConfigError(f"{key}.rate_per_ms", f"at most {MAX_RATE_PER_MS:,} per ms")


@dataclass(frozen=True)
class ExitsConfig(_Section):
    """Exit rates per ms of guest time and handling costs; all *estimates*
    (no public source gives a WHP exit mix), except that every handling cost
    is at least the 0.6 us round trip of calibration.md."""

    memory_access: ExitSpec = ExitSpec(0.5, 8.0)  # MMIO emulated in the stack; sets TlbFlushInhibit
    x64_io_port_access: ExitSpec = ExitSpec(0.5, 4.0)
    x64_halt: ExitSpec = ExitSpec(0.2, 1.0)  # then idle: halt_idle_mean_us
    # MSR accesses the stack handles; with partition.apic_emulation = "user" each x2APIC EOI write is one of
    # these too (an ICR write costs costs.vipi_send_us, calibrated on its own)
    x64_msr_access: ExitSpec = ExitSpec(1.0, 1.5)
    x64_cpuid: ExitSpec = ExitSpec(0.1, 1.0)
    x64_interrupt_window: ExitSpec = ExitSpec(0.2, 1.0)
    x64_apic_eoi: ExitSpec = ExitSpec(0.5, 1.0)
    canceled: ExitSpec = ExitSpec(0.0, 1.0)  # the host kicking a running VP (interrupt delivery)
    halt_idle_mean_us: float = 200.0  # mean idle time after HLT unless woken earlier (exponential)

    def check(self, key: str) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ExitSpec):
                value.check(f"{key}.{f.name}")
        _finite_non_negative(self.halt_idle_mean_us, f"{key}.halt_idle_mean_us")
        if self.canceled.rate_per_ms:
            raise ConfigError(f"{key}.canceled.rate_per_ms", "Canceled exits are not drawn at a rate: they come from "
                              "the model's own kicks (IPIs with a user-mode APIC, VF work); set only cost_us")

    def specs(self) -> dict[str, ExitSpec]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.type in ("ExitSpec", ExitSpec)}


@dataclass(frozen=True)
class LocksConfig(_Section):
    # VTL1 entries per ms of the VP's guest time (0: VSM off). While in VTL1 the VP runs no VTL0 code,
    # takes no VTL0 interrupts and holds VSM TlbLocked (its time is the vtl1 column).
    vsm_rate_per_ms: float = 0.0
    vsm_hold_mean_us: float = 20.0  # mean time in VTL1 (TlbLocked set), us. parameter (no public source)
    vsm_hold_distribution: str = "exponential"  # "exponential" or "fixed"
    vsm_vps: list[int] = field(default_factory=list)  # VPs with a VTL1 (empty: all)
    memory_access_inhibit: bool = True  # TlbFlushInhibit while a MemoryAccess exit is emulated
    # How a caller waits for a locked TLB: "profile" (the hypervisor profile's), "reissue" (TLFS: suspend,
    # then reissue the whole call; may starve) or "snapshot" (OpenHCL: wait only for the VPs that held the
    # lock when the call was made; the last releasing holder wakes the waiter)
    wait: str = "profile"
    # A lock due to lift within this many us is waited for spinning on the LP instead of giving it up.
    # 0: always give up the LP. parameter (no public source)
    wait_spin_us: float = 0.0

    def check(self, key: str) -> None:
        _finite_non_negative(self.vsm_rate_per_ms, f"{key}.vsm_rate_per_ms")
        if self.vsm_rate_per_ms > MAX_RATE_PER_MS:
            raise ConfigError(f"{key}.vsm_rate_per_ms", f"at most {MAX_RATE_PER_MS:,} per ms")
        _finite_non_negative(self.vsm_hold_mean_us, f"{key}.vsm_hold_mean_us")
        _one_of(self.vsm_hold_distribution, ("exponential", "fixed"), f"{key}.vsm_hold_distribution")
        _one_of(self.wait, ("profile", "reissue", "snapshot"), f"{key}.wait")
        _finite_non_negative(self.wait_spin_us, f"{key}.wait_spin_us")


@dataclass(frozen=True)
class WorkloadConfig(_Section):
    policy: str = "mask"  # one of POLICIES
    # "open": arrivals per VP at rate_per_ms whatever the VP is doing, queued until it can serve them
    # (every policy sees the same offered load); "closed": each VP does closed_work_us of useful guest
    # work, then a shootdown, then again (throughput: ops_per_s in the summary)
    mode: str = "open"
    rate_per_ms: float = 0.5  # open: shootdowns arriving per VP per ms (Poisson)
    closed_work_us: float = 0.0  # closed: useful guest work between a VP's shootdowns, us (0: 1000 / rate_per_ms)
    closed_work_distribution: str = "exponential"  # closed: "exponential" or "fixed"
    burst_size: int = 1  # shootdowns per arrival (back to back)
    pages: int = 1  # pages per shootdown
    full_flush_fraction: float = 0.0  # fraction of shootdowns that flush the whole address space
    sharing: str = "all"  # which VPs run the same address space: all / groups / private
    group_size: int = 4  # VPs per address space with sharing = "groups"
    initiators: list[int] = field(default_factory=list)  # VPs that initiate (empty: all)
    processor_mask: int = 0  # explicit ProcessorMask for the mask policy (0: derive from sharing)
    trace: str = ""  # CSV of time_us,vp,address_space,pages (replaces the Poisson arrivals)
    # guest threads running the workload, one per VP from VP 0 (0: one on every VP). A VP with no thread
    # is idle: it halts until an interrupt, never runs the address space, so it is in no active set
    # (Windows: processors that ran the process; Linux: mm_cpumask) and is no shootdown's target
    threads: int = 0
    # closed loop: mean sleep (exponential) of a thread after each operation, us (the benchmarks'
    # nanosleep); its VP halts meanwhile unless interrupted. 0: no sleep
    sleep_us: float = 0.0

    def check(self, key: str) -> None:
        _one_of(self.policy, POLICIES, f"{key}.policy")
        _one_of(self.mode, ("open", "closed"), f"{key}.mode")
        _finite_non_negative(self.rate_per_ms, f"{key}.rate_per_ms")
        if self.rate_per_ms > MAX_RATE_PER_MS:
            raise ConfigError(f"{key}.rate_per_ms", f"at most {MAX_RATE_PER_MS:,} per ms")
        _finite_non_negative(self.closed_work_us, f"{key}.closed_work_us")
        _non_negative(self.threads, f"{key}.threads")
        _finite_non_negative(self.sleep_us, f"{key}.sleep_us")
        _one_of(self.closed_work_distribution, ("exponential", "fixed"), f"{key}.closed_work_distribution")
        if self.mode == "closed" and self.closed_work_us == 0 and self.rate_per_ms == 0:
            raise ConfigError(f"{key}.closed_work_us", "closed loop needs closed_work_us > 0 or rate_per_ms > 0")
        _positive(self.burst_size, f"{key}.burst_size")
        if self.burst_size > 4096:
            raise ConfigError(f"{key}.burst_size", "at most 4,096 shootdowns per arrival")
        _positive(self.pages, f"{key}.pages")
        if self.pages > hv.GVA_RANGE_MAX_PAGES * 4096:
            raise ConfigError(f"{key}.pages", f"at most {hv.GVA_RANGE_MAX_PAGES * 4096:,} pages")
        if self.group_size > MAX_COUNT:
            raise ConfigError(f"{key}.group_size", f"at most {MAX_COUNT:,}")
        if not 0 <= self.full_flush_fraction <= 1:
            raise ConfigError(f"{key}.full_flush_fraction", "must be in [0, 1]")
        _one_of(self.sharing, SHARING, f"{key}.sharing")
        _positive(self.group_size, f"{key}.group_size")
        if not 0 <= self.processor_mask <= hv.U64_MAX:
            raise ConfigError(f"{key}.processor_mask", "must be a 64-bit ProcessorMask")


@dataclass(frozen=True)
class GuestConfig(_Section):
    """What the guest OS does around a shootdown (policies are in [workload])."""

    # Hypercall form of mask / all: "list" (HvCallFlushVirtualAddressList for ranges up to
    # costs.flush_ceiling_pages, the Space call above, as Windows and Linux do) or "space" (always the
    # Space call: the model before issue 12, kept for comparison)
    call_form: str = "list"
    # Skip VPs in lazy-TLB mode (halted: idle) for IPIs and in the ProcessorMask; they flush when they next
    # run. "auto": on for the Linux policies (ipi, linux, kvm-pv: arch/x86/mm/tlb.c should_flush_tlb,
    # hyperv_flush_tlb_multi), off for mask / all (no public source for Windows); "on"; "off"
    lazy_tlb: str = "auto"
    # Linux's PV sched yield (5.3+): after sending IPIs, a directed yield to a preempted target
    # (KVM_HC_SCHED_YIELD). "auto": on for ipi / kvm-pv under the kvm profile; "on"; "off"
    pv_sched_yield: str = "auto"
    # share of guest code run in kernel mode: decides whether a VP preempted in guest code was in kernel
    # mode (KVM's directed yield skips user-mode candidates for a kernel-mode spinner) and the kernel
    # share of guest work in guest_system_us. src: the hv_tlbflush cover letter's hypercall run, sys
    # 40.6 s of 12 pCPUs x 24.4 s = 0.14 (one workload's figure: an estimate for any other)
    kernel_fraction: float = 0.14

    def check(self, key: str) -> None:
        _fraction(self.kernel_fraction, f"{key}.kernel_fraction")
        _one_of(self.call_form, ("list", "space"), f"{key}.call_form")
        _one_of(self.lazy_tlb, ("auto", "on", "off"), f"{key}.lazy_tlb")
        _one_of(self.pv_sched_yield, ("auto", "on", "off"), f"{key}.pv_sched_yield")


@dataclass(frozen=True)
class SpinConfig(_Section):
    """A VP spinning for IPI acks gives up its LP to a preempted VP of its partition (directed yield)."""

    # "profile" (kvm: pause-loop exiting; tlfs / openhcl: the long spin wait notification), "ple",
    # "notify" or "off" (spin until acked or preempted: the model before issue 12)
    mode: str = "profile"
    # src: arch/x86/kvm/x86.h KVM_VMX_DEFAULT_PLE_WINDOW 4096 cycles at 2.5 GHz
    ple_window_us: float = 1.64
    ple_window_grow: float = 2.0  # src: KVM_DEFAULT_PLE_WINDOW_GROW (the window doubles on each exit)
    ple_window_max_us: float = 1.0e6  # src: KVM_VMX_DEFAULT_PLE_WINDOW_MAX = UINT_MAX cycles (~1.7 s; capped)
    # src: TLFS CPUID 0x40000004 EBX, recommended spin retries before HvCallNotifyLongSpinWait (0xFFF)
    notify_retries: int = 4095
    spin_iteration_us: float = 0.016  # one spin-loop iteration with PAUSE, us. estimate (~40 cycles)
    # handling one pause-loop exit or notification beyond the exit round trip (scan for a candidate), us.
    # estimate
    yield_cost_us: float = 1.0
    # prefer the preempted VP the spinner sent an IPI to (KVM series 2025-26); off in mainline KVM
    ipi_aware: bool = False
    # who kvm_vcpu_on_spin may yield to: "ready" (runnable VPs, preempted or woken and waiting: vcpu->ready,
    # commit d73eb57b "KVM: Boost vCPUs that are delivering interrupts", Linux 5.3) or "preempted" (only
    # VPs descheduled while runnable: the rule before 5.3)
    candidates: str = "ready"

    def check(self, key: str) -> None:
        _one_of(self.candidates, ("ready", "preempted"), f"{key}.candidates")
        _one_of(self.mode, ("profile", "ple", "notify", "off"), f"{key}.mode")
        _positive(self.ple_window_us, f"{key}.ple_window_us")
        if not 1.0 <= self.ple_window_grow <= 1024:
            raise ConfigError(f"{key}.ple_window_grow", "must be in [1, 1024]")
        _positive(self.ple_window_max_us, f"{key}.ple_window_max_us")
        _positive(self.notify_retries, f"{key}.notify_retries")
        if self.notify_retries > 0xFFFFFFFF:
            raise ConfigError(f"{key}.notify_retries", "must fit CPUID 0x40000004 EBX (32 bits)")
        _positive(self.spin_iteration_us, f"{key}.spin_iteration_us")
        _finite_non_negative(self.yield_cost_us, f"{key}.yield_cost_us")


@dataclass(frozen=True)
class HostConfig(_Section):
    """Other partitions on the same LPs (co-tenants), under the same host scheduler."""

    cotenants: int = 0  # co-tenant partitions
    cotenant_vps: int = 16  # VPs per co-tenant partition
    # "cpu": always runnable (CPU-bound); "duty": runnable for cotenant_duty of the time, in busy and
    # idle periods (exponential, mean busy + idle = cotenant_period_us)
    cotenant_load: str = "cpu"
    cotenant_duty: float = 0.5
    cotenant_period_us: float = 10_000.0  # estimate
    # guest partitions on the host, each with the [partition] ... [vf] configuration (its own VPs, workload,
    # address spaces, VFs and random streams; traces are replayed in each): N identical guests are one key.
    # --trace / --timeline draw guest 0
    guests: int = 1
    # the policy of guests 1 .. guests - 1, in order (empty: every guest runs workload.policy)
    guest_policies: list[str] = field(default_factory=list)
    # the host scheduler: "profile" (kvm: "eevdf"; tlfs / openhcl: "hyperv"), "eevdf" (Linux 6.6+'s fair
    # class: lag, eligibility, virtual deadlines), "cfs" (Linux's fair class up to 6.5: min_vruntime, sleeper
    # placement, wakeup preemption, sched_slice) or "hyperv" (a fair queue with the fixed partition.slice_us,
    # no wakeup preemption); docs/model.md "Host scheduling"
    scheduler: str = "profile"
    # the run queues: "per_lp" (a queue per LP, as Linux and Windows have them, with the kernel's wakeup
    # placement, newidle and periodic balancing, cache-hot entities kept; model/runqueues.py) or "shared"
    # (one queue for every LP: a freed LP runs the least-run waiting entity of the host, i.e. instantaneous
    # balancing; the model before 2026-12-02). They differ under overcommit: docs/model.md "Host scheduling"
    runqueues: str = "per_lp"
    # cfs tunables, us; 0: Linux's default x (1 + ilog2(min(LPs, 8))) (6 ms, 0.75 ms, 1 ms; fair.c)
    sched_latency_us: float = 0.0
    sched_min_granularity_us: float = 0.0
    sched_wakeup_granularity_us: float = 0.0
    # eevdf sysctl_sched_base_slice, us; 0: 750 x (1 + ilog2(min(LPs, 8))) (kernel/sched/fair.c, 6.6)
    sched_base_slice_us: float = 0.0
    # how the hypervisor flushes running targets (docs/model.md "Hardware broadcast invalidation"): "none"
    # (an IPI to each target's LP), "invlpgb" (AMD: INVLPGB + TLBSYNC, every LP at once, no target
    # interrupted) or "rar" (Intel Remote Action Request: a payload to the targets' LPs, handled by
    # microcode; Linux RFC 2025, unmerged). Broadcast is used when more than broadcast_min_cpus - 1 CPUs
    # run the flushed context (src: Linux 6.15 arch/x86/mm/tlb.c, mm_active_cpus_exceeds(mm, 3): 4)
    broadcast_flush: str = "none"
    broadcast_min_cpus: int = 4
    # pages one INVLPGB covers (CPUID 0x80000008 EDX[15:0] + 1; the value for Milan / Genoa is not public:
    # estimate); a RAR payload covers 63 (RAR_INVLPG_MAX_PAGES, the 2025 RFC)
    invlpgb_max_pages: int = 8

    def check(self, key: str) -> None:
        _one_of(self.broadcast_flush, ("none", "invlpgb", "rar"), f"{key}.broadcast_flush")
        _positive(self.broadcast_min_cpus, f"{key}.broadcast_min_cpus")
        _positive(self.invlpgb_max_pages, f"{key}.invlpgb_max_pages")
        if self.invlpgb_max_pages > 65536:
            raise ConfigError(f"{key}.invlpgb_max_pages", "at most 65,536 (a 16-bit CPUID field + 1)")
        _one_of(self.scheduler, ("profile", "eevdf", "cfs", "hyperv"), f"{key}.scheduler")
        _one_of(self.runqueues, ("shared", "per_lp"), f"{key}.runqueues")
        _positive(self.guests, f"{key}.guests")
        if self.guests > 64:
            raise ConfigError(f"{key}.guests", "at most 64 guest partitions")
        if self.guest_policies and len(self.guest_policies) != self.guests - 1:
            raise ConfigError(f"{key}.guest_policies", f"{len(self.guest_policies)} policies for "
                              f"{self.guests - 1} other guest(s): one per guest after the first, or none")
        for i, policy in enumerate(self.guest_policies):
            _one_of(policy, POLICIES, f"{key}.guest_policies[{i}]")
        for name in ("sched_latency_us", "sched_min_granularity_us", "sched_wakeup_granularity_us",
                     "sched_base_slice_us"):
            value = getattr(self, name)
            _finite_non_negative(value, f"{key}.{name}")
            if value and not 10.0 <= value <= 1e6:
                raise ConfigError(f"{key}.{name}", "0 (the kernel's default) or 10 us to 1 s")
        _non_negative(self.cotenants, f"{key}.cotenants")
        _positive(self.cotenant_vps, f"{key}.cotenant_vps")
        if self.cotenants * self.cotenant_vps > 65536:
            raise ConfigError(f"{key}.cotenants", "at most 65,536 co-tenant VPs in all")
        _one_of(self.cotenant_load, ("cpu", "duty"), f"{key}.cotenant_load")
        _fraction(self.cotenant_duty, f"{key}.cotenant_duty")
        _positive(self.cotenant_period_us, f"{key}.cotenant_period_us")


@dataclass(frozen=True)
class VfConfig(_Section):
    """SR-IOV VF configuration-block invalidations (the NdisMInvalidateConfigBlock chain).

    No public source gives a VMBus round trip, a block read or the guest's
    handling costs: every latency here is a *parameter* (an estimate of the
    right order, not a measurement); sweep them rather than trust them."""

    count: int = 0  # VFs in the partition (0: the VF model is off)
    service_vps: list[int] = field(default_factory=lambda: [0])  # VF i's chain runs on service_vps[i % len]
    blocks: int = 16  # configuration blocks the IHV defines (1..64; only 0..63 can be invalidated)
    hot_blocks: int = 2  # blocks 0..hot_blocks-1 change more often than the rest
    hot_fraction: float = 0.8  # probability that a changed block is a hot one
    blocks_per_call: int = 1  # distinct blocks one NdisMInvalidateConfigBlock call invalidates
    pf_call_rate_per_ms: float = 1.0  # PF calls per ms per VF (Poisson arrivals of bursts)
    pf_burst_calls: int = 1  # PF calls per arrival
    pf_burst_gap_us: float = 1.0  # spacing of the calls of one burst
    trace: str = ""  # CSV of time_us,vf,block_mask (replaces the Poisson PF calls)
    vmbus_message_us: float = 15.0  # one-way host <-> guest VMBus message. parameter (no public source)
    ioctl_complete_us: float = 2.0  # guest VP time: VPCI completes IOCTL_VPCI_INVALIDATE_BLOCK (DISPATCH_LEVEL)
    passive_hop_us: float = 5.0  # guest VP time: NDIS moves to a PASSIVE_LEVEL worker thread
    ioctl_issue_us: float = 1.0  # guest VP time: NDIS issues the next IOCTL
    oid_dispatch_us: float = 2.0  # guest VP time: OID_SRIOV_VF_INVALIDATE_CONFIG_BLOCK into the VF miniport
    block_read_guest_us: float = 2.0  # guest VP time per NdisMReadConfigBlock (issue + completion)
    pf_read_oid_us: float = 5.0  # host: the PF serves one OID_SRIOV_READ_VF_CONFIG_BLOCK
    pf_other_oid_rate_per_ms: float = 0.0  # the PF's other OIDs (Poisson), which reads queue behind
    pf_other_oid_us: float = 50.0  # how long each of those holds the PF's OID queue
    flush_blocks: int = 0  # BlockMask: blocks whose change makes the VF driver flush its address space
    flush_pages: int = 0  # pages of that flush (0: the whole address space)
    drop_probability: float = 0.0  # fault injection: the guest drops a notification at IOCTL completion

    def check(self, key: str) -> None:
        _non_negative(self.count, f"{key}.count")
        if self.count > 64:
            raise ConfigError(f"{key}.count", "at most 64 VFs per partition")
        if self.count and not self.service_vps:
            raise ConfigError(f"{key}.service_vps", "needs at least one VP to run the VF chain")
        if not 1 <= self.blocks <= 64:
            raise ConfigError(f"{key}.blocks", f"must be in 1..64 (a BlockMask has 64 bits), got {self.blocks}")
        if not 0 <= self.hot_blocks <= self.blocks:
            raise ConfigError(f"{key}.hot_blocks", f"must be in 0..blocks ({self.blocks}), got {self.hot_blocks}")
        if not 1 <= self.blocks_per_call <= self.blocks:
            raise ConfigError(f"{key}.blocks_per_call", f"must be in 1..blocks ({self.blocks})")
        for name in ("hot_fraction", "drop_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name}", "must be a probability in [0, 1]")
        _positive(self.pf_burst_calls, f"{key}.pf_burst_calls")
        for f in dataclasses.fields(self):
            if f.name.endswith(("_us", "_per_ms")):
                value = getattr(self, f.name)
                _non_negative(value, f"{key}.{f.name}")
                if math.isinf(value):
                    raise ConfigError(f"{key}.{f.name}", "must be finite")
                if f.name.endswith("_per_ms") and value > MAX_RATE_PER_MS:
                    raise ConfigError(f"{key}.{f.name}", f"at most {MAX_RATE_PER_MS:,.0f} per ms")
        if self.pf_burst_calls > 4096:
            raise ConfigError(f"{key}.pf_burst_calls", "at most 4,096 calls per burst")
        if not 0 <= self.flush_blocks <= hv.U64_MAX:
            raise ConfigError(f"{key}.flush_blocks", "must be a 64-bit BlockMask")
        if self.flush_blocks >> self.blocks:
            raise ConfigError(f"{key}.flush_blocks", f"{self.flush_blocks:#x} names a block >= blocks ({self.blocks})")
        _non_negative(self.flush_pages, f"{key}.flush_pages")


FAULTS = ("", "drop_deferred_flush", "deny_hypercalls")


@dataclass(frozen=True)
class RunConfig(_Section):
    check_invariants: bool = False  # assert the model's invariants during the run (on in tests)
    # fault injection: "" (none), "drop_deferred_flush" (a VP that is not on an LP loses the flushes
    # deferred to it: the invariant checks must catch it) or "deny_hypercalls" (every flush hypercall
    # returns HV_STATUS_ACCESS_DENIED: the guest's fallback path)
    inject_fault: str = ""
    # the run stops with a clear error after scheduling this many SimPy events (a guard against a
    # configuration that would run for hours; about 2 minutes of wall time per 100 M events)
    max_events: int = 200_000_000

    def check(self, key: str) -> None:
        _one_of(self.inject_fault, FAULTS, f"{key}.inject_fault")
        _positive(self.max_events, f"{key}.max_events")


@dataclass(frozen=True)
class Config:
    partition: PartitionConfig = PartitionConfig()
    costs: CostConfig = CostConfig()
    tlb: TlbConfig = TlbConfig()
    exits: ExitsConfig = ExitsConfig()
    locks: LocksConfig = LocksConfig()
    workload: WorkloadConfig = WorkloadConfig()
    guest: GuestConfig = GuestConfig()
    spin: SpinConfig = SpinConfig()
    host: HostConfig = HostConfig()
    vf: VfConfig = VfConfig()
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        hints = _hints(Config)
        for f in dataclasses.fields(self):
            if not isinstance(getattr(self, f.name), hints[f.name]):
                raise ConfigError(f.name, f"must be a {hints[f.name].__name__}, got "
                                  f"{type(getattr(self, f.name)).__name__}")
            getattr(self, f.name).check(f.name)
        n = self.partition.vps
        for key, vps in (("locks.vsm_vps", self.locks.vsm_vps), ("workload.initiators", self.workload.initiators),
                         ("vf.service_vps", self.vf.service_vps if self.vf.count else [])):
            bad = [v for v in vps if not 0 <= v < n]
            if bad:
                raise ConfigError(key, f"VP {bad[0]} does not exist (the partition has VPs 0..{n - 1})")
        scheduler = self.host.scheduler
        if scheduler == "profile":
            scheduler = "eevdf" if self.partition.semantics == "kvm" else "hyperv"
        if scheduler in ("cfs", "eevdf") and self.partition.slice_us != PartitionConfig.slice_us:
            raise ConfigError("partition.slice_us", f"has no effect under the {scheduler} host scheduler (the kvm "
                              "profile's is eevdf), which sets its slices from host.sched_base_slice_us (eevdf) or "
                              "host.sched_latency_us and host.sched_min_granularity_us (cfs); set those, or "
                              "host.scheduler = \"hyperv\" for a fixed slice")
        used = {"cfs": ("sched_latency_us", "sched_min_granularity_us", "sched_wakeup_granularity_us"),
                "eevdf": ("sched_base_slice_us",), "hyperv": ()}[scheduler]
        for name in ("sched_latency_us", "sched_min_granularity_us", "sched_wakeup_granularity_us",
                     "sched_base_slice_us"):
            if getattr(self.host, name) and name not in used:
                raise ConfigError(f"host.{name}", f"has no effect under the {scheduler} host scheduler"
                                  + (f" (it uses {', '.join('host.' + u for u in used)})" if used else
                                     " (it uses partition.slice_us)"))
        if self.partition.apic_emulation == "user" and self.costs.posted_interrupts:
            raise ConfigError("costs.posted_interrupts", "posted interrupts are the hypervisor's APIC virtualization; "
                              "with partition.apic_emulation = \"user\" the stack delivers every interrupt")
        isolation = self.partition.isolation
        if isolation == "profile":
            isolation = "snp" if self.partition.semantics == "openhcl" else "none"
        if isolation != "none" and self.host.broadcast_flush != "none":
            raise ConfigError("host.broadcast_flush", f"has no effect on an OpenHCL {isolation} partition: its "
                              "paravisor decides the flush path (SNP: INVLPGB; TDX: kicks)")
        if self.workload.sleep_us and self.workload.mode != "closed":
            raise ConfigError("workload.sleep_us", "a thread sleeps after each operation of a closed loop only "
                              "(workload.mode = \"closed\")")
        if self.host.guests * n > 65536:
            raise ConfigError("host.guests", f"{self.host.guests} guests of {n} VPs: at most 65,536 guest VPs in all")
        if self.workload.threads > n:
            raise ConfigError("workload.threads", f"{self.workload.threads} threads, but the partition has {n} VPs "
                              "(one thread per VP; 0: one on every VP)")
        threads = self.workload.threads or n
        for key, vps in (("workload.initiators", self.workload.initiators), ("locks.vsm_vps", self.locks.vsm_vps)):
            idle = [v for v in vps if v >= threads]
            if idle:
                raise ConfigError(key, f"VP {idle[0]} has no thread (workload.threads = {threads}: VPs "
                                  f"0..{threads - 1} run one)")
        mask = self.workload.processor_mask
        if mask:
            bad = [v for v in hv.mask_to_vps(mask) if v >= n]
            if bad:
                raise ConfigError(
                    "workload.processor_mask", f"{mask:#x} names VP {bad[0]}, but the partition has VPs 0..{n - 1}"
                )

    # ------------------------------------------------------------ building
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        return _build(cls, data, "")

    @classmethod
    def from_toml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
        data = read_toml(path, "config file")
        return cls.from_dict(apply_overrides(data, overrides or {}))

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """A new Config with dotted-key overrides: ``{"partition.vps": 32}``."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- helpers
def _positive(value, key: str) -> None:
    if not value > 0 or math.isinf(value):
        raise ConfigError(key, f"must be a finite number > 0, got {value!r}")


def _one_of(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(key, f"must be one of {', '.join(repr(o) for o in options)}, not {value!r}")


def _non_negative(value, key: str) -> None:
    if not value >= 0:
        raise ConfigError(key, f"must be >= 0, got {value!r}")


def _finite_non_negative(value, key: str) -> None:
    if not value >= 0 or math.isinf(value):
        raise ConfigError(key, f"must be a finite number >= 0, got {value!r}")


def _fraction(value, key: str) -> None:
    if not 0 <= value <= 1:
        raise ConfigError(key, f"must be in [0, 1], got {value!r}")


MAX_RATE_PER_MS = 1000.0  # one per simulated microsecond: anything faster is a typo, and would not finish


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    import copy

    data = copy.deepcopy(data)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(dotted, f"{part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"partition.vps=32"`` -> ``("partition.vps", 32)``; values are TOML
    (numbers, booleans, quoted strings, arrays), bare words are strings."""
    if "=" not in text:
        raise ConfigError(text, "an override is KEY=VALUE")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ConfigError(text, "an override needs a key before '='")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except RecursionError:
        raise ConfigError(key, "the value nests arrays too deeply") from None
    return key, value


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _plain(value):
    """What notebooks pass as the Python value it stands for: a numpy scalar (numpy.int64, numpy.bool_,
    numpy.float64) as int, bool or float, a numpy array as a list, a path (pathlib.Path) as its string."""
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()  # a 0-d value: its Python scalar; an array: a list
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


@functools.cache
def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value, tp, key: str):
    value = _plain(value)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, tp):
        return value  # a section built directly has checked itself
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__}")
        if len(value) > 65536:
            raise ConfigError(key, "at most 65,536 items")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(key, "union types are not supported in config")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(key, f"must be an integer, got {value!r}")
        if abs(value) > 2**64:
            raise ConfigError(key, f"integer out of range (at most 2^64), got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, got {value!r}")
        if isinstance(value, int) and abs(value) > 2**1000:
            raise ConfigError(key, "number out of range")
        if math.isnan(value):
            raise ConfigError(key, "must be a number, got nan")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(key, f"unsupported type {_type_name(tp)}")  # pragma: no cover


def _build(cls, data: dict[str, Any], prefix: str):
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if prefix + key in REMOVED_KEYS:
            raise ConfigError(prefix + key, f"this key was removed: {REMOVED_KEYS[prefix + key]}")
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(prefix + key, f"unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    token = _BUILDING.set(True)  # coerced here; Config checks every section with its key
    try:
        return cls(**kwargs)
    finally:
        _BUILDING.reset(token)


#: the key of each section type (its errors name it when it is built on its own)
SECTION_KEYS = {tp: name for name, tp in _hints(Config).items()}
