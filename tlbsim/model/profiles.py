"""Hypervisor profiles: the behaviours that differ between hypervisors.

Owns one question: "what does Hyper-V do here that KVM (or OpenHCL) does
not?". One profile per ``partition.semantics``; the hypervisor model
(hypervisor.py) and the guest policies ask the profile instead of testing the
semantics string, so a new hypervisor is a new profile, not a set of ``if``s.

Today the profiles differ in how a flush hypercall's input is validated
(``tlbsim.hv.validate``: reference/hyperv-flush.md, "Two hypervisors, two
behaviours"). Behaviours are added here as the model learns them; each field
names its source.
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
    #: a caller whose target's TLB is locked is suspended and reissues the call
    #: (TLFS "TLB lock"); see locks.py for what can lock a TLB
    suspends_on_tlb_lock: bool = True

    def validate(self, call: hv.FlushCall, n_vps: int) -> hv.Validation:
        return hv.validate(call, self.validation, n_vps)


TLFS = HypervisorProfile("tlfs", validation="tlfs")
KVM = HypervisorProfile("kvm", validation="kvm")

PROFILES = {p.name: p for p in (TLFS, KVM)}


def profile_for(semantics: str) -> HypervisorProfile:
    return PROFILES[semantics]
