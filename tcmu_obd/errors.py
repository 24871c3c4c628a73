"""Error hierarchy. Every error names its cause; modules map foreign errors at their edges."""

from __future__ import annotations

import errno as _errno
import re


class ObdError(Exception):
    """Root of every error tcmu-obd raises on purpose."""


class FormatError(ObdError):
    """A blob, index or header is not what the overlaybd format allows.

    `source` names the file/blob, `offset` the byte offset (in the byte space of the
    layer being parsed) where the problem was found, when known.
    """

    def __init__(self, message: str, *, source: str | None = None, offset: int | None = None):
        self.message = message
        self.source = source
        self.offset = offset
        where = []
        if source:
            where.append(str(source))
        if offset is not None:
            where.append(f"offset {offset}")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")

    def with_source(self, source: str) -> "FormatError":
        """Return the same error naming `source` (used by the I/O edge that knows the file name)."""
        if self.source:
            return self
        err = type(self)(self.message, source=source, offset=self.offset)
        err.__cause__ = self.__cause__
        return err


class ChecksumError(FormatError):
    """A CRC32C (block, index, header digest) does not match."""


class ConfigError(ObdError):
    """config.v1.json or overlaybd.json is malformed or names something that does not exist."""


_USERINFO = re.compile(r"(?<=://)[^/\s@'\"<>]+@")


def redact_userinfo(text: str) -> str:
    """`text` with the userinfo (user:password) of every URL in it replaced by `***`."""
    return _USERINFO.sub("***@", text)


class RemoteError(ObdError):
    """A registry request failed (after retries). Message and url never carry URL userinfo."""

    def __init__(self, message: str, *, status: int | None = None, url: str | None = None):
        self.status = status
        self.url = None if url is None else redact_userinfo(url)
        super().__init__(redact_userinfo(message))


class RemoteTimeout(RemoteError, TimeoutError):
    """A registry request timed out."""


class AuthError(RemoteError):
    """The registry refused our credentials (401/403 after authenticating)."""


class DigestMismatch(ObdError):
    """A blob's sha256 is not the digest it was fetched by."""


class ImageIOError(ObdError):
    """A read or write on an image failed; `errno` says how, for the frontends to map."""

    def __init__(self, message: str, errno: int = _errno.EIO):
        self.errno = errno
        super().__init__(message)


class ReadOnlyError(ImageIOError):
    def __init__(self, message: str = "image is read-only"):
        super().__init__(message, _errno.EROFS)
