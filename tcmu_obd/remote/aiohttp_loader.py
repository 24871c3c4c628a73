"""aiohttp, imported without parsing the system CA bundle twice for contexts nobody uses.

At import, aiohttp builds two module-level TLS contexts (a verifying one and one that does not
verify) and each loads OpenSSL's default CA file: ~45 ms apiece here, ~0.1 s of the ~0.35 s
`tcmu-obd fetch` spends loading before its first request can leave (measured with packet
captures: without them the first requests follow the handshake at once). Nothing in tcmu-obd
uses those two contexts: every request passes a context of its own (`RegistryClient._ssl_for`,
the credential helper's session), built after this import and so from the environment as the
user set it.

So the import runs with `SSL_CERT_FILE` (OpenSSL's documented override of its default CA file)
pointing at an empty file, and the variable is put back as it was at once. Should anything
ever fall back on aiohttp's verifying context, it still verifies (against OpenSSL's default CA
directory alone, looked up lazily), so the worst outcome is a refused certificate, never an
unchecked one; tests/remote/test_aiohttp_loader.py checks what the import leaves behind.

The environment is only touched while this is the process's only thread: glibc's setenv is not
safe against a getenv in another thread (the preconnect thread resolving a name calls it). With
another thread alive, aiohttp is imported as it is.
"""

from __future__ import annotations

import os
import sys
import threading


def _import_aiohttp():
    if "aiohttp" in sys.modules or threading.active_count() > 1:
        import aiohttp

        return aiohttp
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        import aiohttp
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved
    return aiohttp


aiohttp = _import_aiohttp()
