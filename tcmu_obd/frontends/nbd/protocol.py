"""NBD server protocol, sans-IO: bytes in, events and bytes out. No sockets, no asyncio, no clocks.

Theory of operation
-------------------
One `ServerConnection` per client connection, for exactly one export (`Export`).

    conn = ServerConnection(export)
    send(conn.data_to_send())            # the greeting, queued at construction
    loop:
        conn.receive_data(chunk)          # b"" means the peer closed its side
        while (event := conn.next_event()) is not NEED_DATA:
            ...                           # Ready / Request / Disconnect
        send(conn.data_to_send())         # option replies produced meanwhile

States (`State`, shown in repr) and their transitions:

    CLIENT_FLAGS --4 bytes--> OPTIONS --EXPORT_NAME / GO (ACK)--> TRANSMISSION
                                 |                                   |
                                 +--ABORT--> CLOSED  <----NBD_CMD_DISC+
    any state --peer garbage / unexpected EOF--> ERROR (ProtocolError raised once,
                                                   every later call raises it again)

Option haggling is answered entirely inside this module: every option's reply bytes are
appended to the outbox (`data_to_send()`), because the answers depend only on the export
description.  The caller sees `Ready` when transmission begins, `Disconnect` when the
client asked to end the session (NBD_OPT_ABORT, already acknowledged, or NBD_CMD_DISC).

In transmission every request header is validated here.  A request the server must refuse
is still delivered, as a `Request` whose `error` is a nonzero NBD errno (EINVAL, EPERM,
ENOSPC ...) and `message` explains it; the caller just replies with that error.  The
connection survives every such error.  Fatal conditions raise `ProtocolError`; the caller
must then drop the connection (a hard disconnect, which the spec allows on a violation):

- bad request magic (the stream cannot be resynchronised),
- bad option magic, unknown client flags, an NBD_OPT_EXPORT_NAME for an unknown export
  (that option cannot return an error), an oversize export name in it,
- more than MAX_OPTIONS options, or the peer closing with a partial message buffered.

Bounded input: nothing is allocated from a peer-declared length before it is checked.
A WRITE payload is buffered only when its length is <= MAX_BLOCK_SIZE (32 MiB).  A WRITE
whose length exceeds it is answered EINVAL after its payload has been *consumed and
discarded* (streamed past, never stored), so the stream stays in sync and the connection
survives.  Option data longer than MAX_OPTION_LENGTH is likewise skipped unread and
answered NBD_REP_ERR_TOO_BIG.  The receive buffer never holds more than one message plus
whatever the peer pipelined (the I/O shell bounds that by reading only when it wants to).

Replies in transmission are built by the `reply_*` methods, which return a list of
buffers to write back-to-back with one writelines call (header and data separate, so read
data is never copied here).  They use structured replies once NBD_OPT_STRUCTURED_REPLY was
negotiated (mandatory for READ then), simple replies otherwise.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct
from dataclasses import dataclass
from typing import Sequence

from ...errors import ObdError

# --- constants (values from the NBD protocol specification, doc/proto.md) -------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) / client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# transmission flags
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
_REP_ERR = 1 << 31
REP_ERR_UNSUP = _REP_ERR + 1
REP_ERR_POLICY = _REP_ERR + 2
REP_ERR_INVALID = _REP_ERR + 3
REP_ERR_PLATFORM = _REP_ERR + 4
REP_ERR_TLS_REQD = _REP_ERR + 5
REP_ERR_UNKNOWN = _REP_ERR + 6
REP_ERR_SHUTDOWN = _REP_ERR + 7
REP_ERR_BLOCK_SIZE_REQD = _REP_ERR + 8
REP_ERR_TOO_BIG = _REP_ERR + 9

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags / types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# base:allocation status flags
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# errors allowed on the wire
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
_WIRE_ERRORS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}

BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1  # our (only) metadata context id

# limits
MIN_BLOCK_SIZE = 512
PREFERRED_BLOCK_SIZE = 4096
MAX_BLOCK_SIZE = 32 * 1024 * 1024  # largest READ/WRITE/CACHE payload we accept
MAX_STRING = 4096  # names, queries, messages (spec: MUST be no longer than 4096 bytes)
MAX_OPTION_LENGTH = 16 * 1024  # room for a 4 KiB name plus a few 4 KiB queries
MAX_OPTIONS = 256  # options per connection before we call it a denial of service
MAX_META_QUERIES = 64
MAX_MESSAGE = 1024  # error strings we send are cut to this many bytes
MAX_DESCRIPTORS = 4096  # block status descriptors per reply (the spec lets us send fewer)

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

_OPT_HDR = struct.Struct(">QII")  # magic, option, length
_OPT_REPLY_HDR = struct.Struct(">QIII")  # magic, option, reply type, length
_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE = struct.Struct(">IIQ")  # magic, error, cookie
_CHUNK = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
REQUEST_SIZE = _REQUEST.size  # 28


class ProtocolError(ObdError):
    """The peer sent something NBD does not allow here; the connection must be dropped."""


class LocalProtocolError(ObdError):
    """The caller misused this module (e.g. replying before transmission)."""


class State(enum.Enum):
    CLIENT_FLAGS = "client-flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"
    ERROR = "error"


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True, slots=True)
class Export:
    """What one connection serves. `size` in bytes."""

    size: int
    name: str = ""
    description: str = ""
    read_only: bool = False
    can_cache: bool = True
    min_block_size: int = MIN_BLOCK_SIZE
    preferred_block_size: int = PREFERRED_BLOCK_SIZE
    max_block_size: int = MAX_BLOCK_SIZE

    def matches(self, name: str) -> bool:
        """The empty name is the default export, which is ours."""
        return name == "" or name == self.name


# --- events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ready:
    """Handshake done; transmission begins. `transmission_flags` as sent to the client."""

    export_name: str
    structured_replies: bool
    meta_contexts: tuple[str, ...]
    transmission_flags: int


@dataclass(slots=True)
class Request:
    """One transmission request. `error` nonzero means: reply with that NBD errno, do nothing.

    `data` is the WRITE payload (exactly `length` bytes), else None.
    """

    command: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | None = None
    error: int = 0
    message: str = ""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.command, f"CMD_{self.command}")

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client ended the session cleanly (NBD_OPT_ABORT acknowledged, or NBD_CMD_DISC)."""

    reason: str


Event = Ready | Request | Disconnect


# --- errno mapping ----------------------------------------------------------------------


def wire_errno(err: int | None) -> int:
    """Map a local errno to one the NBD spec allows on the wire (EIO when unknown)."""
    if err in _WIRE_ERRORS:
        return err  # type: ignore[return-value]
    if err in (_errno.EROFS, _errno.EACCES):
        return EPERM
    if err in (_errno.EDQUOT, _errno.EFBIG):
        return ENOSPC
    if err == getattr(_errno, "EOPNOTSUPP", ENOTSUP):
        return ENOTSUP
    return EIO


# --- the connection ---------------------------------------------------------------------


class ServerConnection:
    """Server side of one NBD connection (fixed newstyle handshake, then transmission)."""

    def __init__(self, export: Export):
        if export.size < 0 or export.size >= 1 << 63:
            raise LocalProtocolError(f"export size {export.size} out of range")
        if len(export.name.encode()) > MAX_STRING:
            raise LocalProtocolError("export name longer than 4096 bytes")
        self.export = export
        self.state = State.CLIENT_FLAGS
        self.no_zeroes = False
        self.structured_replies = False
        self.meta_contexts: tuple[str, ...] = ()
        self.transmission_flags = 0
        self.options_seen = 0
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._skip = 0  # bytes of peer data to discard unread
        self._after_skip: Event | tuple[int, int] | None = None  # what to do once skipped
        self._error: ProtocolError | None = None
        self._out: list[bytes] = []
        # greeting: NBDMAGIC, IHAVEOPT, handshake flags
        self._out.append(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))

    def __repr__(self) -> str:
        return f"<ServerConnection {self.state.name} export={self.export.name!r} size={self.export.size}>"

    # -- input ---------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; b"" means the peer closed its sending side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
            return
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = memoryview(data)[n:]
            if not data:
                return
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def data_to_send(self) -> bytes:
        """Bytes this module wants sent (greeting, option replies); empties the outbox."""
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def buffered(self) -> int:
        """Peer bytes received but not yet parsed."""
        return len(self._buf) - self._pos

    def next_event(self) -> Event | _NeedData:
        """Parse the next event. Returns NEED_DATA when more bytes are needed.

        Raises ProtocolError (and stays in ERROR) on peer garbage.
        """
        if self._error is not None:
            raise self._error
        try:
            event = self._next_event()
        except ProtocolError as e:
            self._fail(e)
            raise
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:  # defensive
            err = ProtocolError(f"malformed message: {e}")
            self._fail(err)
            raise err from e
        if event is NEED_DATA and self._eof and self.state is not State.CLOSED:
            if self.buffered or self._skip or self.state is not State.TRANSMISSION:
                err = ProtocolError(f"peer closed the connection in state {self.state.name}")
                self._fail(err)
                raise err
        return event

    def _fail(self, err: ProtocolError) -> None:
        self.state = State.ERROR
        self._error = err
        self._buf = bytearray()
        self._pos = 0

    def _take(self, n: int) -> memoryview | None:
        """The next n buffered bytes (a view; consumed), or None if not all there yet."""
        if len(self._buf) - self._pos < n:
            return None
        start = self._pos
        self._pos += n
        return memoryview(self._buf)[start : start + n]

    def _compact(self) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0

    def _skip_buffered(self, n: int) -> None:
        """Discard n bytes: those already buffered now, the rest as they arrive."""
        have = len(self._buf) - self._pos
        k = min(have, n)
        self._pos += k
        self._skip = n - k

    def _next_event(self) -> Event | _NeedData:
        while True:
            if self._skip:
                return NEED_DATA
            if self._after_skip is not None:
                pending, self._after_skip = self._after_skip, None
                if isinstance(pending, tuple):  # an option whose data we skipped
                    option, reply = pending
                    self._reply(option, reply, b"option data too long" if reply == REP_ERR_TOO_BIG else b"")
                    continue
                return pending
            if self.state is State.CLIENT_FLAGS:
                view = self._take(4)
                if view is None:
                    return NEED_DATA
                flags = _U32.unpack(view)[0]
                view.release()
                if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                    raise ProtocolError(f"unknown client flags {flags:#x}")
                self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
                self.state = State.OPTIONS
                continue
            if self.state is State.OPTIONS:
                event = self._next_option()
                if event is None:
                    continue
                return event
            if self.state is State.TRANSMISSION:
                return self._next_request()
            if self.state is State.CLOSED:
                return NEED_DATA
            raise LocalProtocolError(f"next_event in state {self.state.name}")

    # -- option haggling -----------------------------------------------------------------

    def _next_option(self) -> Event | _NeedData | None:
        """One option: returns an event, NEED_DATA, or None (handled, look for more)."""
        if len(self._buf) - self._pos < _OPT_HDR.size:
            return NEED_DATA
        magic, option, length = _OPT_HDR.unpack_from(self._buf, self._pos)
        if magic != IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if self.options_seen >= MAX_OPTIONS:
            raise ProtocolError(f"more than {MAX_OPTIONS} options")
        if option == OPT_EXPORT_NAME and length > MAX_STRING:
            raise ProtocolError(f"NBD_OPT_EXPORT_NAME name of {length} bytes")
        if length > MAX_OPTION_LENGTH:
            self._pos += _OPT_HDR.size
            self.options_seen += 1
            self._skip_buffered(length)
            self._after_skip = (option, REP_ERR_TOO_BIG)
            return None
        if len(self._buf) - self._pos < _OPT_HDR.size + length:
            return NEED_DATA
        self._pos += _OPT_HDR.size
        data = bytes(self._take(length) or b"")
        self.options_seen += 1
        self._compact()
        return self._handle_option(option, data)

    def _reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out.append(_OPT_REPLY_HDR.pack(OPT_REPLY_MAGIC, option, reply, len(data)))
        if data:
            self._out.append(data)

    def _flags_now(self) -> int:
        ex = self.export
        flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN
        if ex.read_only:
            flags |= FLAG_READ_ONLY
        else:
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES
        if ex.can_cache:
            flags |= FLAG_SEND_CACHE
        if self.structured_replies:
            flags |= FLAG_SEND_DF
        return flags

    def _handle_option(self, option: int, data: bytes) -> Event | None:
        if option == OPT_EXPORT_NAME:
            name = _decode_string(data)
            if name is None or not self.export.matches(name):
                raise ProtocolError(f"NBD_OPT_EXPORT_NAME for unknown export {data[:64]!r}")
            return self._enter_transmission(name, old_style=True)
        if option == OPT_ABORT:
            self._reply(option, REP_ACK)  # data, if any, ignored as the spec recommends
            self.state = State.CLOSED
            return Disconnect("NBD_OPT_ABORT")
        if option == OPT_LIST:
            if data:
                self._reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
                return None
            name = self.export.name.encode()
            self._reply(option, REP_SERVER, _U32.pack(len(name)) + name)
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_INFO, OPT_GO):
            return self._info_or_go(option, data)
        if option == OPT_STRUCTURED_REPLY:
            if data:
                self._reply(option, REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
                return None
            self.structured_replies = True
            self._reply(option, REP_ACK)
            return None
        if option in (OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
            self._meta_context(option, data)
            return None
        self._reply(option, REP_ERR_UNSUP, b"option not supported")
        return None

    def _info_or_go(self, option: int, data: bytes) -> Event | None:
        if len(data) < 6:
            self._reply(option, REP_ERR_INVALID, b"option data too short")
            return None
        (name_len,) = _U32.unpack_from(data, 0)
        if name_len > len(data) - 6:
            self._reply(option, REP_ERR_INVALID, b"name length exceeds option data")
            return None
        name = _decode_string(data[4 : 4 + name_len])
        (n_req,) = _U16.unpack_from(data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * n_req:
            self._reply(option, REP_ERR_INVALID, b"information request count does not match length")
            return None
        if name is None:
            self._reply(option, REP_ERR_INVALID, b"export name is not valid UTF-8")
            return None
        if not self.export.matches(name):
            self._reply(option, REP_ERR_UNKNOWN, b"no such export")
            return None
        requested = {_U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(n_req)}
        ex = self.export
        flags = self._flags_now()
        self._reply(option, REP_INFO, struct.pack(">HQH", INFO_EXPORT, ex.size, flags))
        # Always sent: lets clients that did not ask still learn our limits.
        self._reply(
            option,
            REP_INFO,
            struct.pack(">HIII", INFO_BLOCK_SIZE, ex.min_block_size, ex.preferred_block_size, ex.max_block_size),
        )
        if INFO_NAME in requested:
            self._reply(option, REP_INFO, _U16.pack(INFO_NAME) + ex.name.encode())
        if INFO_DESCRIPTION in requested and ex.description:
            self._reply(option, REP_INFO, _U16.pack(INFO_DESCRIPTION) + ex.description.encode()[:MAX_STRING])
        self._reply(option, REP_ACK)
        if option == OPT_GO:
            return self._enter_transmission(name, old_style=False)
        return None

    def _meta_context(self, option: int, data: bytes) -> None:
        if option == OPT_SET_META_CONTEXT:
            self.meta_contexts = ()  # replaced even when this option fails
        if not self.structured_replies:
            self._reply(option, REP_ERR_INVALID, b"negotiate structured replies first")
            return
        try:
            name, queries = _parse_meta_query(data)
        except ValueError as e:
            self._reply(option, REP_ERR_INVALID, str(e).encode())
            return
        if not self.export.matches(name):
            self._reply(option, REP_ERR_UNKNOWN, b"no such export")
            return
        if option == OPT_LIST_META_CONTEXT:
            if not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries):
                self._reply(option, REP_META_CONTEXT, _U32.pack(0) + BASE_ALLOCATION.encode())
        else:
            if BASE_ALLOCATION in queries:
                self.meta_contexts = (BASE_ALLOCATION,)
                self._reply(option, REP_META_CONTEXT, _U32.pack(BASE_ALLOCATION_ID) + BASE_ALLOCATION.encode())
        self._reply(option, REP_ACK)

    def _enter_transmission(self, name: str, *, old_style: bool) -> Ready:
        self.transmission_flags = self._flags_now()
        if old_style:
            self._out.append(struct.pack(">QH", self.export.size, self.transmission_flags))
            if not self.no_zeroes:
                self._out.append(bytes(124))
        self.state = State.TRANSMISSION
        if not self.structured_replies:
            self.meta_contexts = ()
        return Ready(name, self.structured_replies, self.meta_contexts, self.transmission_flags)

    # -- transmission --------------------------------------------------------------------

    def _next_request(self) -> Event | _NeedData:
        buf = self._buf
        pos = self._pos
        if len(buf) - pos < REQUEST_SIZE:
            return NEED_DATA
        magic, flags, command, cookie, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if command == CMD_WRITE:
            error, message = self._check(command, flags, offset, length)
            if length > self.export.max_block_size:
                # Never buffered: skip the payload as it streams past, then reply EINVAL.
                self._pos = pos + REQUEST_SIZE
                self._skip_buffered(length)
                self._after_skip = Request(command, flags, cookie, offset, length, None, error, message)
                return NEED_DATA if self._skip else self._next_event()
            if len(buf) - pos < REQUEST_SIZE + length:
                return NEED_DATA
            start = pos + REQUEST_SIZE
            self._pos = start + length
            data = None if error else bytes(memoryview(buf)[start : start + length])
            self._compact()
            return Request(command, flags, cookie, offset, length, data, error, message)
        self._pos = pos + REQUEST_SIZE
        self._compact()
        if command == CMD_DISC:
            self.state = State.CLOSED
            return Disconnect("NBD_CMD_DISC")
        error, message = self._check(command, flags, offset, length)
        return Request(command, flags, cookie, offset, length, None, error, message)

    def _check(self, command: int, flags: int, offset: int, length: int) -> tuple[int, str]:
        """Validate a request header: (0, "") or (NBD errno, reason)."""
        ex = self.export
        allowed = CMD_FLAG_FUA if (self.transmission_flags & FLAG_SEND_FUA) else 0
        if command == CMD_READ:
            if self.structured_replies:
                allowed |= CMD_FLAG_DF
        elif command == CMD_WRITE_ZEROES:
            allowed |= CMD_FLAG_NO_HOLE
        elif command == CMD_BLOCK_STATUS:
            allowed |= CMD_FLAG_REQ_ONE
        elif command not in COMMAND_NAMES:
            return EINVAL, f"unknown command {command}"
        name = COMMAND_NAMES[command]
        if flags & ~allowed:
            return EINVAL, f"{name}: unsupported flags {flags:#x}"
        if command == CMD_FLUSH:
            return 0, ""
        if command in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and ex.read_only:
            return EPERM, f"{name}: export is read-only"
        if command == CMD_CACHE and not ex.can_cache:
            return EINVAL, "CACHE not supported"
        if command == CMD_BLOCK_STATUS and not self.meta_contexts:
            return EINVAL, "BLOCK_STATUS without a negotiated metadata context"
        if length == 0:
            return EINVAL, f"{name}: zero length"
        if command in (CMD_READ, CMD_WRITE, CMD_CACHE) and length > ex.max_block_size:
            return EINVAL, f"{name}: length {length} exceeds maximum {ex.max_block_size}"
        if offset + length > ex.size:
            err = ENOSPC if command in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
            return err, f"{name}: [{offset}, {offset + length}) beyond export size {ex.size}"
        return 0, ""

    # -- replies (transmission) ----------------------------------------------------------

    def _require_transmission(self) -> None:
        if self.state not in (State.TRANSMISSION, State.CLOSED):
            raise LocalProtocolError(f"reply in state {self.state.name}")

    def reply_ok(self, cookie: int) -> list[bytes]:
        """Success with no payload (WRITE, FLUSH, TRIM, WRITE_ZEROES, CACHE)."""
        self._require_transmission()
        if self.structured_replies:
            return [_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)]
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie)]

    def reply_error(self, cookie: int, error: int, message: str = "") -> list[bytes]:
        """An error reply (structured ERROR chunk with the message when negotiated)."""
        self._require_transmission()
        error = wire_errno(error) if error else EIO
        if self.structured_replies:
            msg = message.encode("utf-8", "replace")[:MAX_MESSAGE]
            return [
                _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + len(msg))
                + struct.pack(">IH", error, len(msg))
                + msg
            ]
        return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, error, cookie)]

    def reply_read(
        self,
        cookie: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        holes: Sequence[tuple[int, int]] = (),
    ) -> list[bytes | bytearray | memoryview]:
        """A successful READ reply of `data` (len == request length) read at `offset`.

        With structured replies, `holes` (sorted, non-overlapping (offset, length) runs inside
        the request that read as zeroes) become OFFSET_HOLE chunks and are not sent as data;
        without structured replies (or with DF, which the caller handles by passing no holes)
        they are ignored and `data` is sent whole.
        """
        self._require_transmission()
        n = len(data)
        if not self.structured_replies:
            return [_SIMPLE.pack(SIMPLE_REPLY_MAGIC, 0, cookie), data]
        if not holes:
            return [
                _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + n)
                + _U64.pack(offset),
                data,
            ]
        view = memoryview(data)
        parts: list[tuple[int, int, int]] = []  # (type, rel offset, length)
        cursor = 0
        for h_off, h_len in holes:
            rel = h_off - offset
            if h_len <= 0 or rel < cursor or rel + h_len > n:
                raise LocalProtocolError(f"hole ({h_off}, {h_len}) outside or overlapping the read")
            if rel > cursor:
                parts.append((REPLY_TYPE_OFFSET_DATA, cursor, rel - cursor))
            parts.append((REPLY_TYPE_OFFSET_HOLE, rel, h_len))
            cursor = rel + h_len
        if cursor < n:
            parts.append((REPLY_TYPE_OFFSET_DATA, cursor, n - cursor))
        out: list[bytes | bytearray | memoryview] = []
        last = len(parts) - 1
        for i, (kind, rel, length) in enumerate(parts):
            flags = REPLY_FLAG_DONE if i == last else 0
            if kind == REPLY_TYPE_OFFSET_HOLE:
                out.append(
                    _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, 12)
                    + struct.pack(">QI", offset + rel, length)
                )
            else:
                out.append(
                    _CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, kind, cookie, 8 + length) + _U64.pack(offset + rel)
                )
                out.append(view[rel : rel + length])
        return out

    def reply_block_status(
        self, cookie: int, descriptors: Sequence[tuple[int, int]], *, req_one: bool = False
    ) -> list[bytes]:
        """BLOCK_STATUS for base:allocation: `descriptors` are (length, status flags) runs."""
        self._require_transmission()
        if not self.structured_replies:
            raise LocalProtocolError("BLOCK_STATUS needs structured replies")
        descs = list(descriptors)
        if not descs or any(length <= 0 or length >= 1 << 32 for length, _ in descs):
            raise LocalProtocolError(f"bad block status descriptors {descs[:4]}")
        descs = descs[:1] if req_one else descs[:MAX_DESCRIPTORS]
        body = _U32.pack(BASE_ALLOCATION_ID) + b"".join(struct.pack(">II", n, s) for n, s in descs)
        return [
            _CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body
        ]


# --- helpers ----------------------------------------------------------------------------


def _decode_string(data: bytes) -> str | None:
    if len(data) > MAX_STRING or b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta_query(data: bytes) -> tuple[str, list[str]]:
    """Export name and queries of NBD_OPT_{LIST,SET}_META_CONTEXT; ValueError if malformed."""
    if len(data) < 8:
        raise ValueError("option data too short")
    (name_len,) = _U32.unpack_from(data, 0)
    if name_len > len(data) - 8:
        raise ValueError("name length exceeds option data")
    name = _decode_string(data[4 : 4 + name_len])
    if name is None:
        raise ValueError("export name is not a valid string")
    pos = 4 + name_len
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    if count > MAX_META_QUERIES:
        raise ValueError(f"more than {MAX_META_QUERIES} queries")
    queries = []
    for _ in range(count):
        if len(data) - pos < 4:
            raise ValueError("query header beyond option data")
        (q_len,) = _U32.unpack_from(data, pos)
        pos += 4
        if q_len > len(data) - pos:
            raise ValueError("query length exceeds option data")
        q = _decode_string(data[pos : pos + q_len])
        if q is None:
            raise ValueError("query is not a valid string")
        queries.append(q)
        pos += q_len
    if pos != len(data):
        raise ValueError("trailing bytes after queries")
    return name, queries


def allocation_descriptors(extents, offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation (length, flags) runs for [offset, offset+length) from image extents.

    `extents` are objects with offset/length/kind ("data" | "zero" | "hole"); holes and
    zeroed runs report HOLE|ZERO, data 0.  Runs are clipped to the range, merged when equal,
    and gaps the image did not describe count as data.  Always at least one descriptor.
    """
    end = offset + length
    out: list[list[int]] = []
    cursor = offset

    def add(n: int, status: int) -> None:
        if n <= 0:
            return
        if out and out[-1][1] == status and out[-1][0] + n < 1 << 32:
            out[-1][0] += n
        else:
            out.append([n, status])

    for ext in sorted(extents, key=lambda e: e.offset):
        start = max(ext.offset, cursor)
        stop = min(ext.offset + ext.length, end)
        if stop <= start:
            continue
        add(start - cursor, 0)
        add(stop - start, 0 if ext.kind == "data" else STATE_HOLE | STATE_ZERO)
        cursor = stop
    add(end - cursor, 0)
    return [(n, s) for n, s in out] or [(length, 0)]
