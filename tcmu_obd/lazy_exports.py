"""Package namespaces whose names are loaded from their submodules on first use.

remote/ and scheduler/ export their public names this way, so that their light modules
(remote.endpoints, remote.preconnect, remote.proxy, scheduler.options) can be imported while
`tcmu-obd fetch` starts, before aiohttp and the scheduler are loaded (tools/fetch.py).
"""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, where: dict[str, str]) -> tuple[Callable[[str], object], list[str]]:
    """`(__getattr__, __all__)` for `package`: each name in `where` comes from the submodule
    it maps to, imported the first time the name is read."""

    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{where[name]}", package), name)

    return __getattr__, sorted(where)
