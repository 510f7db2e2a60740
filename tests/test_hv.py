"""The Hyper-V flush ABI: layouts, statuses, and the TLFS/KVM differences
(the TLFS, arch/x86/hyperv/mmu.c, arch/x86/kvm/hyperv.c)."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlbsim import hv
from tlbsim.hv import (
    FlushCall,
    FlushSpaceExInput,
    FlushSpaceInput,
    HvCallCode,
    HvFlushFlags,
    HvStatus,
    HypercallInput,
    VpSet,
)
from tlbsim.whp import ExitReason

F = HvFlushFlags
CR3 = 0x1234000


def test_enum_values_match_the_tlfs():
    assert [int(c) for c in HvCallCode] == [0x2, 0x3, 0x13, 0x14]
    assert (F.ALL_PROCESSORS, F.ALL_VIRTUAL_ADDRESS_SPACES) == (1, 2)
    assert (F.NON_GLOBAL_MAPPINGS_ONLY, F.USE_EXTENDED_RANGE_FORMAT) == (4, 8)
    assert {s.name: int(s) for s in HvStatus} == {
        "SUCCESS": 0, "INVALID_HYPERCALL_CODE": 2, "INVALID_HYPERCALL_INPUT": 3,
        "INVALID_ALIGNMENT": 4, "INVALID_PARAMETER": 5, "ACCESS_DENIED": 6,
        "OPERATION_DENIED": 8, "INVALID_VP_INDEX": 0xE,
    }


def test_exit_reasons_match_the_header():
    assert ExitReason.MEMORY_ACCESS == 1 and ExitReason.X64_HALT == 8
    assert ExitReason.X64_MSR_ACCESS == 0x1000 and ExitReason.HYPERCALL == 0x1005
    assert ExitReason.X64_APIC_WRITE_TRAP == 0x1007 and ExitReason.CANCELED == 0x2001
    assert len(ExitReason) == 19
    assert ExitReason.X64_IO_PORT_ACCESS.header_name == "WHvRunVpExitReasonX64IoPortAccess"


def test_processor_mask_example_from_the_spec():
    assert hv.mask_to_vps(0x51) == [0, 4, 6]
    assert hv.vps_to_mask([6, 0, 4]) == 0x51
    with pytest.raises(ValueError):
        hv.vps_to_mask([64])
    with pytest.raises(ValueError):
        hv.mask_to_vps(1 << 64)


def test_vp_set_example_from_the_reference():
    vs = hv.vps_to_vp_set([0, 5, 130])
    assert (vs.format, vs.valid_banks_mask, vs.banks) == (0, 0x5, (0x21, 0x4))
    assert hv.vp_set_to_vps(vs) == [0, 5, 130]
    assert hv.vp_set_to_vps(VpSet(1), n_vps=3) == [0, 1, 2]
    with pytest.raises(ValueError):
        hv.vp_set_to_vps(VpSet(0, 0x5, (0x21,)))  # two banks named, one word
    with pytest.raises(ValueError):
        hv.vps_to_vp_set([4096])


def test_flush_space_input_layout_is_24_bytes_little_endian():
    raw = FlushSpaceInput(CR3, F.ALL_VIRTUAL_ADDRESS_SPACES, 0x51).pack()
    assert raw == struct.pack("<QQQ", CR3, 2, 0x51) and len(raw) == 24
    assert FlushSpaceInput.unpack(raw) == FlushSpaceInput(CR3, 2, 0x51)
    with pytest.raises(ValueError):
        FlushSpaceInput.unpack(raw[:23])


def test_ex_header_layout():
    raw = FlushSpaceExInput(CR3, 0, hv.vps_to_vp_set([0, 5, 130])).pack()
    assert raw == struct.pack("<QQQQQQ", CR3, 0, 0, 0x5, 0x21, 0x4)
    assert FlushSpaceExInput.unpack(raw).vp_set.banks == (0x21, 0x4)


def test_control_word_fields():
    word = HypercallInput(0x3, rep_count=5, rep_start_index=2, var_header_size=1, fast=True).encode()
    assert word & 0xFFFF == 3 and (word >> 16) & 1 == 1
    assert (word >> 17) & 0x3FF == 1 and (word >> 32) & 0xFFF == 5 and (word >> 48) & 0xFFF == 2
    assert HypercallInput.decode(1 << 27).reserved_bits == 1 << 27
    with pytest.raises(ValueError):
        HypercallInput.decode(1 << 63, strict=True)
    with pytest.raises(ValueError):
        HypercallInput(0x3, rep_count=4096)


def test_gva_range_simple_format():
    assert hv.encode_gva_range(0x12345, 3) == 0x12345003
    assert hv.decode_gva_range(0x12345003) == (0x12345, 3)
    entries = hv.gva_ranges_for(100, 4097)
    assert [hv.decode_gva_range(e) for e in entries] == [(100, 4095), (4196, 0)]
    assert hv.gva_range_pages(entries) == 4097
    with pytest.raises(ValueError):
        hv.encode_gva_range(0, 4096)


# ---------------------------------------------------------------- validate
def status(call, semantics="tlfs", n_vps=8):
    return hv.validate(call, semantics, n_vps)


def test_valid_mask_call_targets_the_mask():
    v = status(FlushCall.space(CR3, 0, 0x51))
    assert v.ok and v.targets == (0, 4, 6) and not v.all_processors


def test_all_processors_ignores_the_mask():
    v = status(FlushCall.space(CR3, F.ALL_PROCESSORS, 0xDEAD))
    assert v.ok and v.targets == tuple(range(8)) and v.all_processors


@pytest.mark.parametrize("semantics,expected", [("tlfs", HvStatus.INVALID_PARAMETER), ("kvm", HvStatus.SUCCESS)])
def test_empty_mask(semantics, expected):
    v = status(FlushCall.space(CR3, 0, 0), semantics)
    assert v.status == expected
    if semantics == "kvm":
        assert v.targets == tuple(range(8))  # Windows Server 2012 workaround


@pytest.mark.parametrize("semantics,expected", [("tlfs", HvStatus.INVALID_PARAMETER), ("kvm", HvStatus.SUCCESS)])
def test_reserved_flag_bits(semantics, expected):
    assert status(FlushCall.space(CR3, 0x10, 1), semantics).status == expected


@pytest.mark.parametrize("semantics,expected", [("tlfs", HvStatus.INVALID_PARAMETER), ("kvm", HvStatus.SUCCESS)])
def test_non_global_is_invalid_on_list_calls(semantics, expected):
    call = FlushCall.list(CR3, F.NON_GLOBAL_MAPPINGS_ONLY, 1, hv.gva_ranges_for(0, 1))
    assert status(call, semantics).status == expected


def test_bad_cr3_only_matters_without_all_address_spaces():
    bad = 1 << 60
    assert status(FlushCall.space(bad, 0, 1)).status == HvStatus.INVALID_PARAMETER
    assert status(FlushCall.space(bad, F.ALL_VIRTUAL_ADDRESS_SPACES, 1)).ok
    assert status(FlushCall.space(bad, 0, 1), "kvm").ok


def test_rep_fields_on_a_simple_call():
    call = FlushCall(HypercallInput(0x2, rep_count=1), CR3, 0, 1)
    assert status(call).status == HvStatus.INVALID_HYPERCALL_INPUT
    call = FlushCall(HypercallInput(0x2, rep_start_index=1), CR3, 0, 1)
    assert status(call).status == HvStatus.INVALID_HYPERCALL_INPUT


def test_rep_count_zero_and_start_beyond_count():
    ranges = tuple(hv.gva_ranges_for(0, 2))
    assert status(FlushCall(HypercallInput(0x3), CR3, 0, 1, gva_ranges=ranges)).status == 3
    call = FlushCall(HypercallInput(0x3, rep_count=1, rep_start_index=1), CR3, 0, 1, gva_ranges=ranges)
    assert status(call).status == HvStatus.INVALID_HYPERCALL_INPUT


def test_variable_header_on_a_call_that_takes_none():
    call = FlushCall(HypercallInput(0x2, var_header_size=1), CR3, 0, 1)
    assert status(call).status == HvStatus.INVALID_HYPERCALL_INPUT


@pytest.mark.parametrize("semantics", ["tlfs", "kvm"])
def test_ex_variable_header_must_equal_bank_count(semantics):
    vs = hv.vps_to_vp_set([0, 5, 130])
    good = FlushCall.space_ex(CR3, 0, vs)
    assert status(good, semantics, n_vps=256).targets == (0, 5, 130)
    bad = FlushCall(HypercallInput(0x13, var_header_size=1), CR3, 0, vp_set=vs)
    assert status(bad, semantics, n_vps=256).status == HvStatus.INVALID_HYPERCALL_INPUT


def test_ex_format_other_than_zero():
    all_set = FlushCall.space_ex(CR3, 0, VpSet(1))
    assert status(all_set).targets == tuple(range(8))
    odd = FlushCall.space_ex(CR3, 0, VpSet(7))
    assert status(odd).status == HvStatus.INVALID_PARAMETER
    assert status(odd, "kvm").targets == tuple(range(8))


@pytest.mark.parametrize("semantics,expected", [("tlfs", HvStatus.INVALID_VP_INDEX), ("kvm", HvStatus.SUCCESS)])
def test_vp_index_beyond_the_partition(semantics, expected):
    v = status(FlushCall.space(CR3, 0, 0x101), semantics, n_vps=4)
    assert v.status == expected
    if semantics == "kvm":
        assert v.targets == (0,) and v.ignored_vps == (8,)


def test_unknown_call_code_and_alignment():
    assert status(FlushCall(HypercallInput(0x7), CR3, 0, 1)).status == HvStatus.INVALID_HYPERCALL_CODE
    call = FlushCall(HypercallInput(0x2), CR3, 0, 1, input_gpa=0x1004)
    assert status(call).status == HvStatus.INVALID_ALIGNMENT
    assert status(FlushCall(HypercallInput(0x2, reserved_bits=1 << 44), CR3, 0, 1)).status == 3


def test_flush_call_bytes_round_trip():
    call = FlushCall.list_ex(CR3, 0, hv.vps_to_vp_set([1, 70]), hv.gva_ranges_for(16, 5000))
    again = FlushCall.decode(call.control.encode(), call.input_bytes())
    assert again == call


# ---------------------------------------------------------------- properties
u64 = st.integers(0, hv.U64_MAX)


@given(u64)
def test_mask_round_trip(mask):
    assert hv.vps_to_mask(hv.mask_to_vps(mask)) == mask


@given(st.sets(st.integers(0, hv.MAX_VP_INDEX), max_size=200))
def test_vp_set_round_trip(vps):
    vs = hv.vps_to_vp_set(vps)
    assert hv.vp_set_to_vps(vs) == sorted(vps)
    assert VpSet.unpack(vs.pack()) == vs


@given(st.lists(st.integers(0, hv.MAX_VP_INDEX), max_size=5000))
def test_bits_of_and_set_bits_against_the_plain_loop(indices):
    """The numpy path (more than 64 indices or bits) and the loop agree with the definition."""
    plain = 0
    for i in indices:
        plain |= 1 << i
    assert hv.bits_of(indices, hv.MAX_VP_INDEX) == plain
    assert hv.bits_of(iter(indices), hv.MAX_VP_INDEX) == plain
    assert hv.set_bits(plain) == sorted(set(indices))


@pytest.mark.parametrize("bad", [True, -1, 4096, 1 << 70, 1.0, "3"])
@pytest.mark.parametrize("n", [3, 100])
def test_bits_of_names_a_bad_index_in_short_and_long_lists(bad, n):
    indices = [*range(n), bad]
    with pytest.raises(ValueError, match="VP index"):
        hv.bits_of(indices, hv.MAX_VP_INDEX)
    with pytest.raises(ValueError, match="VP index"):
        hv.vps_to_vp_set(indices)


def test_bits_of_takes_int_subclasses_in_long_lists():
    """An IntEnum of VP indices is as good as ints on both paths."""
    from enum import IntEnum

    Vp = IntEnum("Vp", {f"vp{i}": i for i in range(100)})
    assert hv.bits_of(list(Vp), hv.MAX_VP_INDEX) == hv.bits_of(list(range(100)), hv.MAX_VP_INDEX) == (1 << 100) - 1


def test_vp_set_to_vps_rejects_a_bank_word_beyond_64_bits():
    with pytest.raises(ValueError, match="64-bit"):
        hv.vp_set_to_vps(VpSet(0, 0x1, (1 << 64,)))


@given(u64, st.integers(0, 63), st.lists(u64, max_size=64, unique=True))
def test_vp_set_unpack_rejects_a_wrong_length(valid, extra, banks):
    valid_mask = hv.vps_to_mask(range(min(len(banks), 64)))
    raw = VpSet(0, valid_mask, tuple(banks)).pack()
    assert VpSet.unpack(raw).banks == tuple(banks)
    with pytest.raises(ValueError):
        VpSet.unpack(raw + b"\0" * 8 * (extra + 1))


@given(
    st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 0x3FF),
    st.integers(0, 0xFFF), st.integers(0, 0xFFF), st.booleans(),
)
def test_control_word_round_trip(code, fast, var, reps, start, nested):
    ci = HypercallInput(code, fast, var, reps, start, nested)
    word = ci.encode()
    assert HypercallInput.decode(word, strict=True) == ci
    assert word & hv.CONTROL_RESERVED_MASK == 0


@given(u64)
def test_control_decode_rejects_what_encode_never_produces(word):
    if word & hv.CONTROL_RESERVED_MASK:
        with pytest.raises(ValueError):
            HypercallInput.decode(word, strict=True)
    else:
        assert HypercallInput.decode(word, strict=True).encode() == word


@given(u64, u64, u64)
def test_flush_space_input_round_trip(a, f, m):
    assert FlushSpaceInput.unpack(FlushSpaceInput(a, f, m).pack()) == FlushSpaceInput(a, f, m)


@given(st.binary(max_size=48))
def test_flush_space_input_rejects_wrong_sizes(raw):
    if len(raw) == 24:
        assert FlushSpaceInput.unpack(raw).pack() == raw
    else:
        with pytest.raises(ValueError):
            FlushSpaceInput.unpack(raw)


@given(u64, u64, st.sets(st.integers(0, hv.MAX_VP_INDEX), max_size=100))
def test_ex_input_round_trip(a, f, vps):
    head = FlushSpaceExInput(a, f, hv.vps_to_vp_set(vps))
    assert FlushSpaceExInput.unpack(head.pack()) == head


@given(st.integers(0, (1 << 52) - 1), st.integers(0, 4095))
def test_gva_range_round_trip(page, extra):
    assert hv.decode_gva_range(hv.encode_gva_range(page, extra)) == (page, extra)


@given(st.integers(0, 1 << 40), st.integers(1, 50_000))
def test_gva_ranges_cover_exactly(start, n):
    entries = hv.gva_ranges_for(start, n)
    assert hv.gva_range_pages(entries) == n
    assert len(entries) == -(-n // 4096)
    assert hv.decode_gva_range(entries[0])[0] == start


@given(st.integers(4096, 1 << 20))
def test_gva_range_rejects_too_many_additional_pages(extra):
    with pytest.raises(ValueError):
        hv.encode_gva_range(0, extra)
