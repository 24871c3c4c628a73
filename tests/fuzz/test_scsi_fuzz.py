"""SCSI CDBs and parameter lists: damaged commands end in CheckCondition (which becomes
CHECK CONDITION sense), never another exception. Seeds: well-formed CDBs of every command
the TCMU frontend decodes, with valid UNMAP / MODE SELECT parameter lists."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given

from tcmu_obd.frontends.tcmu import scsi
from tcmu_obd.frontends.tcmu.scsi import CheckCondition, DeviceInfo

from .mutate import Seed, be, fuzz_settings, mutants, only

DEV = DeviceInfo(num_lbas=1 << 20, wwn="0123456789abcdef", cfgstring="overlaybd//cfg.json", max_unmap_len=1 << 16)


def _unmap_list(ranges) -> bytes:
    desc = b"".join(struct.pack(">QI4x", lba, n) for lba, n in ranges)
    return struct.pack(">HH4x", len(desc) + 6, len(desc)) + desc


def _mode_select_list(six: bool) -> bytes:
    page = scsi.mode_page(0x08, DEV)
    header = bytes(4) if six else bytes(8)
    return header + page


def _seeds() -> list[tuple[bytes, bytes]]:
    unmap = _unmap_list([(0, 8), (100, 16)])
    ms6, ms10 = _mode_select_list(True), _mode_select_list(False)
    return [
        (struct.pack(">BBIBHB", 0x28, 0, 1000, 0, 8, 0), b""),  # READ(10)
        (struct.pack(">BBQIBB", 0x88, 0x08, 1 << 19, 64, 0, 0), b""),  # READ(16) FUA
        (struct.pack(">BBIIBB", 0xAA, 0, 7, 3, 0, 0), b""),  # WRITE(12)
        (bytes([0x08, 0x01, 0x02, 0x03, 0x00, 0x00]), b""),  # READ(6), 0 = 256 blocks
        (struct.pack(">BBQIBB", 0x93, 0x08, 10, 100, 0, 0), b""),  # WRITE SAME(16) UNMAP
        (bytes([0x12, 0x01, 0x83, 0x01, 0x00, 0x00]), b""),  # INQUIRY VPD 0x83
        (bytes([0x12, 0x00, 0x00, 0x00, 0x24, 0x00]), b""),  # standard INQUIRY
        (struct.pack(">BBQIBB", 0x9E, 0x10, 0, 32, 0, 0), b""),  # READ CAPACITY(16)
        (bytes([0x25] + [0] * 9), b""),  # READ CAPACITY(10)
        (bytes([0x1A, 0x00, 0x3F, 0x00, 0xFF, 0x00]), b""),  # MODE SENSE(6) all pages
        (struct.pack(">BBBBBBBHB", 0x5A, 0, 0x08, 0, 0, 0, 0, 512, 0), b""),  # MODE SENSE(10)
        (bytes([0x15, 0x10, 0, 0, len(ms6), 0]), ms6),  # MODE SELECT(6)
        (struct.pack(">BBBBBBBHB", 0x55, 0x10, 0, 0, 0, 0, 0, len(ms10), 0), ms10),  # MODE SELECT(10)
        (struct.pack(">BBBBBBBHB", 0x42, 0, 0, 0, 0, 0, 0, len(unmap), 0), unmap),  # UNMAP
        (bytes([0x03, 0x00, 0x00, 0x00, 0x12, 0x00]), b""),  # REQUEST SENSE
        (struct.pack(">BBIBHB", 0x35, 0, 0, 0, 0, 0), b""),  # SYNCHRONIZE CACHE(10)
    ]


SEEDS = _seeds()
_CDB_FIELDS = [(0, 1, ">"), (1, 1, ">"), be(2, 4), be(2, 8), be(3, 2), (4, 1, ">"), be(6, 4), be(7, 2), be(10, 4)]
_PARAM_FIELDS = [be(0, 2), be(2, 2), (3, 1, ">"), be(6, 2), be(8, 8), be(16, 4), (1, 1, ">"), (5, 1, ">")]


def _exercise(cdb: bytes, data: bytes) -> None:
    """Everything the command processor may call for this CDB."""
    calls = [
        (scsi.cdb_length, cdb), (scsi.cdb_lba, cdb), (scsi.cdb_xfer_length, cdb), (scsi.decode_rw, cdb),
        (scsi.allocation_length, cdb), (scsi.parameter_list_length, cdb), (scsi.request_sense, cdb),
        (scsi.inquiry, cdb, DEV), (scsi.read_capacity_10, cdb, DEV), (scsi.read_capacity_16, cdb, DEV),
        (scsi.mode_sense, cdb, DEV), (scsi.mode_select_check, cdb, data, DEV), (scsi.parse_unmap, cdb, data, DEV),
    ]
    for fn, *args in calls:
        out, err = only((CheckCondition,), fn, *args)
        if err is not None:
            assert scsi.parse_sense(err.sense)[0] in iter(scsi.SenseKey)
    rw, _ = only((CheckCondition,), scsi.decode_rw, cdb)
    if rw is not None:
        assert rw.lba >= 0 and rw.blocks >= 0
        only((CheckCondition,), scsi.check_range, rw.lba, rw.blocks, DEV.num_lbas)
    ranges, _ = only((CheckCondition,), scsi.parse_unmap, cdb, data, DEV)
    for lba, n in ranges or ():
        assert 0 <= lba and 0 < n and lba + n <= DEV.num_lbas


@fuzz_settings(250)
@given(mutants([Seed(c, _CDB_FIELDS, [(0, 16)]) for c, _ in SEEDS]))
def test_damaged_cdb(case):
    i, cdb = case
    _exercise(cdb, SEEDS[i][1])


@fuzz_settings(200)
@given(mutants([Seed(d or bytes(8), _PARAM_FIELDS, [(0, 24)]) for _, d in SEEDS]))
def test_damaged_parameter_list(case):
    i, data = case
    _exercise(SEEDS[i][0], data)


@pytest.mark.parametrize("fn", [scsi.allocation_length, scsi.parameter_list_length,
                                lambda c: scsi.mode_sense(c, DEV), lambda c: scsi.mode_select_check(c, b"", DEV)],
                         ids=["allocation_length", "parameter_list_length", "mode_sense", "mode_select"])
def test_empty_cdb_is_invalid_opcode(fn):
    """Regression: these read cdb[0] before any length check (IndexError on an empty CDB)."""
    with pytest.raises(CheckCondition) as ei:
        fn(b"")
    assert (ei.value.key, ei.value.asc) == scsi.INVALID_COMMAND_OPCODE[:2]
