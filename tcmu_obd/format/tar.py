"""The one-file tar wrapper overlaybd puts around a layer blob (spec §1.7). Sans-IO.

A converted layer is often `tar(ZFile(LSMT))`: a tar holding one file, so registries and tools
that expect tar layers accept it. Reading only needs to know where that one file's bytes are:

* The first 512 bytes are a ustar header: magic starts with "ustar", version "00", and the
  header checksum matches (the sum of all header bytes with the checksum field read as
  spaces, computed with unsigned or with signed bytes — old writers used either). Anything
  else is not a tar wrapper and the blob is read as it is (`detect` returns None).
* If that header is a PAX extended header (typeflag 'x'), its records follow in the next block
  and a `size=` record gives the payload size; the file's own header comes next, so the payload
  starts at 1536. Upstream's writer puts 0 in that header's size field, so only the PAX record
  counts. Otherwise the payload starts at 512 with the header's size.

Writing mirrors upstream's writer byte for byte: PAX header "overlaybd.pax" with one
`size=` record, a regular header "overlaybd.commit" (uid/gid 0 named root, mtime 0, size
field 0), the payload, zero padding to 512 and two zero blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError

BLOCK = 512
PAX_PAYLOAD_OFFSET = 3 * BLOCK
DETECT_BYTES = 3 * BLOCK  # enough of the blob to call detect()

_CHKSUM = slice(148, 156)
_TYPE = 156


@dataclass(frozen=True)
class TarPayload:
    """Where the wrapped file's bytes are inside the tar blob."""

    offset: int
    size: int
    name: str
    pax: bool


def _octal(field: bytes, what: str, source: str | None, offset: int) -> int:
    """A numeric tar field: octal text (space/NUL padded) or GNU base-256 (high bit set)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field, "big") & ~(0x80 << (8 * (len(field) - 1)))
        if field[0] & 0x40:  # negative base-256: never valid for a size
            raise FormatError(f"tar {what} is negative", source=source, offset=offset)
        return value
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    # int() alone would also take a sign, "0o" and "_" ("-1" made a negative size).
    if text.strip(b"01234567"):
        raise FormatError(f"tar {what} field {field!r} is not octal", source=source, offset=offset)
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = int(header[_CHKSUM].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    blanked = header[:148] + b" " * 8 + header[156:BLOCK]
    unsigned = sum(blanked)
    signed = unsigned - 256 * sum(1 for b in blanked if b & 0x80)
    return stored in (unsigned, signed)


def _is_ustar(header: bytes) -> bool:
    return header[257:262] == b"ustar" and header[263:265] == b"00" and _checksum_ok(header)


def _name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace")


def _pax_records(data: bytes, *, source: str | None, offset: int) -> dict[str, str]:
    """Parse '<len> key=value\\n' records; `len` counts the whole record."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # zero fill after the last record
            break
        sp = data.find(b" ", pos, pos + 20)
        if sp < 0:
            raise FormatError("malformed PAX record (no length)", source=source, offset=offset + pos)
        try:
            length = int(data[pos:sp])
        except ValueError:
            raise FormatError("malformed PAX record length", source=source, offset=offset + pos) from None
        end = pos + length
        if length <= sp - pos + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise FormatError("malformed PAX record (bad length)", source=source, offset=offset + pos)
        key, eq, value = data[sp + 1:end - 1].partition(b"=")
        if not eq:
            raise FormatError("malformed PAX record (no '=')", source=source, offset=offset + pos)
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos = end
    return out


def detect(
    first_1536: bytes | bytearray | memoryview,
    *,
    blob_size: int | None = None,
    source: str | None = None,
) -> TarPayload | None:
    """Find the payload of a tar-wrapped blob from its first 1536 bytes (fewer if the blob is
    shorter).

    Returns None when the blob is not a tar wrapper (no ustar header with a good checksum), so
    it should be read as is. Raises FormatError for a tar wrapper that is broken: malformed PAX
    data, a PAX header whose records do not fit, a payload past `blob_size`.
    """
    data = bytes(first_1536[:DETECT_BYTES])
    if len(data) < BLOCK or not _is_ustar(data[:BLOCK]):
        return None
    first = data[:BLOCK]
    typeflag = first[_TYPE:_TYPE + 1]
    if typeflag == b"x":
        pax_len = _octal(first[124:136], "PAX size", source, 124)
        if pax_len > BLOCK:
            # Upstream only looks at one block of records; a writer that needs more is not one of ours.
            raise FormatError(f"PAX header of {pax_len} bytes is larger than one block",
                              source=source, offset=124)
        if len(data) < PAX_PAYLOAD_OFFSET:
            raise FormatError(f"tar wrapper truncated: {len(data)} bytes, PAX layout needs "
                              f"{PAX_PAYLOAD_OFFSET}", source=source, offset=len(data))
        records = _pax_records(data[BLOCK:BLOCK + pax_len], source=source, offset=BLOCK)
        second = data[2 * BLOCK:3 * BLOCK]
        name = records.get("path") or _name(second)
        if "size" in records:
            text = records["size"]
            # Plain ASCII digits only: int() would also take signs, "_" and non-ASCII digits.
            if not (text.isascii() and text.isdigit()):
                raise FormatError(f"PAX size {text!r} is not a decimal number", source=source, offset=BLOCK)
            size = int(text)
        else:
            size = _octal(second[124:136], "size", source, 2 * BLOCK + 124)
        payload = TarPayload(PAX_PAYLOAD_OFFSET, size, name, True)
    else:
        size = _octal(first[124:136], "size", source, 124)
        payload = TarPayload(BLOCK, size, _name(first), False)
    if blob_size is not None and payload.offset + payload.size > blob_size:
        raise FormatError(
            f"tar payload [{payload.offset}, {payload.offset + payload.size}) runs past the end of "
            f"the blob ({blob_size} bytes)", source=source, offset=payload.offset,
        )
    return payload


def _oct_field(value: int, width: int, *, size_style: bool) -> bytes:
    # libtar-style fields: size/mtime are 11 octal digits + space; mode/uid/gid are
    # 6 digits right-aligned + space + NUL (what upstream's writer produces).
    if size_style:
        text = f"{value:{width - 1}o} ".encode()
    else:
        text = f"{value:{width - 2}o} \0".encode()
    if len(text) != width:
        raise ValueError(f"{value} does not fit a {width}-byte tar field")
    return text


def _header(name: bytes, *, typeflag: bytes, size_field: bytes, mode: bytes, uid: bytes, gid: bytes,
            mtime: bytes, uname: bytes, gname: bytes) -> bytes:
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = mode
    h[108:116] = uid
    h[116:124] = gid
    h[124:136] = size_field
    h[136:148] = mtime
    h[_TYPE] = typeflag[0]
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[265:265 + len(uname)] = uname
    h[297:297 + len(gname)] = gname
    h[_CHKSUM] = b" " * 8
    chk = sum(h)
    h[_CHKSUM] = f"{chk:6o} \0".encode()
    return bytes(h)


def _pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    n = len(body) + 1
    while len(str(n)) + len(body) != n:  # the length counts its own digits
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def build_wrapper_header(payload_size: int, mode: int = 0o644, name: str = "overlaybd.commit") -> bytes:
    """The 1536 bytes before the payload: PAX header + PAX records + the file's header."""
    if payload_size < 0:
        raise ValueError("negative payload size")
    record = _pax_record("size", str(payload_size))
    zero8, zero12 = bytes(8), bytes(12)
    pax = _header(b"overlaybd.pax", typeflag=b"x", size_field=_oct_field(len(record), 12, size_style=True),
                  mode=zero8, uid=zero8, gid=zero8, mtime=zero12, uname=b"", gname=b"")
    records = record + bytes(BLOCK - len(record))
    if not mode & 0o170000:
        mode |= 0o100000  # a regular file, as st_mode would say
    fname = name.encode()
    if len(fname) > 100:
        raise ValueError("tar member name longer than 100 bytes")
    regular = _header(fname, typeflag=b"0", size_field=_oct_field(0, 12, size_style=True),
                      mode=_oct_field(mode, 8, size_style=False), uid=_oct_field(0, 8, size_style=False),
                      gid=_oct_field(0, 8, size_style=False), mtime=_oct_field(0, 12, size_style=True),
                      uname=b"root", gname=b"root")
    return pax + records + regular


def wrapper_tail(payload_size: int) -> bytes:
    """What follows the payload: zero padding to a 512 boundary and two zero blocks."""
    return bytes(-payload_size % BLOCK + 2 * BLOCK)


def wrapped_size(payload_size: int) -> int:
    return PAX_PAYLOAD_OFFSET + payload_size + len(wrapper_tail(payload_size))
