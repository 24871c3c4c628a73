"""packaging/*.service: readiness by sd_notify, and command lines our CLI accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess

import pytest

from tcmu_obd.cli import build_parser
from tests.support.paths import REPO_ROOT

UNITS = {"tcmu-obd.service": "run", "tcmu-obd-nbd@.service": "serve"}


def _unit(name: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # systemd keys are case-sensitive
    cp.read(REPO_ROOT / "packaging" / name)
    return cp


@pytest.mark.parametrize("name,command", UNITS.items())
def test_unit_is_notify_and_runs_a_valid_command(name, command):
    service = _unit(name)["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    # startup failures (exit 3) are not retried in a loop
    assert service["RestartPreventExitStatus"] == "3"
    argv = shlex.split(service["ExecStart"].replace("%i", "img1"))
    assert argv[0].endswith("/bin/tcmu-obd") and argv[1] == command
    args = build_parser().parse_args(argv[1:])  # argparse exits on any unknown flag
    assert args.command == command
    if command == "serve":
        assert args.nbd == "unix:/run/tcmu-obd/img1.sock"
        assert args.config == "/etc/tcmu-obd/images/img1/config.v1.json"


def test_run_unit_loads_the_kernel_side_and_conflicts_with_upstream():
    unit = _unit("tcmu-obd.service")
    assert "overlaybd-tcmu.service" in unit["Unit"]["Conflicts"].split()
    assert "sys-kernel-config.mount" in unit["Unit"]["Requires"].split()
    text = (REPO_ROOT / "packaging" / "tcmu-obd.service").read_text()
    assert "ExecStartPre=/sbin/modprobe target_core_user" in text


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze (package systemd) is needed to verify the units"
    for name in UNITS:
        shutil.copy(REPO_ROOT / "packaging" / name, tmp_path / name)
    out = subprocess.run([analyze, "verify", *(str(tmp_path / n) for n in UNITS)], capture_output=True,
                         text=True, timeout=60)
    # The install path does not exist on a build host; anything else is a real complaint.
    complaints = [line for line in (out.stdout + out.stderr).splitlines()
                  if line.strip() and "/opt/tcmu-obd/venv/bin/tcmu-obd is not executable" not in line]
    assert complaints == []
