"""WHvRunVirtualProcessor exit reasons (x64, WinHvPlatformDefs.h).

Values from the WHvRunVirtualProcessor documentation (the 19H2 page) plus
the later Windows SDK headers (WinHvPlatformDefs.h). Pure data, no SimPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ExitReason(IntEnum):
    NONE = 0x00000000
    # Standard exits caused by operations of the virtual processor
    MEMORY_ACCESS = 0x00000001
    X64_IO_PORT_ACCESS = 0x00000002
    UNRECOVERABLE_EXCEPTION = 0x00000004
    INVALID_VP_REGISTER_VALUE = 0x00000005
    UNSUPPORTED_FEATURE = 0x00000006
    X64_INTERRUPT_WINDOW = 0x00000007
    X64_HALT = 0x00000008
    X64_APIC_EOI = 0x00000009
    SYNIC_SINT_DELIVERABLE = 0x0000000A
    # Additional exits that can be configured through partition properties
    X64_MSR_ACCESS = 0x00001000
    X64_CPUID = 0x00001001
    EXCEPTION = 0x00001002
    X64_RDTSC = 0x00001003
    X64_APIC_SMI_TRAP = 0x00001004
    HYPERCALL = 0x00001005
    X64_APIC_INIT_SIPI_TRAP = 0x00001006
    X64_APIC_WRITE_TRAP = 0x00001007
    # Exits caused by the host
    CANCELED = 0x00002001

    @property
    def header_name(self) -> str:
        """The name as WinHvPlatformDefs.h spells it."""
        parts = self.name.split("_")
        camel = "".join(p if p == "X64" else p.capitalize() for p in parts)
        return "WHvRunVpExitReason" + camel


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """One handled exit: which VP, why, when it started, how long the
    virtualization stack took to handle it (microseconds)."""

    vp: int
    reason: ExitReason
    start_us: float
    duration_us: float
