"""The CLI imports only the tool module of the command being run (tools.COMMANDS)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import subprocess
import sys

from tcmu_obd import tools
from tcmu_obd.cli import build_parser


def _registered_by(module_name: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    module = importlib.import_module(f"{tools.__name__}.{module_name}")
    if hasattr(module, "register"):
        module.register(sub)
    return set(sub.choices)


def test_command_table_matches_what_the_modules_register():
    actual = {}
    for info in pkgutil.iter_modules(tools.__path__):
        for command in _registered_by(info.name):
            actual[command] = info.name
    assert actual == tools.COMMANDS


def test_every_command_parser_has_them_all():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(tools.COMMANDS)


def test_running_a_command_imports_only_its_module():
    code = (
        "import sys\n"
        "from tcmu_obd.cli import build_parser\n"
        "p = build_parser(['-v', 'status', '--json'], every_command=False)\n"
        "args = p.parse_args(['-v', 'status', '--json'])\n"
        "assert args.command == 'status', args\n"
        "print(sorted(m for m in sys.modules if m.startswith('tcmu_obd.tools.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['tcmu_obd.tools.status']"


def test_no_command_or_an_unknown_one_still_lists_every_command():
    for argv in ([], ["--help"], ["nosuchcommand"]):
        parser = build_parser(argv, every_command=False)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        assert set(sub.choices) == set(tools.COMMANDS)
