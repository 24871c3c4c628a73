"""scsi.py: CDB decoding, sense, and the emulated commands (pure functions over bytes)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_obd.frontends.tcmu import scsi
from tcmu_obd.frontends.tcmu.scsi import CheckCondition, DeviceInfo, Op

DEV = DeviceInfo(num_lbas=2048, wwn="0123456789abcdef", cfgstring="overlaybd//tmp/c.json")
RO = DeviceInfo(num_lbas=2048, read_only=True, wwn="0123456789abcdef", cfgstring="overlaybd//tmp/c.json")


def key_asc(exc: CheckCondition) -> tuple[int, int, int]:
    return scsi.parse_sense(exc.sense)


# ---------------------------------------------------------------------------------------------
# sense


def test_build_sense_fixed_format():
    s = scsi.build_sense(0x5, 0x21, 0x00)
    assert len(s) == 18
    assert s[0] == 0x70 and s[2] == 0x05 and s[7] == 10 and s[12] == 0x21 and s[13] == 0
    assert s[3:7] == bytes(4) and s[15:18] == bytes(3)


def test_build_sense_information_and_field_pointer():
    s = scsi.build_sense(0x3, 0x11, 0x00, info=0x01020304)
    assert s[0] == 0xF0 and s[3:7] == bytes([1, 2, 3, 4])
    s = scsi.build_sense(0x5, 0x24, 0x00, field=7)
    assert s[15] == 0xC0 and s[16:18] == b"\x00\x07"
    s = scsi.build_sense(0x5, 0x26, 0x00, field=9, in_cdb=False)
    assert s[15] == 0x80 and s[16:18] == b"\x00\x09"


def test_build_sense_info_too_large_is_left_out():
    s = scsi.build_sense(0x3, 0x11, 0x00, info=1 << 40)
    assert s[0] == 0x70 and s[3:7] == bytes(4)


@pytest.mark.parametrize("bad", [(0x10, 0, 0), (0, 0x100, 0), (0, 0, -1)])
def test_build_sense_rejects_out_of_range(bad):
    with pytest.raises(ValueError):
        scsi.build_sense(*bad)


def test_parse_sense_roundtrip_and_rejects_garbage():
    assert scsi.parse_sense(scsi.build_sense(7, 0x27, 0)) == (7, 0x27, 0)
    with pytest.raises(ValueError):
        scsi.parse_sense(b"\x72" + bytes(20))
    with pytest.raises(ValueError):
        scsi.parse_sense(b"\x70")


def test_check_condition_carries_sense():
    exc = CheckCondition(scsi.LBA_OUT_OF_RANGE, "x", info=5)
    assert key_asc(exc) == (5, 0x21, 0)
    assert exc.sense[3:7] == b"\x00\x00\x00\x05"


# ---------------------------------------------------------------------------------------------
# CDB decoding


@pytest.mark.parametrize(
    "op,length",
    [(0x00, 6), (0x08, 6), (0x28, 10), (0x41, 10), (0x5A, 10), (0x88, 16), (0x9E, 16), (0xA8, 12), (0xA3, 12)],
)
def test_cdb_length_by_group(op, length):
    assert scsi.cdb_length(bytes([op]) + bytes(15)) == length


def test_cdb_length_variable_length():
    cdb = bytearray(16)
    cdb[0] = 0x7F
    cdb[7] = 24
    assert scsi.cdb_length(bytes(cdb)) == 32


@pytest.mark.parametrize("op", [0x60, 0x7E, 0xC0, 0xE0, 0xFF])
def test_cdb_length_reserved_groups(op):
    with pytest.raises(CheckCondition) as ei:
        scsi.cdb_length(bytes([op]) + bytes(15))
    assert key_asc(ei.value) == scsi.INVALID_COMMAND_OPCODE


def test_cdb_length_empty():
    with pytest.raises(CheckCondition):
        scsi.cdb_length(b"")


def rw6(op, lba, n):
    return bytes([op, (lba >> 16) & 0x1F, (lba >> 8) & 0xFF, lba & 0xFF, n, 0])


def rw10(op, lba, n, flags=0):
    return struct.pack(">BBIBHB", op, flags, lba, 0, n, 0)


def rw12(op, lba, n, flags=0):
    return struct.pack(">BBIIBB", op, flags, lba, n, 0, 0)


def rw16(op, lba, n, flags=0):
    return struct.pack(">BBQIBB", op, flags, lba, n, 0, 0)


def test_lba_and_length_all_sizes():
    assert (scsi.cdb_lba(rw6(0x08, 0x1FFFFF, 7)), scsi.cdb_xfer_length(rw6(0x08, 0x1FFFFF, 7))) == (0x1FFFFF, 7)
    assert (scsi.cdb_lba(rw10(0x28, 0xDEADBEEF, 0xFFFF)), scsi.cdb_xfer_length(rw10(0x28, 0xDEADBEEF, 0xFFFF))) == (
        0xDEADBEEF,
        0xFFFF,
    )
    assert (scsi.cdb_lba(rw12(0xA8, 7, 0x12345678)), scsi.cdb_xfer_length(rw12(0xA8, 7, 0x12345678))) == (
        7,
        0x12345678,
    )
    big = (1 << 64) - 1
    assert (scsi.cdb_lba(rw16(0x88, big, 0xFFFFFFFF)), scsi.cdb_xfer_length(rw16(0x88, big, 0xFFFFFFFF))) == (
        big,
        0xFFFFFFFF,
    )


def test_rw6_lba_ignores_top_bits_of_byte1():
    cdb = bytes([0x08, 0xFF, 0x00, 0x01, 1, 0])
    assert scsi.cdb_lba(cdb) == 0x1F0001


def test_decode_rw6_zero_means_256():
    assert scsi.decode_rw(rw6(0x08, 0, 0)).blocks == 256
    assert scsi.decode_rw(rw6(0x0A, 0, 0)).blocks == 256
    assert scsi.decode_rw(rw10(0x28, 0, 0)).blocks == 0


def test_decode_flags():
    assert scsi.decode_rw(rw10(0x2A, 1, 1, flags=0x08)).fua
    assert not scsi.decode_rw(rw10(0x2A, 1, 1)).fua
    ws = scsi.decode_rw(rw16(0x93, 1, 1, flags=0x08 | 0x01))
    assert ws.unmap and ws.ndob and not ws.anchor
    ws10 = scsi.decode_rw(rw10(0x41, 1, 1, flags=0x01 | 0x10))
    assert not ws10.ndob and ws10.anchor  # NDOB exists only in WRITE SAME(16)


@pytest.mark.parametrize("cdb", [rw10(0x28, 0, 1)[:9], rw16(0x88, 0, 1)[:15], rw12(0xA8, 0, 1)[:5], b"\x08\x00"])
def test_truncated_cdb(cdb):
    with pytest.raises(CheckCondition) as ei:
        scsi.decode_rw(cdb)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB


def test_variable_length_cdb_has_no_lba():
    cdb = bytearray(16)
    cdb[0] = 0x7F
    cdb[7] = 8
    with pytest.raises(CheckCondition):
        scsi.cdb_lba(bytes(cdb))


@pytest.mark.parametrize(
    "lba,blocks,ok",
    [(0, 2048, True), (2047, 1, True), (2048, 0, True), (2048, 1, False), (2049, 0, False), (0, 2049, False), ((1 << 64) - 1, 1, False)],
)
def test_check_range(lba, blocks, ok):
    if ok:
        scsi.check_range(lba, blocks, 2048)
    else:
        with pytest.raises(CheckCondition) as ei:
            scsi.check_range(lba, blocks, 2048)
        assert key_asc(ei.value) == scsi.LBA_OUT_OF_RANGE


def test_check_range_reports_lba_in_information():
    with pytest.raises(CheckCondition) as ei:
        scsi.check_range(4000, 1, 2048)
    s = ei.value.sense
    assert s[0] & 0x80 and struct.unpack(">I", s[3:7])[0] == 4000


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=40))
def test_decoders_never_raise_anything_but_check_condition(cdb):
    for fn in (scsi.cdb_length, scsi.cdb_lba, scsi.cdb_xfer_length, scsi.decode_rw):
        try:
            fn(cdb)
        except CheckCondition:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=40), st.binary(max_size=64))
def test_emulators_never_raise_anything_but_check_condition(cdb, data):
    for fn in (scsi.inquiry, scsi.read_capacity_10, scsi.read_capacity_16, scsi.mode_sense):
        try:
            fn(cdb, DEV)
        except CheckCondition:
            pass
    for fn in (scsi.mode_select_check, scsi.parse_unmap):
        try:
            fn(cdb, data, DEV)
        except CheckCondition:
            pass
    try:
        scsi.request_sense(cdb)
    except CheckCondition:
        pass


# ---------------------------------------------------------------------------------------------
# INQUIRY


def inq(evpd=0, page=0, alloc=255, flags=None):
    return bytes([0x12, flags if flags is not None else evpd, page]) + struct.pack(">H", alloc) + b"\x00"


def test_standard_inquiry():
    d = scsi.inquiry(inq(), DEV)
    assert len(d) == 36
    assert d[0] == 0 and d[2] == 0x05 and d[3] == 0x02 and d[4] == 31
    assert d[5] == 0x08 and d[7] == 0x02
    assert d[8:16] == b"LIO-ORG " and d[16:32] == b"TCMU device     " and d[32:36] == b"0002"


@pytest.mark.parametrize("alloc", [0, 1, 5, 35, 36, 96])
def test_inquiry_truncated_to_allocation_length(alloc):
    assert scsi.inquiry(inq(alloc=alloc), DEV) == scsi.standard_inquiry()[:alloc]


def test_inquiry_page_without_evpd_is_invalid():
    with pytest.raises(CheckCondition) as ei:
        scsi.inquiry(inq(evpd=0, page=0x80), DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB
    assert ei.value.sense[15] == 0xC0 and ei.value.sense[17] == 2


def test_inquiry_cmddt_is_invalid():
    with pytest.raises(CheckCondition):
        scsi.inquiry(inq(flags=0x02), DEV)


def test_inquiry_truncated_cdb():
    with pytest.raises(CheckCondition):
        scsi.inquiry(b"\x12\x01\x00", DEV)


@pytest.mark.parametrize("page", [0x01, 0x81, 0x86, 0xB3, 0xFF])
def test_inquiry_unsupported_vpd(page):
    with pytest.raises(CheckCondition) as ei:
        scsi.inquiry(inq(evpd=1, page=page), DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB


def vpd(page, dev=DEV, alloc=0xFFFF):
    d = scsi.inquiry(inq(evpd=1, page=page, alloc=alloc), dev)
    if alloc >= 4:
        assert d[1] == page
        assert struct.unpack(">H", d[2:4])[0] == len(d) - 4
    return d


def test_vpd_supported_pages():
    assert vpd(0x00)[4:] == bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def test_vpd_unit_serial():
    assert vpd(0x80)[4:] == b"0123456789abcdef\0"


def test_vpd_unit_serial_empty_wwn():
    assert vpd(0x80, DeviceInfo(num_lbas=1))[4:] == b"\0"


def parse_designators(d):
    out, off = [], 4
    while off < len(d):
        code_set, dtype, length = d[off] & 0x0F, d[off + 1] & 0x0F, d[off + 3]
        out.append((code_set, dtype, d[off + 4 : off + 4 + length]))
        off += 4 + length
    assert off == len(d)
    return out


def test_vpd_device_identification():
    des = parse_designators(vpd(0x83))
    assert des[0] == (2, 1, b"LIO-ORG 0123456789abcdef\0")
    code_set, dtype, naa = des[1]
    assert (code_set, dtype, len(naa)) == (1, 3, 16)
    assert naa.hex().startswith("6001405" + "0123456789abcdef")
    assert naa.hex() == "6001405" + "0123456789abcdef" + "000000000"
    assert des[2] == (2, 0, b"overlaybd//tmp/c.json\0")


def test_vpd_naa_skips_non_hex_and_truncates():
    naa = scsi._naa6("naa.5001-4050-zz-" + "f" * 40)
    assert naa.hex() == "6001405" + "aa50014050" + "f" * 15


def test_vpd_block_limits():
    d = vpd(0xB0)
    assert len(d) == 4 + 0x3C
    assert d[4] & 0x01  # WSNZ
    assert d[5] == 0  # COMPARE AND WRITE not implemented
    assert struct.unpack(">I", d[8:12])[0] == 0  # max transfer length
    assert struct.unpack(">I", d[20:24])[0] == 0  # max unmap LBA count (→ Linux uses WS16+UNMAP)
    assert struct.unpack(">I", d[24:28])[0] == 4  # max unmap descriptors
    assert d[32] & 0x80  # UGAVALID
    assert struct.unpack(">Q", d[36:44])[0] == 0xFFFFFFFF  # max write same


def test_vpd_block_characteristics():
    d = vpd(0xB1)
    assert len(d) == 4 + 0x3C and d[4:6] == b"\x00\x00"
    assert vpd(0xB1, DeviceInfo(num_lbas=1, solid_state=True))[4:6] == b"\x00\x01"


def test_vpd_logical_block_provisioning():
    assert vpd(0xB2)[4:] == bytes([0, 0xE4, 0, 0])
    assert vpd(0xB2, DeviceInfo(num_lbas=1, unmap_enabled=False))[4:] == bytes([0, 0x04, 0, 0])


@pytest.mark.parametrize("page", [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])
@pytest.mark.parametrize("alloc", [0, 3, 4, 10])
def test_vpd_truncation(page, alloc):
    full = vpd(page)
    assert scsi.inquiry(inq(evpd=1, page=page, alloc=alloc), DEV) == full[:alloc]


# ---------------------------------------------------------------------------------------------
# READ CAPACITY


def rc10(lba=0, pmi=0):
    return struct.pack(">BBIHBB", 0x25, 0, lba, 0, pmi, 0)


def rc16(alloc=32, sa=0x10):
    return struct.pack(">BBQIBB", 0x9E, sa, 0, alloc, 0, 0)


def test_read_capacity_10():
    assert scsi.read_capacity_10(rc10(), DEV) == struct.pack(">II", 2047, 512)


def test_read_capacity_10_large_disk_saturates():
    big = DeviceInfo(num_lbas=(1 << 33))
    assert scsi.read_capacity_10(rc10(), big) == struct.pack(">II", 0xFFFFFFFF, 512)
    edge = DeviceInfo(num_lbas=(1 << 32))
    assert scsi.read_capacity_10(rc10(), edge) == struct.pack(">II", 0xFFFFFFFF, 512)


def test_read_capacity_10_lba_without_pmi_is_invalid():
    with pytest.raises(CheckCondition):
        scsi.read_capacity_10(rc10(lba=5), DEV)
    assert scsi.read_capacity_10(rc10(lba=5, pmi=1), DEV) == struct.pack(">II", 2047, 512)


def test_read_capacity_10_truncated():
    with pytest.raises(CheckCondition):
        scsi.read_capacity_10(rc10()[:9], DEV)


def test_read_capacity_16():
    d = scsi.read_capacity_16(rc16(), DEV)
    assert len(d) == 32
    assert struct.unpack(">QI", d[:12]) == (2047, 512)
    assert d[12] == 0 and d[13] == 0 and d[14] == 0xC0


def test_read_capacity_16_no_unmap():
    d = scsi.read_capacity_16(rc16(), DeviceInfo(num_lbas=10, unmap_enabled=False))
    assert d[14] == 0


@pytest.mark.parametrize("alloc", [0, 8, 12, 31, 32, 100])
def test_read_capacity_16_allocation_length(alloc):
    assert scsi.read_capacity_16(rc16(alloc=alloc), DEV) == scsi.read_capacity_16(rc16(), DEV)[:alloc]


def test_read_capacity_16_other_service_action():
    with pytest.raises(CheckCondition) as ei:
        scsi.read_capacity_16(rc16(sa=0x12), DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB


def test_read_capacity_zero_size_disk():
    z = DeviceInfo(num_lbas=0)
    assert scsi.read_capacity_10(rc10(), z)[:4] == bytes(4)
    assert scsi.read_capacity_16(rc16(), z)[:8] == bytes(8)


# ---------------------------------------------------------------------------------------------
# MODE SENSE / MODE SELECT


def ms6(page, pc=0, subpage=0, alloc=255, dbd=0):
    return bytes([0x1A, dbd << 3, (pc << 6) | page, subpage, alloc, 0])


def ms10(page, pc=0, subpage=0, alloc=0xFFFF):
    return struct.pack(">BBBBBBBHB", 0x5A, 0, (pc << 6) | page, subpage, 0, 0, 0, alloc, 0)


def test_mode_sense6_all_pages():
    d = scsi.mode_sense(ms6(0x3F), DEV)
    assert d[0] == len(d) - 1 and d[1] == 0 and d[2] == 0 and d[3] == 0
    body = d[4:]
    assert body[0] == 0x01 and body[1] == 0x0A
    assert body[12] == 0x08 and body[13] == 0x12 and not body[14] & 0x04  # caching, WCE=0
    assert body[32] == 0x0A and body[33] == 0x0A and body[34] == 0x02 and body[37] == 0x40
    assert body[40:42] == b"\xff\xff"
    assert len(body) == 12 + 20 + 12


def test_mode_sense_wp_bit_for_read_only():
    assert scsi.mode_sense(ms6(0x3F), RO)[2] == 0x80
    assert scsi.mode_sense(ms10(0x3F), RO)[3] == 0x80
    assert scsi.mode_sense(ms6(0x08), DEV)[2] == 0x00


def test_mode_sense10_header():
    d = scsi.mode_sense(ms10(0x08), DEV)
    assert struct.unpack(">H", d[:2])[0] == len(d) - 2
    assert struct.unpack(">H", d[6:8])[0] == 0  # no block descriptors
    assert d[8] == 0x08 and len(d) == 8 + 20


@pytest.mark.parametrize("page,length", [(0x01, 12), (0x08, 20), (0x0A, 12)])
def test_mode_sense_single_pages(page, length):
    d = scsi.mode_sense(ms6(page), DEV)
    assert d[4] == page and len(d) == 4 + length


def test_mode_sense_all_with_subpage_ff():
    assert scsi.mode_sense(ms6(0x3F, subpage=0xFF), DEV) == scsi.mode_sense(ms6(0x3F), DEV)


@pytest.mark.parametrize("cdb", [ms6(0x1C), ms6(0x00), ms10(0x19), ms6(0x08, subpage=1), ms6(0x3F, subpage=5)])
def test_mode_sense_unsupported(cdb):
    with pytest.raises(CheckCondition) as ei:
        scsi.mode_sense(cdb, DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB


def test_mode_sense_saved_not_supported():
    with pytest.raises(CheckCondition) as ei:
        scsi.mode_sense(ms6(0x3F, pc=3), DEV)
    assert key_asc(ei.value) == scsi.SAVING_PARAMS_NOT_SUPPORTED


def test_mode_sense_changeable_is_all_zero():
    d = scsi.mode_sense(ms6(0x08, pc=1), DEV)
    assert d[4:6] == b"\x08\x12" and d[6:] == bytes(18)


def test_mode_sense_default_equals_current():
    assert scsi.mode_sense(ms6(0x3F, pc=2), DEV) == scsi.mode_sense(ms6(0x3F), DEV)


@pytest.mark.parametrize("alloc", [0, 1, 4, 10])
def test_mode_sense_allocation_length(alloc):
    assert scsi.mode_sense(ms6(0x3F, alloc=alloc), DEV) == scsi.mode_sense(ms6(0x3F), DEV)[:alloc]
    assert scsi.mode_sense(ms10(0x3F, alloc=alloc), DEV) == scsi.mode_sense(ms10(0x3F), DEV)[:alloc]


def test_mode_sense_truncated_cdb():
    with pytest.raises(CheckCondition):
        scsi.mode_sense(ms10(0x08)[:8], DEV)


def msel6(plen, pf=1, sp=0):
    return bytes([0x15, (pf << 4) | sp, 0, 0, plen, 0])


def msel10(plen, pf=1, sp=0):
    return struct.pack(">BBBBBBBHB", 0x55, (pf << 4) | sp, 0, 0, 0, 0, 0, plen, 0)


def select_data6(*pages, bd=b""):
    body = b"".join(pages)
    return bytes([0, 0, 0, len(bd)]) + bd + body


def select_data10(*pages):
    return bytes(8) + b"".join(pages)


def test_mode_select_same_values_accepted():
    for page in (0x01, 0x08, 0x0A):
        data = select_data6(scsi.mode_page(page, DEV))
        scsi.mode_select_check(msel6(len(data)), data, DEV)
        data = select_data10(scsi.mode_page(page, DEV))
        scsi.mode_select_check(msel10(len(data)), data, DEV)
    allp = [scsi.mode_page(p, DEV) for p in (1, 8, 0x0A)]
    data = select_data6(*allp)
    scsi.mode_select_check(msel6(len(data)), data, DEV)


def test_mode_select_ps_bit_ignored_and_block_descriptor_skipped():
    page = bytearray(scsi.mode_page(0x08, DEV))
    page[0] |= 0x80  # PS
    data = select_data6(bytes(page), bd=bytes(8))
    scsi.mode_select_check(msel6(len(data)), data, DEV)


def test_mode_select_changing_wce_rejected():
    page = bytearray(scsi.mode_page(0x08, DEV))
    page[2] |= 0x04
    data = select_data6(bytes(page))
    with pytest.raises(CheckCondition) as ei:
        scsi.mode_select_check(msel6(len(data)), data, DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_PARAM_LIST
    assert ei.value.sense[15] == 0x80 and ei.value.sense[17] == 4  # field pointer into the list


def test_mode_select_zero_length_ok():
    scsi.mode_select_check(msel6(0), b"", DEV)


@pytest.mark.parametrize(
    "cdb,exp",
    [(msel6(4, pf=0), scsi.INVALID_FIELD_IN_CDB), (msel6(4, sp=1), scsi.SAVING_PARAMS_NOT_SUPPORTED)],
)
def test_mode_select_bits(cdb, exp):
    with pytest.raises(CheckCondition) as ei:
        scsi.mode_select_check(cdb, select_data6(), DEV)
    assert key_asc(ei.value) == exp


@pytest.mark.parametrize(
    "data,exp",
    [
        (b"\x00\x00", scsi.PARAM_LIST_LENGTH_ERROR),  # header truncated
        (bytes([0, 0, 0, 8]) + bytes(4), scsi.PARAM_LIST_LENGTH_ERROR),  # block descriptor truncated
        (bytes(4) + b"\x08", scsi.PARAM_LIST_LENGTH_ERROR),  # page header truncated
        (bytes(4) + b"\x08\x12" + bytes(5), scsi.PARAM_LIST_LENGTH_ERROR),  # page truncated
        (bytes(4) + b"\x1c\x0a" + bytes(10), scsi.INVALID_FIELD_IN_PARAM_LIST),  # unsupported page
        (bytes(4) + b"\x48\x00\x00\x10" + bytes(16), scsi.INVALID_FIELD_IN_PARAM_LIST),  # subpage format
        (bytes(4) + b"\x08\x10" + bytes(16), scsi.INVALID_FIELD_IN_PARAM_LIST),  # wrong page length
    ],
)
def test_mode_select_malformed(data, exp):
    with pytest.raises(CheckCondition) as ei:
        scsi.mode_select_check(msel6(len(data)), data, DEV)
    assert key_asc(ei.value) == exp


def test_mode_select_only_parameter_list_length_is_looked_at():
    data = select_data6(scsi.mode_page(0x01, DEV))
    scsi.mode_select_check(msel6(len(data)), data + b"garbage", DEV)


# ---------------------------------------------------------------------------------------------
# UNMAP


def unmap_cdb(plen, anchor=0):
    return struct.pack(">BBIBHB", 0x42, anchor, 0, 0, plen, 0)


def unmap_data(*ranges, pad=0):
    descs = b"".join(struct.pack(">QII", lba, n, 0) for lba, n in ranges)
    return struct.pack(">HHI", len(descs) + 6, len(descs), 0) + descs + bytes(pad)


def test_unmap_parse():
    data = unmap_data((0, 8), (100, 0), (2040, 8))
    assert scsi.parse_unmap(unmap_cdb(len(data)), data, DEV) == [(0, 8), (2040, 8)]


def test_unmap_zero_length_list():
    assert scsi.parse_unmap(unmap_cdb(0), b"", DEV) == []


def test_unmap_out_of_range():
    data = unmap_data((2040, 9))
    with pytest.raises(CheckCondition) as ei:
        scsi.parse_unmap(unmap_cdb(len(data)), data, DEV)
    assert key_asc(ei.value) == scsi.LBA_OUT_OF_RANGE


def test_unmap_too_many_descriptors():
    data = unmap_data(*[(i, 1) for i in range(5)])
    with pytest.raises(CheckCondition) as ei:
        scsi.parse_unmap(unmap_cdb(len(data)), data, DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_PARAM_LIST


@pytest.mark.parametrize(
    "cdb_len,data,exp",
    [
        (4, bytes(4), scsi.PARAM_LIST_LENGTH_ERROR),
        (24, unmap_data((0, 1))[:20], scsi.PARAM_LIST_LENGTH_ERROR),  # shorter than the header says
        (24, struct.pack(">HHI", 22, 12, 0) + bytes(16), scsi.INVALID_FIELD_IN_PARAM_LIST),  # ragged
        (24, struct.pack(">HHI", 6, 16, 0) + bytes(16), scsi.PARAM_LIST_LENGTH_ERROR),  # inconsistent
    ],
)
def test_unmap_malformed(cdb_len, data, exp):
    with pytest.raises(CheckCondition) as ei:
        scsi.parse_unmap(unmap_cdb(cdb_len), data, DEV)
    assert key_asc(ei.value) == exp


def test_unmap_anchor_rejected():
    with pytest.raises(CheckCondition) as ei:
        scsi.parse_unmap(unmap_cdb(24, anchor=1), unmap_data((0, 1)), DEV)
    assert key_asc(ei.value) == scsi.INVALID_FIELD_IN_CDB


# ---------------------------------------------------------------------------------------------
# misc


def test_request_sense():
    d = scsi.request_sense(bytes([0x03, 0, 0, 0, 252, 0]))
    assert scsi.parse_sense(d) == (0, 0, 0)
    assert scsi.request_sense(bytes([0x03, 0, 0, 0, 8, 0])) == d[:8]
    with pytest.raises(CheckCondition):
        scsi.request_sense(bytes([0x03, 1, 0, 0, 252, 0]))


def test_allocation_length_unknown_opcode():
    with pytest.raises(CheckCondition):
        scsi.allocation_length(bytes([Op.READ_10]) + bytes(9))
    with pytest.raises(CheckCondition):
        scsi.parameter_list_length(bytes([Op.READ_10]) + bytes(9))


VALID_CDBS = [
    inq(),
    inq(evpd=1, page=0x83),
    rc10(),
    rc16(),
    ms6(0x3F),
    ms10(0x08),
    bytes([0x03, 0, 0, 0, 18, 0]),
]


@pytest.mark.parametrize("cdb", VALID_CDBS, ids=lambda c: c[:1].hex())
def test_every_truncation_of_a_valid_cdb_is_a_check_condition(cdb):
    fns = {
        0x12: scsi.inquiry,
        0x25: scsi.read_capacity_10,
        0x9E: scsi.read_capacity_16,
        0x1A: scsi.mode_sense,
        0x5A: scsi.mode_sense,
        0x03: lambda c, dev: scsi.request_sense(c),
    }
    fn = fns[cdb[0]]
    assert fn(cdb, DEV)  # whole: answers
    assert fn(cdb + b"\xff" * 8, DEV) == fn(cdb, DEV)  # trailing bytes are ignored
    for n in range(1, scsi.cdb_length(cdb)):
        with pytest.raises(CheckCondition):
            fn(cdb[:n], DEV)


@pytest.mark.parametrize(
    "cdb", [rw6(0x08, 1, 1), rw10(0x28, 1, 1), rw12(0xA8, 1, 1), rw16(0x88, 1, 1)], ids=lambda c: c[:1].hex()
)
def test_every_truncation_of_a_rw_cdb_is_a_check_condition(cdb):
    assert scsi.decode_rw(cdb).lba == 1
    for n in range(0, len(cdb)):
        with pytest.raises(CheckCondition):
            scsi.decode_rw(cdb[:n])


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([0x28, 0x2A, 0x2E, 0x2F, 0x35, 0x41, 0xA8, 0xAA, 0xAF, 0x88, 0x8A, 0x8F, 0x91, 0x93]), st.binary(min_size=0, max_size=20))
def test_decode_rw_fast_path_agrees_with_field_decoders(op, rest):
    cdb = bytes([op]) + rest
    try:
        rw = scsi.decode_rw(cdb)
    except CheckCondition:
        with pytest.raises(CheckCondition):
            scsi.cdb_lba(cdb)
            scsi.cdb_xfer_length(cdb)
        return
    assert (rw.op, rw.lba, rw.blocks) == (op, scsi.cdb_lba(cdb), scsi.cdb_xfer_length(cdb))
    assert rw.fua == (op not in (0x41, 0x93) and bool(cdb[1] & 0x08))
