"""The Hyper-V virtual TLB flush ABI: pure data, no SimPy.

Everything here follows the
Hyper-V TLFS (v6.0b and the markdown pages HvCallFlushVirtualAddressSpace /
HvCallFlushVirtualAddressList / ...Ex), Linux's guest code
(arch/x86/hyperv/mmu.c) and KVM's emulation (arch/x86/kvm/hyperv.c).

The model calls :func:`validate` and acts on the status it returns; it never
re-implements flag logic of its own.
"""

from __future__ import annotations

import struct
from bisect import bisect_left
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import Literal

import numpy as np

Semantics = Literal["tlfs", "kvm"]

U64_MAX = (1 << 64) - 1
#: VP indices an HV_VP_SET can name: 64 banks of 64 VPs.
MAX_VP_INDEX = 64 * 64 - 1
#: One simple-format GVA range entry covers 1..4096 pages.
GVA_RANGE_MAX_PAGES = 4096


class HvCallCode(IntEnum):
    FLUSH_VIRTUAL_ADDRESS_SPACE = 0x0002
    FLUSH_VIRTUAL_ADDRESS_LIST = 0x0003
    FLUSH_VIRTUAL_ADDRESS_SPACE_EX = 0x0013
    FLUSH_VIRTUAL_ADDRESS_LIST_EX = 0x0014

    @property
    def is_rep(self) -> bool:
        return self in (HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST, HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST_EX)

    @property
    def is_ex(self) -> bool:
        return self in (
            HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE_EX,
            HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST_EX,
        )


class HvFlushFlags(IntFlag):
    ALL_PROCESSORS = 0x1
    ALL_VIRTUAL_ADDRESS_SPACES = 0x2
    NON_GLOBAL_MAPPINGS_ONLY = 0x4
    USE_EXTENDED_RANGE_FORMAT = 0x8


#: Every defined HV_FLUSH_* bit; all others are reserved and must be zero.
VALID_FLUSH_FLAGS = 0xF


class HvStatus(IntEnum):
    SUCCESS = 0x0000
    INVALID_HYPERCALL_CODE = 0x0002
    INVALID_HYPERCALL_INPUT = 0x0003
    INVALID_ALIGNMENT = 0x0004
    INVALID_PARAMETER = 0x0005
    ACCESS_DENIED = 0x0006
    OPERATION_DENIED = 0x0008
    INVALID_VP_INDEX = 0x000E


# --------------------------------------------------------------------------
# The hypercall input value (control word passed in RCX)
# --------------------------------------------------------------------------
_CALL_CODE_MASK = 0xFFFF
_FAST_BIT = 16
_VAR_HDR_SHIFT, _VAR_HDR_MASK = 17, 0x3FF  # bits 26:17
_NESTED_BIT = 31
_REP_COUNT_SHIFT, _REP_MASK = 32, 0xFFF  # bits 43:32
_REP_START_SHIFT = 48  # bits 59:48
#: Bits 30:27, 47:44 and 63:60.
CONTROL_RESERVED_MASK = (0xF << 27) | (0xF << 44) | (0xF << 60)


@dataclass(frozen=True, slots=True)
class HypercallInput:
    """The hypercall input value. ``reserved_bits`` holds whatever a decoded
    value had in the reserved fields (encode() writes them back, so a model
    can build a bad control word on purpose)."""

    call_code: int
    fast: bool = False
    var_header_size: int = 0
    rep_count: int = 0
    rep_start_index: int = 0
    nested: bool = False
    reserved_bits: int = 0

    def __post_init__(self) -> None:
        for name, value, limit in (
            ("call_code", self.call_code, _CALL_CODE_MASK),
            ("var_header_size", self.var_header_size, _VAR_HDR_MASK),
            ("rep_count", self.rep_count, _REP_MASK),
            ("rep_start_index", self.rep_start_index, _REP_MASK),
        ):
            if not 0 <= value <= limit:
                raise ValueError(f"{name}={value} does not fit its field (0..{limit})")
        if self.reserved_bits & ~CONTROL_RESERVED_MASK:
            raise ValueError(f"reserved_bits {self.reserved_bits:#x} outside the reserved fields")

    def encode(self) -> int:
        return (
            self.call_code
            | (int(self.fast) << _FAST_BIT)
            | (self.var_header_size << _VAR_HDR_SHIFT)
            | (int(self.nested) << _NESTED_BIT)
            | (self.rep_count << _REP_COUNT_SHIFT)
            | (self.rep_start_index << _REP_START_SHIFT)
            | self.reserved_bits
        )

    @classmethod
    def decode(cls, value: int, *, strict: bool = False) -> HypercallInput:
        """Decode a 64-bit control word. Reserved bits are reported in
        ``reserved_bits``; with ``strict=True`` they raise ValueError."""
        if not 0 <= value <= U64_MAX:
            raise ValueError(f"control word {value:#x} is not a 64-bit value")
        reserved = value & CONTROL_RESERVED_MASK
        if strict and reserved:
            raise ValueError(f"reserved control bits set: {reserved:#x}")
        return cls(
            call_code=value & _CALL_CODE_MASK,
            fast=bool((value >> _FAST_BIT) & 1),
            var_header_size=(value >> _VAR_HDR_SHIFT) & _VAR_HDR_MASK,
            rep_count=(value >> _REP_COUNT_SHIFT) & _REP_MASK,
            rep_start_index=(value >> _REP_START_SHIFT) & _REP_MASK,
            nested=bool((value >> _NESTED_BIT) & 1),
            reserved_bits=reserved,
        )


# --------------------------------------------------------------------------
# ProcessorMask and HV_VP_SET
# --------------------------------------------------------------------------
def _check_vp_index(vp: int, limit: int) -> None:
    if not isinstance(vp, int) or isinstance(vp, bool) or not 0 <= vp <= limit:
        raise ValueError(f"VP index {vp!r} outside 0..{limit}")


def set_bits(mask: int) -> list[int]:
    """Indices of the set bits of a non-negative int, ascending (a
    ProcessorMask's VPs, a BlockMask's blocks, a VP set's members). Beyond one
    64-bit word the bits are unpacked by numpy: a 4,096-VP set is one call,
    not 4,096 trips round a Python loop (see ``bits_of``)."""
    if mask.bit_length() > 64:
        raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), np.uint8)
        return np.flatnonzero(np.unpackbits(raw, bitorder="little")).tolist()
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def bits_of(indices, limit: int) -> int:
    """The int with bit i set for every i in ``indices`` (each an int in 0..limit, else ValueError):
    the inverse of ``set_bits``. One numpy scatter and pack for large sets (a 4,095-VP call's
    ProcessorMask / VP set words / plan membership): OR-ing 1 << i into a growing int costs
    O(n^2 / 64) word operations, and checking each index in Python 80 ns each."""
    if not isinstance(indices, list | tuple):
        indices = list(indices)
    if len(indices) <= 64:
        mask = 0
        for i in indices:
            _check_vp_index(i, limit)
            mask |= 1 << i
        return mask
    exact = set(map(type, indices)) == {int}
    if not exact or min(indices) < 0 or max(indices) > limit:  # min / max first: numpy overflows past int64
        for i in indices:  # the first bad one, named (int subclasses in range pass)
            _check_vp_index(i, limit)
    positions = np.fromiter(indices if exact else map(int, indices), np.int64, len(indices))
    flags = np.zeros(int(positions.max()) + 1, np.bool_)
    flags[positions] = True
    return int.from_bytes(np.packbits(flags, bitorder="little").tobytes(), "little")


def mask_to_vps(mask: int) -> list[int]:
    """ProcessorMask -> VP indices (bit i = VP i). ``0x51 -> [0, 4, 6]``."""
    if not 0 <= mask <= U64_MAX:
        raise ValueError(f"ProcessorMask {mask:#x} is not a 64-bit value")
    return set_bits(mask)


def vps_to_mask(vps) -> int:
    """VP indices (0..63) -> ProcessorMask. Indices >= 64 need an HV_VP_SET."""
    mask = 0
    for vp in vps:
        _check_vp_index(vp, 63)
        mask |= 1 << vp
    return mask


@dataclass(frozen=True, slots=True)
class VpSet:
    """HV_VP_SET: Format 0 is a sparse 4K set of banks, Format 1 all VPs."""

    format: int = 0
    valid_banks_mask: int = 0
    banks: tuple[int, ...] = ()

    FORMAT_SPARSE_4K = 0
    FORMAT_ALL = 1

    @property
    def bank_count(self) -> int:
        return len(self.banks)

    def pack(self) -> bytes:
        return struct.pack(f"<QQ{len(self.banks)}Q", self.format, self.valid_banks_mask, *self.banks)

    @classmethod
    def unpack(cls, data: bytes, n_banks: int | None = None) -> VpSet:
        """Parse an HV_VP_SET. ``n_banks`` is how many bank words the caller
        says follow (the variable header size); by default popcount of
        ValidBanksMask for Format 0 and none for other formats."""
        if len(data) < 16:
            raise ValueError(f"HV_VP_SET needs 16 bytes, got {len(data)}")
        fmt, valid = struct.unpack_from("<QQ", data)
        if n_banks is None:
            n_banks = valid.bit_count() if fmt == cls.FORMAT_SPARSE_4K else 0
        if len(data) != 16 + 8 * n_banks:
            raise ValueError(f"HV_VP_SET with {n_banks} banks needs {16 + 8 * n_banks} bytes, got {len(data)}")
        return cls(fmt, valid, struct.unpack_from(f"<{n_banks}Q", data, 16))


def vps_to_vp_set(vps) -> VpSet:
    """VP indices -> sparse HV_VP_SET (one bank word per non-empty bank).
    ``{0, 5, 130} -> ValidBanksMask 0x5, banks (0x21, 0x4)``."""
    members = bits_of(vps, MAX_VP_INDEX)
    valid, banks, bank = 0, [], 0
    while members:
        word = members & U64_MAX
        if word:
            valid |= 1 << bank
            banks.append(word)
        members >>= 64
        bank += 1
    return VpSet(VpSet.FORMAT_SPARSE_4K, valid, tuple(banks))


def vp_set_to_vps(vp_set: VpSet, n_vps: int | None = None) -> list[int]:
    """HV_VP_SET -> sorted VP indices. Format 1 (all) needs ``n_vps``."""
    if vp_set.format == VpSet.FORMAT_ALL:
        if n_vps is None:
            raise ValueError("a Format 1 (all VPs) set needs n_vps to be listed")
        return list(range(n_vps))
    if vp_set.format != VpSet.FORMAT_SPARSE_4K:
        raise ValueError(f"unknown HV_VP_SET format {vp_set.format}")
    if vp_set.valid_banks_mask.bit_count() != len(vp_set.banks):
        raise ValueError(
            f"ValidBanksMask {vp_set.valid_banks_mask:#x} names "
            f"{vp_set.valid_banks_mask.bit_count()} banks but {len(vp_set.banks)} bank words follow"
        )
    members = 0
    for bank, word in zip(mask_to_vps(vp_set.valid_banks_mask), vp_set.banks, strict=True):
        if not 0 <= word <= U64_MAX:
            raise ValueError(f"bank word {word:#x} is not a 64-bit value")
        members |= word << (64 * bank)
    return set_bits(members)


# --------------------------------------------------------------------------
# Input blocks
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlushSpaceInput:
    """The 24-byte header of HvCallFlushVirtualAddressSpace / ...List."""

    address_space: int
    flags: int
    processor_mask: int

    SIZE = 24

    def pack(self) -> bytes:
        return struct.pack("<QQQ", self.address_space, self.flags, self.processor_mask)

    @classmethod
    def unpack(cls, data: bytes) -> FlushSpaceInput:
        if len(data) != cls.SIZE:
            raise ValueError(f"flush header is {cls.SIZE} bytes, got {len(data)}")
        return cls(*struct.unpack("<QQQ", data))


@dataclass(frozen=True, slots=True)
class FlushSpaceExInput:
    """The header of the Ex calls: AddressSpace, Flags, then an HV_VP_SET."""

    address_space: int
    flags: int
    vp_set: VpSet

    FIXED_SIZE = 32  # AddressSpace, Flags, Format, ValidBanksMask

    def pack(self) -> bytes:
        return struct.pack("<QQ", self.address_space, self.flags) + self.vp_set.pack()

    @classmethod
    def unpack(cls, data: bytes, n_banks: int | None = None) -> FlushSpaceExInput:
        if len(data) < cls.FIXED_SIZE:
            raise ValueError(f"Ex flush header needs at least {cls.FIXED_SIZE} bytes, got {len(data)}")
        address_space, flags = struct.unpack_from("<QQ", data)
        return cls(address_space, flags, VpSet.unpack(data[16:], n_banks))


# --------------------------------------------------------------------------
# GVA ranges (simple format)
# --------------------------------------------------------------------------
def encode_gva_range(page_number: int, additional_pages: int = 0) -> int:
    """Bits 63:12 page number, bits 11:0 the number of *additional* pages."""
    if not 0 <= page_number < (1 << 52):
        raise ValueError(f"page number {page_number:#x} does not fit 52 bits")
    if not 0 <= additional_pages < GVA_RANGE_MAX_PAGES:
        raise ValueError(f"additional pages {additional_pages} outside 0..4095")
    return (page_number << 12) | additional_pages


def decode_gva_range(entry: int) -> tuple[int, int]:
    """-> (page_number, additional_pages)."""
    if not 0 <= entry <= U64_MAX:
        raise ValueError(f"GVA range entry {entry:#x} is not a 64-bit value")
    return entry >> 12, entry & 0xFFF


def gva_ranges_for(start_page: int, n_pages: int) -> list[int]:
    """The simple-format entries covering ``n_pages`` contiguous pages
    (one entry per 4096 pages, as Linux's fill_gva_list does)."""
    if n_pages < 1:
        raise ValueError("a GVA range list covers at least one page")
    entries = []
    page, left = start_page, n_pages
    while left > 0:
        chunk = min(left, GVA_RANGE_MAX_PAGES)
        entries.append(encode_gva_range(page, chunk - 1))
        page, left = page + chunk, left - chunk
    return entries


def gva_range_pages(entries) -> int:
    """Total pages named by simple-format entries."""
    return sum(decode_gva_range(e)[1] + 1 for e in entries)


# --------------------------------------------------------------------------
# A whole flush hypercall, and its validation
# --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FlushCall:
    """One flush hypercall as the guest issues it: control word plus input.

    Use the constructors (:meth:`space`, :meth:`space_ex`, :meth:`list`,
    :meth:`list_ex`) for well-formed calls; build the dataclass directly to
    model a malformed one.
    """

    control: HypercallInput
    address_space: int = 0
    flags: int = 0
    processor_mask: int = 0
    vp_set: VpSet | None = None
    gva_ranges: tuple[int, ...] = ()
    input_gpa: int = 0

    @property
    def call_code(self) -> int:
        return self.control.call_code

    @classmethod
    def space(cls, address_space: int, flags: int, processor_mask: int) -> FlushCall:
        return cls(HypercallInput(HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE), address_space, int(flags), processor_mask)

    @classmethod
    def space_ex(cls, address_space: int, flags: int, vp_set: VpSet) -> FlushCall:
        control = HypercallInput(HvCallCode.FLUSH_VIRTUAL_ADDRESS_SPACE_EX, var_header_size=vp_set.bank_count)
        return cls(control, address_space, int(flags), vp_set=vp_set)

    @classmethod
    def list(cls, address_space: int, flags: int, processor_mask: int, gva_ranges) -> FlushCall:
        ranges = tuple(gva_ranges)
        control = HypercallInput(HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST, rep_count=len(ranges))
        return cls(control, address_space, int(flags), processor_mask, gva_ranges=ranges)

    @classmethod
    def list_ex(cls, address_space: int, flags: int, vp_set: VpSet, gva_ranges) -> FlushCall:
        ranges = tuple(gva_ranges)
        control = HypercallInput(
            HvCallCode.FLUSH_VIRTUAL_ADDRESS_LIST_EX, var_header_size=vp_set.bank_count, rep_count=len(ranges)
        )
        return cls(control, address_space, int(flags), vp_set=vp_set, gva_ranges=ranges)

    def input_bytes(self) -> bytes:
        """The memory input block: header, then the rep list."""
        if self.vp_set is not None:
            head = FlushSpaceExInput(self.address_space, self.flags, self.vp_set).pack()
        else:
            head = FlushSpaceInput(self.address_space, self.flags, self.processor_mask).pack()
        return head + struct.pack(f"<{len(self.gva_ranges)}Q", *self.gva_ranges)

    @classmethod
    def decode(cls, control_value: int, data: bytes, input_gpa: int = 0) -> FlushCall:
        """Rebuild a call from its control word and memory input block."""
        control = HypercallInput.decode(control_value)
        try:
            code = HvCallCode(control.call_code)
        except ValueError:
            return cls(control, input_gpa=input_gpa)
        n_reps = control.rep_count if code.is_rep else 0
        if code.is_ex:
            head_len = FlushSpaceExInput.FIXED_SIZE + 8 * control.var_header_size
            head = FlushSpaceExInput.unpack(data[:head_len], control.var_header_size)
            fields = dict(address_space=head.address_space, flags=head.flags, vp_set=head.vp_set)
        else:
            head_len = FlushSpaceInput.SIZE
            h = FlushSpaceInput.unpack(data[:head_len])
            fields = dict(address_space=h.address_space, flags=h.flags, processor_mask=h.processor_mask)
        if len(data) != head_len + 8 * n_reps:
            raise ValueError(f"input is {len(data)} bytes; header {head_len} + {n_reps} reps x 8 expected")
        ranges = struct.unpack_from(f"<{n_reps}Q", data, head_len)
        return cls(control, gva_ranges=ranges, input_gpa=input_gpa, **fields)


@dataclass(frozen=True, slots=True)
class Validation:
    """What :func:`validate` decided: a status and, on success, the targets."""

    status: HvStatus
    targets: tuple[int, ...] = ()
    all_processors: bool = False
    reason: str = ""
    ignored_vps: tuple[int, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return self.status == HvStatus.SUCCESS


#: Address spaces are CR3 values; bits above the physical-address width (52)
#: cannot be set in a valid one.
_CR3_INVALID_BITS = ~((1 << 52) - 1) & U64_MAX


def _fail(status: HvStatus, reason: str) -> Validation:
    return Validation(status, reason=reason)


def validate(call: FlushCall, semantics: Semantics = "tlfs", n_vps: int = 64) -> Validation:
    """Decide the HV_STATUS of a flush hypercall and, on success, its target VPs.

    ``semantics="tlfs"`` follows the TLFS; ``"kvm"`` follows KVM's emulation
    (arch/x86/kvm/hyperv.c) with the deviations listed in
    docs/model.md ("Hypervisor profiles").
    """
    if semantics not in ("tlfs", "kvm"):
        raise ValueError(f"semantics must be 'tlfs' or 'kvm', not {semantics!r}")
    if n_vps < 1:
        raise ValueError("a partition has at least one VP")
    kvm = semantics == "kvm"
    c = call.control
    try:
        code = HvCallCode(c.call_code)
    except ValueError:
        return _fail(HvStatus.INVALID_HYPERCALL_CODE, f"call code {c.call_code:#06x} is not a flush call")

    failure = _check_control(call, code) or (None if kvm else _check_flags(call, code))
    if failure is not None:
        return failure
    return _targets(call, code, kvm, n_vps)


def _check_control(call: FlushCall, code: HvCallCode) -> Validation | None:
    """The control word and the input layout: None if they are valid, else the failure."""
    c = call.control
    if c.reserved_bits:
        return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "reserved control bits set")
    if code.is_rep:
        if c.rep_count == 0:
            return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "rep count 0 on a rep call")
        if c.rep_start_index >= c.rep_count:
            return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "rep start index >= rep count")
        if len(call.gva_ranges) < c.rep_count:
            return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "fewer GVA ranges than the rep count")
    elif c.rep_count or c.rep_start_index:
        return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "rep fields set on a simple call")
    if code.is_ex:
        vp_set = call.vp_set
        if vp_set is None:
            return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "Ex call without an HV_VP_SET")
        expected_banks = vp_set.valid_banks_mask.bit_count() if vp_set.format == VpSet.FORMAT_SPARSE_4K else 0
        if c.var_header_size != expected_banks or len(vp_set.banks) != expected_banks:
            return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "variable header size != banks in ValidBanksMask")
    elif c.var_header_size:
        return _fail(HvStatus.INVALID_HYPERCALL_INPUT, "variable header on a call that takes none")
    if not c.fast and call.input_gpa % 8:
        return _fail(HvStatus.INVALID_ALIGNMENT, "input GPA not 8-byte aligned")
    return None


def _check_flags(call: FlushCall, code: HvCallCode) -> Validation | None:
    """The flags and the address space (the TLFS; KVM ignores them): None if valid, else the failure."""
    flags = call.flags
    if flags & ~VALID_FLUSH_FLAGS:
        return _fail(HvStatus.INVALID_PARAMETER, f"reserved flag bits {flags & ~VALID_FLUSH_FLAGS:#x}")
    if code.is_rep and flags & HvFlushFlags.NON_GLOBAL_MAPPINGS_ONLY:
        return _fail(HvStatus.INVALID_PARAMETER, "NON_GLOBAL_MAPPINGS_ONLY on a List call")
    if not flags & HvFlushFlags.ALL_VIRTUAL_ADDRESS_SPACES and call.address_space & _CR3_INVALID_BITS:
        return _fail(HvStatus.INVALID_PARAMETER, "address space is not a valid CR3")
    return None


def _targets(call: FlushCall, code: HvCallCode, kvm: bool, n_vps: int) -> Validation:
    """The VPs a valid call targets: every VP with ALL_PROCESSORS (or KVM's readings of an empty mask
    and a non-sparse set), else the ProcessorMask's or the HV_VP_SET's, those beyond the partition
    refused (TLFS) or ignored (KVM)."""
    flags = call.flags
    if flags & HvFlushFlags.ALL_PROCESSORS:
        return Validation(HvStatus.SUCCESS, tuple(range(n_vps)), all_processors=True)
    if code.is_ex:
        vp_set = call.vp_set
        if vp_set.format != VpSet.FORMAT_SPARSE_4K:
            if kvm:  # KVM: any Format other than 0 means all VPs
                return Validation(HvStatus.SUCCESS, tuple(range(n_vps)), all_processors=True)
            if vp_set.format != VpSet.FORMAT_ALL:
                return _fail(HvStatus.INVALID_PARAMETER, f"unknown HV_VP_SET format {vp_set.format}")
            return Validation(HvStatus.SUCCESS, tuple(range(n_vps)), all_processors=True)
        requested = vp_set_to_vps(vp_set)
    else:
        if call.processor_mask == 0:
            if kvm:  # Windows Server 2012 workaround: empty mask means all VPs
                return Validation(HvStatus.SUCCESS, tuple(range(n_vps)), all_processors=True)
            return _fail(HvStatus.INVALID_PARAMETER, "ProcessorMask is 0 and ALL_PROCESSORS is clear")
        requested = mask_to_vps(call.processor_mask)
    cut = bisect_left(requested, n_vps)  # requested is ascending
    present, missing = tuple(requested[:cut]), tuple(requested[cut:])
    if missing and not kvm:
        return _fail(HvStatus.INVALID_VP_INDEX, f"VP index {missing[0]} beyond the partition's {n_vps} VPs")
    if not present and not kvm and code.is_ex:
        return _fail(HvStatus.INVALID_PARAMETER, "HV_VP_SET names no VP")
    return Validation(HvStatus.SUCCESS, present, ignored_vps=missing)
