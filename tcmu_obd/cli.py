"""`tcmu-obd` command line. Each tool module under tcmu_obd/tools registers its own subcommands."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import pkgutil
import sys

from . import __version__, tools
from .errors import ObdError


def _all_tool_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(tools.__path__))


def _tool_modules(argv: list[str] | None) -> list[str]:
    """The tool modules to import: only the one whose command argv names (the first word that
    is not an option), else all of them (--help, a typo, no command)."""
    words = sys.argv[1:] if argv is None else argv
    first = next((w for w in words if not w.startswith("-")), None)
    if first in tools.COMMANDS:
        return [tools.COMMANDS[first]]
    return _all_tool_modules()


def build_parser(argv: list[str] | None = None, *, every_command: bool = True) -> argparse.ArgumentParser:
    """The CLI parser. every_command=False registers only the command argv names (faster
    start; `main` uses it), falling back to every command when argv names none."""
    parser = argparse.ArgumentParser(prog="tcmu-obd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tcmu-obd {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = _all_tool_modules() if every_command else _tool_modules(argv)
    for name in names:
        module = importlib.import_module(f"{tools.__name__}.{name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    for name, command in sub.choices.items():
        # Every command takes --global-config, as every upstream tool takes the service config.
        if not any("--global-config" in a.option_strings for a in command._actions):
            command.add_argument(
                "--global-config",
                metavar="PATH",
                default=None,
                help="overlaybd.json (default: /etc/overlaybd/overlaybd.json when present, else built-in defaults)",
            )
    return parser


def main(argv: list[str] | None = None, *, program: bool = False) -> int:
    """Run one command; returns its exit status. program=True: this is the `tcmu-obd` process
    itself (run()), which a command may leave without the interpreter's teardown."""
    parser = build_parser(argv, every_command=False)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = int(args.func(args) or 0)
    except ObdError as e:
        print(f"tcmu-obd {args.command}: error: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print(f"tcmu-obd {args.command}: interrupted", file=sys.stderr)
        rc = 130
    except BrokenPipeError:
        rc = 1
    if program and getattr(args, "exit_without_teardown", False):
        _exit_now(rc)
    return rc


def _exit_now(rc: int) -> None:
    """Leave at once. For a command whose files are closed (and synced where that matters)
    when it returns, the interpreter's teardown (freeing every module and object: ~60 ms after
    a fetch) only delays the exit that scripts and benchmarks wait for."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(rc)


def run() -> None:
    """The `tcmu-obd` console script."""
    sys.exit(main(program=True))


if __name__ == "__main__":
    run()
