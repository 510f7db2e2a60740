"""Hypervisor profiles: the behaviours that differ between hypervisors.

Owns one question: "what does Hyper-V do here that KVM (or OpenHCL) does
not?". One profile per ``partition.semantics``; the hypervisor model
(hypervisor.py) and the guest policies ask the profile instead of testing the
semantics string, so a new hypervisor is a new profile, not a set of ``if``s.

The profiles differ in how a flush hypercall's input is validated
(``tlbsim.hv.validate``: the TLFS and arch/x86/kvm/hyperv.c, "Two hypervisors, two
behaviours"), how a caller waits for a locked TLB, what a flush removes on a
target, and how a spinning VP yields its LP. Each field names its source.
"""

from __future__ import annotations

from dataclasses import dataclass

from tlbsim import hv


@dataclass(frozen=True)
class HypervisorProfile:
    name: str
    #: how the flush hypercalls' input is validated: "tlfs" (the TLFS) or "kvm"
    #: (arch/x86/kvm/hyperv.c: mask 0 means all VPs, reserved flags ignored, ...)
    validation: str
    #: how a caller waits for a target's locked TLB: "reissue" (TLFS: suspended, the whole call
    #: reissued when it resumes), "snapshot" (openvmm tlb_lock.rs: wait only for the holders at call
    #: time, woken by the last to release) or "none" (the hypervisor has no TLB locks: KVM)
    lock_wait: str = "reissue"
    #: a flush hypercall flushes the target's whole TLB, global entries and every address space
    #: included, ignoring NON_GLOBAL_MAPPINGS_ONLY and AddressSpace (KVM: kvm_hv_flush_tlb ->
    #: KVM_REQ_HV_TLB_FLUSH flushes the guest TLB); List calls with few ranges stay page-exact
    flush_whole_tlb: bool = False
    #: per-VP queue of pending flush ranges (KVM_HV_TLB_FLUSH_FIFO_SIZE 16); a call with more ranges
    #: than fit, or a full queue, degrades to one flush of everything. 0: no queue (Hyper-V)
    flush_queue_ranges: int = 0
    #: what a spinning VP does to give up its LP: "ple" (pause-loop exiting + kvm_vcpu_on_spin's
    #: directed yield) or "notify" (the guest's HvCallNotifyLongSpinWait after the CPUID-recommended
    #: retries; the hypervisor may run another VP of the partition)
    spin_yield: str = "notify"
    #: the host scheduler (host.py): "eevdf" (Linux 6.6+'s fair class: KVM runs on Linux), "cfs" (before
    #: 6.6) or "hyperv" (a fair queue with the fixed partition.slice_us; Hyper-V's is not public beyond that)
    scheduler: str = "hyperv"

    def validate(self, call: hv.FlushCall, n_vps: int) -> hv.Validation:
        return hv.validate(call, self.validation, n_vps)

    @property
    def suspends_on_tlb_lock(self) -> bool:
        return self.lock_wait != "none"


#: Hyper-V per the TLFS.
TLFS = HypervisorProfile("tlfs", validation="tlfs")
#: KVM emulating the Hyper-V flush hypercalls for a Windows (or Linux-on-Hyper-V) guest.
KVM = HypervisorProfile("kvm", validation="kvm", lock_wait="none", flush_whole_tlb=True, flush_queue_ranges=16,
                        spin_yield="ple", scheduler="eevdf")
#: Hyper-V with the OpenHCL paravisor handling VTL TLB locks (openvmm).
OPENHCL = HypervisorProfile("openhcl", validation="tlfs", lock_wait="snapshot")

PROFILES = {p.name: p for p in (TLFS, KVM, OPENHCL)}


def profile_for(semantics: str) -> HypervisorProfile:
    return PROFILES[semantics]
