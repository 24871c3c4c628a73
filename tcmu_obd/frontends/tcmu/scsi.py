"""Pure SCSI for the TCMU frontend: CDB decoding, fixed-format sense, and the emulated
commands (INQUIRY + VPD, READ CAPACITY 10/16, MODE SENSE 6/10, MODE SELECT, UNMAP
parameter lists). Bytes in, bytes out; no I/O, no libtcmu.

Theory of operation
-------------------
Every function here either returns the response bytes (untruncated unless documented; the
caller truncates to the allocation length it was given — the helpers below do it for the
commands that carry one) or raises `CheckCondition`, which carries the sense key and
ASC/ASCQ the device layer turns into fixed-format sense (`build_sense`) and a CHECK
CONDITION status. A malformed CDB can only produce `CheckCondition`, never another
exception: `cdb_length`, `decode_rw` and friends validate length first.

Facts (values, layouts) follow SPC-4/SBC-3 and what upstream overlaybd-tcmu/libtcmu reports
(docs: overlaybd-format.md §8.3): vendor "LIO-ORG", product "TCMU device", revision "0002",
SPC-3 version, 3PC and CmdQue bits, VPD pages 00/80/83/B0/B1/B2, LBPME+LBPRZ, no block
descriptors, WCE=0. Where upstream answers NOT_HANDLED (READ CAPACITY(10), UNMAP, WRITE
SAME without UNMAP) tcmu-obd implements the command.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

BLOCK_SIZE = 512
SENSE_BUFFERSIZE = 96
FIXED_SENSE_LEN = 18


class Op(IntEnum):
    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    READ_6 = 0x08
    WRITE_6 = 0x0A
    INQUIRY = 0x12
    MODE_SELECT_6 = 0x15
    MODE_SENSE_6 = 0x1A
    START_STOP_UNIT = 0x1B
    PREVENT_ALLOW_MEDIUM_REMOVAL = 0x1E
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    WRITE_VERIFY_10 = 0x2E
    VERIFY_10 = 0x2F
    SYNCHRONIZE_CACHE_10 = 0x35
    WRITE_SAME_10 = 0x41
    UNMAP = 0x42
    MODE_SELECT_10 = 0x55
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    WRITE_VERIFY_16 = 0x8E
    VERIFY_16 = 0x8F
    SYNCHRONIZE_CACHE_16 = 0x91
    WRITE_SAME_16 = 0x93
    SERVICE_ACTION_IN_16 = 0x9E
    MAINTENANCE_IN = 0xA3
    MAINTENANCE_OUT = 0xA4
    READ_12 = 0xA8
    WRITE_12 = 0xAA
    WRITE_VERIFY_12 = 0xAE
    VERIFY_12 = 0xAF


READ_OPS = frozenset({Op.READ_6, Op.READ_10, Op.READ_12, Op.READ_16})
WRITE_OPS = frozenset(
    {Op.WRITE_6, Op.WRITE_10, Op.WRITE_12, Op.WRITE_16, Op.WRITE_VERIFY_10, Op.WRITE_VERIFY_12, Op.WRITE_VERIFY_16}
)
VERIFY_OPS = frozenset({Op.VERIFY_10, Op.VERIFY_12, Op.VERIFY_16})
SAI_READ_CAPACITY_16 = 0x10


class ScsiStatus(IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    BUSY = 0x08
    TASK_SET_FULL = 0x28


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


# (key, asc, ascq) triples used by tcmu-obd
LBA_OUT_OF_RANGE = (SenseKey.ILLEGAL_REQUEST, 0x21, 0x00)
INVALID_COMMAND_OPCODE = (SenseKey.ILLEGAL_REQUEST, 0x20, 0x00)
INVALID_FIELD_IN_CDB = (SenseKey.ILLEGAL_REQUEST, 0x24, 0x00)
INVALID_FIELD_IN_PARAM_LIST = (SenseKey.ILLEGAL_REQUEST, 0x26, 0x00)
PARAM_LIST_LENGTH_ERROR = (SenseKey.ILLEGAL_REQUEST, 0x1A, 0x00)
SAVING_PARAMS_NOT_SUPPORTED = (SenseKey.ILLEGAL_REQUEST, 0x39, 0x00)
WRITE_PROTECTED = (SenseKey.DATA_PROTECT, 0x27, 0x00)
SPACE_ALLOCATION_FAILED = (SenseKey.DATA_PROTECT, 0x27, 0x07)
UNRECOVERED_READ_ERROR = (SenseKey.MEDIUM_ERROR, 0x11, 0x00)
WRITE_ERROR = (SenseKey.MEDIUM_ERROR, 0x0C, 0x00)
INTERNAL_TARGET_FAILURE = (SenseKey.HARDWARE_ERROR, 0x44, 0x00)
COMMAND_ABORTED = (SenseKey.ABORTED_COMMAND, 0x00, 0x00)


class CheckCondition(Exception):
    """Terminate the command with CHECK CONDITION and this sense.

    `info` fills the INFORMATION field (e.g. the failing LBA); `field` (byte offset into
    the CDB or parameter list, with `in_cdb` telling which) fills the sense-key specific
    field pointer for ILLEGAL REQUEST.
    """

    def __init__(
        self,
        sense: tuple[int, int, int],
        message: str = "",
        *,
        info: int | None = None,
        field: int | None = None,
        in_cdb: bool = True,
    ):
        self.key, self.asc, self.ascq = (int(v) for v in sense)
        self.info = info
        self.field = field
        self.in_cdb = in_cdb
        super().__init__(message or f"sense {self.key:x}/{self.asc:02x}/{self.ascq:02x}")

    @property
    def sense(self) -> bytes:
        return build_sense(self.key, self.asc, self.ascq, info=self.info, field=self.field, in_cdb=self.in_cdb)


def build_sense(
    key: int, asc: int, ascq: int, *, info: int | None = None, field: int | None = None, in_cdb: bool = True
) -> bytes:
    """Fixed-format (0x70, current) sense data, 18 bytes.

    Returns: byte 0 0x70 (| 0x80 VALID when `info` is given), byte 2 the key, bytes 3-6 the
    INFORMATION field, byte 7 additional length 10, bytes 12/13 ASC/ASCQ, bytes 15-17 the
    sense-key specific field pointer (SKSV | C/D, field offset) when `field` is given.
    Raises: ValueError for values that do not fit.
    """
    if not (0 <= key <= 0xF and 0 <= asc <= 0xFF and 0 <= ascq <= 0xFF):
        raise ValueError(f"bad sense {key}/{asc}/{ascq}")
    buf = bytearray(FIXED_SENSE_LEN)
    buf[0] = 0x70
    buf[2] = key
    buf[7] = FIXED_SENSE_LEN - 8
    buf[12] = asc
    buf[13] = ascq
    if info is not None and 0 <= info <= 0xFFFFFFFF:
        buf[0] |= 0x80
        struct.pack_into(">I", buf, 3, info)
    if field is not None:
        if not 0 <= field <= 0xFFFF:
            raise ValueError(f"bad field pointer {field}")
        buf[15] = 0x80 | (0x40 if in_cdb else 0)
        struct.pack_into(">H", buf, 16, field)
    return bytes(buf)


def parse_sense(sense: bytes) -> tuple[int, int, int]:
    """(key, asc, ascq) of fixed-format sense data (for logs and tests)."""
    if len(sense) < 14 or sense[0] & 0x7F not in (0x70, 0x71):
        raise ValueError("not fixed-format sense data")
    return sense[2] & 0x0F, sense[12], sense[13]


# ---------------------------------------------------------------------------------------------
# CDB decoding


def cdb_size(opcode: int, additional_length: int | None = None) -> int | None:
    """CDB length from the opcode's group code: 0 → 6, 1/2 → 10, 4 → 16, 5 → 12, 0x7F →
    8 + additional length (byte 7). None for reserved/vendor groups, or 0x7F without byte 7."""
    group = opcode >> 5
    if group == 0:
        return 6
    if group in (1, 2):
        return 10
    if group == 4:
        return 16
    if group == 5:
        return 12
    if opcode == 0x7F and additional_length is not None:
        return 8 + additional_length
    return None


def cdb_length(cdb: bytes) -> int:
    """Length of the CDB (see cdb_size).

    Raises: CheckCondition(INVALID COMMAND OPERATION CODE) for reserved/vendor groups or an
    empty CDB.
    """
    if not cdb:
        raise CheckCondition(INVALID_COMMAND_OPCODE, "empty CDB")
    size = cdb_size(cdb[0], cdb[7] if len(cdb) >= 8 else None)
    if size is None:
        raise CheckCondition(INVALID_COMMAND_OPCODE, f"opcode {cdb[0]:#04x}: reserved CDB group")
    return size


def _opcode(cdb: bytes) -> int:
    if not cdb:  # the dispatcher checks first, but these helpers are public
        raise CheckCondition(INVALID_COMMAND_OPCODE, "empty CDB")
    return cdb[0]


def _need(cdb: bytes, n: int) -> None:
    if len(cdb) < n:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"CDB {cdb[:1].hex()} truncated: {len(cdb)} < {n} bytes")


def _fixed_cdb_length(cdb: bytes) -> int:
    n = cdb_length(cdb)
    if cdb[0] == 0x7F:
        raise CheckCondition(INVALID_COMMAND_OPCODE, "variable-length CDBs carry no fixed LBA field")
    _need(cdb, n)
    return n


def cdb_lba(cdb: bytes) -> int:
    """LBA field: 6-byte CDB 21 bits at 1..3, 10/12-byte BE32 at 2, 16-byte BE64 at 2."""
    n = _fixed_cdb_length(cdb)
    if n == 6:
        return ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
    if n in (10, 12):
        return struct.unpack_from(">I", cdb, 2)[0]
    return struct.unpack_from(">Q", cdb, 2)[0]


def cdb_xfer_length(cdb: bytes) -> int:
    """Raw TRANSFER LENGTH field: 6-byte cdb[4], 10 BE16 at 7, 12 BE32 at 6, 16 BE32 at 10.

    (The READ(6)/WRITE(6) "0 means 256" rule is applied by decode_rw, not here.)
    """
    n = _fixed_cdb_length(cdb)
    if n == 6:
        return cdb[4]
    if n == 10:
        return struct.unpack_from(">H", cdb, 7)[0]
    if n == 12:
        return struct.unpack_from(">I", cdb, 6)[0]
    return struct.unpack_from(">I", cdb, 10)[0]


_RW10 = struct.Struct(">BBIBHB")  # opcode, flags, LBA, group, transfer length, control
_RW12 = struct.Struct(">BBIIBB")  # opcode, flags, LBA, transfer length, group, control
_RW16 = struct.Struct(">BBQIBB")  # opcode, flags, LBA, transfer length, group, control


@dataclass(frozen=True, slots=True)
class RwCommand:
    """A decoded READ/WRITE/VERIFY/WRITE SAME/SYNCHRONIZE CACHE CDB (block units)."""

    op: int
    lba: int
    blocks: int
    fua: bool = False
    unmap: bool = False  # WRITE SAME: UNMAP bit
    ndob: bool = False  # WRITE SAME(16): no data-out buffer (zeros)
    anchor: bool = False


def decode_rw(cdb: bytes) -> RwCommand:
    """Decode the LBA/length of a block command and its flag bits.

    READ(6)/WRITE(6): transfer length 0 means 256 blocks (SBC). SYNCHRONIZE CACHE: blocks 0
    means "to the end of the medium" and is left as 0 here.
    Raises: CheckCondition on a truncated or unknown CDB.
    """
    # fast path (the data path decodes every READ/WRITE): one unpack for 10/12/16-byte CDBs
    n = len(cdb)
    group = cdb[0] >> 5 if n else -1
    if group == 4 and n >= 16:
        op, flags, lba, blocks, _, _ = _RW16.unpack_from(cdb)
    elif (group == 1 or group == 2) and n >= 10:
        op, flags, lba, _, blocks, _ = _RW10.unpack_from(cdb)
    elif group == 5 and n >= 12:
        op, flags, lba, blocks, _, _ = _RW12.unpack_from(cdb)
    else:  # 6-byte CDBs, and every error
        op = cdb[0] if cdb else -1
        lba = cdb_lba(cdb)
        blocks = cdb_xfer_length(cdb)
        if op in (Op.READ_6, Op.WRITE_6):
            return RwCommand(op, lba, blocks or 256)
        flags = cdb[1]
    if op == Op.READ_10 or op == Op.READ_16 or op == Op.WRITE_10 or op == Op.WRITE_16:
        return RwCommand(op, lba, blocks, bool(flags & 0x08))
    if op in (Op.WRITE_SAME_10, Op.WRITE_SAME_16):
        return RwCommand(
            op,
            lba,
            blocks,
            unmap=bool(flags & 0x08),
            anchor=bool(flags & 0x10),
            ndob=op == Op.WRITE_SAME_16 and bool(flags & 0x01),
        )
    return RwCommand(op, lba, blocks, fua=bool(flags & 0x08))


def check_range(lba: int, blocks: int, num_lbas: int) -> None:
    """Raises: CheckCondition(LBA OUT OF RANGE, info=lba) when [lba, lba+blocks) leaves the disk."""
    if lba < 0 or blocks < 0 or lba + blocks > num_lbas:
        raise CheckCondition(
            LBA_OUT_OF_RANGE,
            f"LBA {lba} + {blocks} blocks beyond {num_lbas} blocks",
            info=lba if lba <= 0xFFFFFFFF else None,
        )


def allocation_length(cdb: bytes) -> int:
    """ALLOCATION LENGTH of INQUIRY (BE16 @3), MODE SENSE(6) (@4), MODE SENSE(10) (BE16 @7),
    READ CAPACITY(16)/SERVICE ACTION IN(16) (BE32 @10), REQUEST SENSE (@4)."""
    op = _opcode(cdb)
    if op == Op.INQUIRY:
        _need(cdb, 6)
        return struct.unpack_from(">H", cdb, 3)[0]
    if op in (Op.MODE_SENSE_6, Op.REQUEST_SENSE):
        _need(cdb, 6)
        return cdb[4]
    if op == Op.MODE_SENSE_10:
        _need(cdb, 10)
        return struct.unpack_from(">H", cdb, 7)[0]
    if op == Op.SERVICE_ACTION_IN_16:
        _need(cdb, 16)
        return struct.unpack_from(">I", cdb, 10)[0]
    if op == Op.READ_CAPACITY_10:
        return 8
    raise CheckCondition(INVALID_COMMAND_OPCODE, f"opcode {op:#04x} has no allocation length")


def parameter_list_length(cdb: bytes) -> int:
    """PARAMETER LIST LENGTH of MODE SELECT(6) (@4), MODE SELECT(10) and UNMAP (BE16 @7)."""
    op = _opcode(cdb)
    if op == Op.MODE_SELECT_6:
        _need(cdb, 6)
        return cdb[4]
    if op in (Op.MODE_SELECT_10, Op.UNMAP):
        _need(cdb, 10)
        return struct.unpack_from(">H", cdb, 7)[0]
    raise CheckCondition(INVALID_COMMAND_OPCODE, f"opcode {op:#04x} has no parameter list")


# ---------------------------------------------------------------------------------------------
# device description the emulated commands answer from


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    num_lbas: int
    block_size: int = BLOCK_SIZE
    read_only: bool = False
    wwn: str = ""  # configfs wwn/vpd_unit_serial (VPD 0x80/0x83)
    cfgstring: str = ""  # VPD 0x83 vendor-specific designator
    unmap_enabled: bool = True
    write_cache: bool = False
    solid_state: bool = False
    max_xfer_len: int = 0  # blocks; 0 = not reported
    max_unmap_len: int = 0  # blocks; 0 → Linux uses WRITE SAME(16)+UNMAP for discard
    max_unmap_descriptors: int = 4
    max_write_same_len: int = 0xFFFFFFFF


VENDOR = b"LIO-ORG "
PRODUCT = b"TCMU device     "
REVISION = b"0002"
SUPPORTED_VPD = bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])


def _truncate(data: bytes, alloc_len: int) -> bytes:
    return data[:alloc_len]


def inquiry(cdb: bytes, dev: DeviceInfo) -> bytes:
    """INQUIRY: standard data (EVPD=0, page 0) or a VPD page, truncated to the allocation length.

    Raises: CheckCondition(INVALID FIELD IN CDB) for EVPD=0 with a page code, an
    unsupported VPD page, or the obsolete CMDDT bit.
    """
    _need(cdb, 6)
    alloc = allocation_length(cdb)
    evpd = cdb[1] & 0x01
    if cdb[1] & 0x02:
        raise CheckCondition(INVALID_FIELD_IN_CDB, "CMDDT not supported", field=1)
    page = cdb[2]
    if not evpd:
        if page:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"page {page:#x} without EVPD", field=2)
        return _truncate(standard_inquiry(), alloc)
    builder = _VPD.get(page)
    if builder is None:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"VPD page {page:#04x} not supported", field=2)
    return _truncate(builder(dev), alloc)


def standard_inquiry() -> bytes:
    buf = bytearray(36)
    buf[0] = 0x00  # connected, direct-access block device
    buf[2] = 0x05  # SPC-3
    buf[3] = 0x02  # response data format 2
    buf[4] = len(buf) - 5
    buf[5] = 0x08  # 3PC
    buf[7] = 0x02  # CmdQue
    buf[8:16] = VENDOR
    buf[16:32] = PRODUCT
    buf[32:36] = REVISION
    return bytes(buf)


def _vpd(page: int, body: bytes) -> bytes:
    return bytes([0x00, page]) + struct.pack(">H", len(body)) + body


def vpd_supported_pages(dev: DeviceInfo) -> bytes:
    return _vpd(0x00, SUPPORTED_VPD)


def vpd_unit_serial(dev: DeviceInfo) -> bytes:
    serial = dev.wwn.encode("ascii", "replace")[:254] + b"\0"
    return _vpd(0x80, serial)


def _naa6(wwn: str) -> bytes:
    """NAA type 6 (IEEE registered extended) identifier: LIO's OUI 00-14-05 then the WWN's
    hex digits as the vendor-specific identifier (25 nibbles)."""
    nibbles = [int(c, 16) for c in wwn if c in "0123456789abcdefABCDEF"][:25]
    nibbles += [0] * (25 - len(nibbles))
    buf = bytearray(16)
    buf[0] = 0x60  # NAA 6, then company id 0x001405 over the next 24 bits
    buf[1] = 0x01
    buf[2] = 0x40
    buf[3] = 0x50 | nibbles[0]
    for i in range(12):
        buf[4 + i] = nibbles[1 + 2 * i] << 4 | nibbles[2 + 2 * i]
    return bytes(buf)


def vpd_device_identification(dev: DeviceInfo) -> bytes:
    body = bytearray()
    # T10 vendor identification: ASCII, association LU, type 1
    t10 = VENDOR + dev.wwn.encode("ascii", "replace") + b"\0"
    body += bytes([0x02, 0x01, 0x00, len(t10)]) + t10
    # NAA: binary, association LU, type 3
    body += bytes([0x01, 0x03, 0x00, 16]) + _naa6(dev.wwn)
    # vendor specific: the cfgstring, ASCII, type 0
    cfg = dev.cfgstring.encode("utf-8", "replace")[: 0xFF - 1] + b"\0"
    body += bytes([0x02, 0x00, 0x00, len(cfg)]) + cfg
    return _vpd(0x83, bytes(body))


def vpd_block_limits(dev: DeviceInfo) -> bytes:
    body = bytearray(0x3C)
    body[0] = 0x01  # WSNZ: WRITE SAME with 0 blocks not supported
    body[1] = 0x00  # maximum COMPARE AND WRITE length: CAW not implemented (libtcmu says 1)
    struct.pack_into(">H", body, 2, 0)  # optimal transfer length granularity
    struct.pack_into(">I", body, 4, dev.max_xfer_len)  # maximum transfer length
    struct.pack_into(">I", body, 8, dev.max_xfer_len)  # optimal transfer length
    struct.pack_into(">I", body, 16, dev.max_unmap_len)  # maximum unmap LBA count
    struct.pack_into(">I", body, 20, dev.max_unmap_descriptors)
    struct.pack_into(">I", body, 24, 0)  # optimal unmap granularity
    struct.pack_into(">I", body, 28, 0x80000000)  # UGAVALID, alignment 0
    struct.pack_into(">Q", body, 32, dev.max_write_same_len)
    return _vpd(0xB0, bytes(body))


def vpd_block_characteristics(dev: DeviceInfo) -> bytes:
    body = bytearray(0x3C)
    struct.pack_into(">H", body, 0, 1 if dev.solid_state else 0)  # medium rotation rate
    return _vpd(0xB1, bytes(body))


def vpd_logical_block_provisioning(dev: DeviceInfo) -> bytes:
    body = bytearray(4)
    body[1] = 0x04  # LBPRZ: unmapped blocks read as zeros
    if dev.unmap_enabled:
        body[1] |= 0xE0  # LBPU, LBPWS, LBPWS10
    return _vpd(0xB2, bytes(body))


_VPD = {
    0x00: vpd_supported_pages,
    0x80: vpd_unit_serial,
    0x83: vpd_device_identification,
    0xB0: vpd_block_limits,
    0xB1: vpd_block_characteristics,
    0xB2: vpd_logical_block_provisioning,
}


def read_capacity_10(cdb: bytes, dev: DeviceInfo) -> bytes:
    """8 bytes: last LBA (0xFFFFFFFF when it does not fit: use READ CAPACITY(16)), block size.

    PMI=1 is answered like PMI=0 (the device has no "delay" points, so the last LBA is the
    answer for any LBA). Raises: CheckCondition(INVALID FIELD IN CDB) for an LBA without PMI.
    """
    _need(cdb, 10)
    if not cdb[8] & 0x01 and struct.unpack_from(">I", cdb, 2)[0] != 0:
        raise CheckCondition(INVALID_FIELD_IN_CDB, "LBA set without PMI", field=2)
    last = dev.num_lbas - 1 if dev.num_lbas else 0
    return struct.pack(">II", min(last, 0xFFFFFFFF), dev.block_size)


def read_capacity_16(cdb: bytes, dev: DeviceInfo) -> bytes:
    """SERVICE ACTION IN(16) / READ CAPACITY(16): 32 bytes, truncated to the allocation length.

    Raises: CheckCondition(INVALID FIELD IN CDB) for another service action.
    """
    _need(cdb, 16)
    sa = cdb[1] & 0x1F
    if sa != SAI_READ_CAPACITY_16:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"service action {sa:#x} not supported", field=1)
    buf = bytearray(32)
    struct.pack_into(">QI", buf, 0, dev.num_lbas - 1 if dev.num_lbas else 0, dev.block_size)
    if dev.unmap_enabled:
        buf[14] = 0xC0  # LBPME | LBPRZ
    return _truncate(bytes(buf), allocation_length(cdb))


# ---------------------------------------------------------------------------------------------
# MODE SENSE / MODE SELECT


def _page_rw_recovery(dev: DeviceInfo) -> bytearray:
    buf = bytearray(12)
    buf[0], buf[1] = 0x01, 0x0A
    return buf


def _page_caching(dev: DeviceInfo) -> bytearray:
    buf = bytearray(20)
    buf[0], buf[1] = 0x08, 0x12
    if dev.write_cache:
        buf[2] |= 0x04  # WCE
    return buf


def _page_control(dev: DeviceInfo) -> bytearray:
    buf = bytearray(12)
    buf[0], buf[1] = 0x0A, 0x0A
    buf[2] = 0x02  # GLTSD
    buf[5] = 0x40  # TAS
    buf[8], buf[9] = 0xFF, 0xFF  # busy timeout period
    return buf


MODE_PAGES = {0x01: _page_rw_recovery, 0x08: _page_caching, 0x0A: _page_control}
ALL_PAGES = 0x3F

PC_CURRENT, PC_CHANGEABLE, PC_DEFAULT, PC_SAVED = 0, 1, 2, 3


def mode_page(page: int, dev: DeviceInfo, pc: int = PC_CURRENT) -> bytes:
    """One mode page as MODE SENSE returns it; PC_CHANGEABLE → all fields zero (nothing is)."""
    buf = MODE_PAGES[page](dev)
    if pc == PC_CHANGEABLE:
        buf[2:] = bytes(len(buf) - 2)
    return bytes(buf)


def mode_sense(cdb: bytes, dev: DeviceInfo) -> bytes:
    """MODE SENSE(6)/(10) for pages 01, 08, 0A and 3F (all), no block descriptors, WP bit when
    read-only. Truncated to the allocation length.

    Raises: CheckCondition(SAVING PARAMETERS NOT SUPPORTED) for PC=saved,
    CheckCondition(INVALID FIELD IN CDB) for an unsupported page or subpage.
    """
    six = _opcode(cdb) == Op.MODE_SENSE_6
    _need(cdb, 6 if six else 10)
    pc = cdb[2] >> 6
    page = cdb[2] & 0x3F
    subpage = cdb[3]
    if pc == PC_SAVED:
        raise CheckCondition(SAVING_PARAMS_NOT_SUPPORTED, "saved values not supported", field=2)
    if page == ALL_PAGES:
        if subpage not in (0x00, 0xFF):
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"subpage {subpage:#x}", field=3)
        body = b"".join(mode_page(p, dev, pc) for p in sorted(MODE_PAGES))
    elif page in MODE_PAGES:
        if subpage:
            raise CheckCondition(INVALID_FIELD_IN_CDB, f"subpage {subpage:#x}", field=3)
        body = mode_page(page, dev, pc)
    else:
        raise CheckCondition(INVALID_FIELD_IN_CDB, f"mode page {page:#x} not supported", field=2)
    device_specific = 0x80 if dev.read_only else 0x00  # WP
    if six:
        header = bytes([len(body) + 3, 0x00, device_specific, 0x00])
    else:
        header = struct.pack(">HBBBBH", len(body) + 6, 0x00, device_specific, 0x00, 0x00, 0)
    return _truncate(header + body, allocation_length(cdb))


def mode_select_check(cdb: bytes, data: bytes, dev: DeviceInfo) -> None:
    """MODE SELECT(6)/(10): accept only PF=1, SP=0 and pages equal to what MODE SENSE reports
    (nothing is changeable). `data` is the parameter list (data-out), already cut to the
    PARAMETER LIST LENGTH.

    Raises: CheckCondition — INVALID FIELD IN CDB (PF=0), SAVING PARAMETERS NOT SUPPORTED
    (SP=1), PARAMETER LIST LENGTH ERROR (truncated header/page), INVALID FIELD IN PARAMETER
    LIST (unknown page or a changed value).
    """
    six = _opcode(cdb) == Op.MODE_SELECT_6
    _need(cdb, 6 if six else 10)
    if cdb[1] & 0x01:
        raise CheckCondition(SAVING_PARAMS_NOT_SUPPORTED, "SP=1", field=1)
    if not cdb[1] & 0x10:
        raise CheckCondition(INVALID_FIELD_IN_CDB, "PF=0 (vendor-specific pages)", field=1)
    plen = parameter_list_length(cdb)
    if plen == 0:
        return
    data = bytes(data[:plen])
    hlen = 4 if six else 8
    if len(data) < hlen:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR, "mode parameter header truncated")
    bdlen = data[3] if six else struct.unpack_from(">H", data, 6)[0]
    off = hlen + bdlen
    if off > len(data):
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR, "block descriptors truncated")
    while off < len(data):
        if off + 2 > len(data):
            raise CheckCondition(PARAM_LIST_LENGTH_ERROR, "mode page header truncated")
        code = data[off] & 0x3F
        if data[off] & 0x40:  # SPF: subpage format, none supported
            raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST, "subpage format", field=off, in_cdb=False)
        if code not in MODE_PAGES:
            raise CheckCondition(
                INVALID_FIELD_IN_PARAM_LIST, f"mode page {code:#x} not supported", field=off, in_cdb=False
            )
        current = mode_page(code, dev)
        end = off + 2 + data[off + 1]
        if end > len(data):
            raise CheckCondition(PARAM_LIST_LENGTH_ERROR, f"mode page {code:#x} truncated")
        got = data[off:end]
        if len(got) != len(current) or got[1:] != current[1:] or got[0] & 0x3F != current[0]:
            raise CheckCondition(
                INVALID_FIELD_IN_PARAM_LIST, f"mode page {code:#x}: values not changeable", field=off, in_cdb=False
            )
        off = end


# ---------------------------------------------------------------------------------------------
# UNMAP


def parse_unmap(cdb: bytes, data: bytes, dev: DeviceInfo) -> list[tuple[int, int]]:
    """UNMAP parameter list → [(lba, blocks)], each range-checked. `data` is the data-out.

    Raises: CheckCondition — INVALID FIELD IN CDB (ANCHOR), PARAMETER LIST LENGTH ERROR
    (list shorter than its header says), INVALID FIELD IN PARAM LIST (too many
    descriptors, or a ragged descriptor length), LBA OUT OF RANGE.
    """
    _need(cdb, 10)
    if cdb[1] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB, "ANCHOR not supported", field=1)
    plen = parameter_list_length(cdb)
    if plen == 0:
        return []
    if plen < 8:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR, f"parameter list length {plen} < 8")
    data = bytes(data[:plen])
    if len(data) < 8:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR, "UNMAP header truncated")
    data_len, desc_len = struct.unpack_from(">HH", data, 0)
    if desc_len % 16:
        raise CheckCondition(INVALID_FIELD_IN_PARAM_LIST, "block descriptor length not a multiple of 16", field=2, in_cdb=False)
    if data_len + 2 > len(data) or desc_len + 8 > len(data) or desc_len + 6 > data_len:
        raise CheckCondition(PARAM_LIST_LENGTH_ERROR, "UNMAP descriptors truncated")
    count = desc_len // 16
    if dev.max_unmap_descriptors and count > dev.max_unmap_descriptors:
        raise CheckCondition(
            INVALID_FIELD_IN_PARAM_LIST, f"{count} descriptors > {dev.max_unmap_descriptors}", field=2, in_cdb=False
        )
    out = []
    for i in range(count):
        lba, blocks = struct.unpack_from(">QI", data, 8 + 16 * i)
        check_range(lba, blocks, dev.num_lbas)
        if dev.max_unmap_len and blocks > dev.max_unmap_len:
            raise CheckCondition(
                INVALID_FIELD_IN_PARAM_LIST, f"{blocks} blocks > max unmap {dev.max_unmap_len}", field=16 + 16 * i, in_cdb=False
            )
        if blocks:
            out.append((lba, blocks))
    return out


def request_sense(cdb: bytes) -> bytes:
    """REQUEST SENSE: no pending sense (fixed format, NO SENSE); descriptor format refused."""
    _need(cdb, 6)
    if cdb[1] & 0x01:
        raise CheckCondition(INVALID_FIELD_IN_CDB, "descriptor format sense not supported", field=1)
    return _truncate(build_sense(SenseKey.NO_SENSE, 0, 0), allocation_length(cdb))
