"""End-to-end tests in a qemu VM with a real target_core_user kernel (see docs/vm-rig.md).

One VM boot per module (fixture `vm`): tests/vm/guest-test.sh runs every step inside the guest
and records each check in scratch/results.json; each test below asserts on its checks.
Not skipped by default: if the rig cannot be built (no qemu, no network to the Debian archive
for the kernel .deb) the tests FAIL with the reason.

    .venv/bin/pytest tests/vm -q            # ~3-5 min on 2 cores (TCG)
    .venv/bin/python tests/vm/rig.py        # same run, plain output
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.vm import rig

pytestmark = pytest.mark.vm

WALL_LIMIT_S = 840  # the whole boot+run must stay well under 15 min on 2 cores


@pytest.fixture(scope="module")
def vm():
    missing = [t for t in ("qemu-system-x86_64", "cpio", "depmod", "tcmu-runner", "iscsiadm", "fio")
               if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None]
    if missing:
        pytest.fail(f"VM rig host tools missing: {missing}; apt-get install -y qemu-system-x86 "
                    "busybox-static cpio kmod bc tcmu-runner open-iscsi fio", pytrace=False)
    try:
        summary = rig.run_guest()
    except rig.RigError as e:
        pytest.fail(f"VM rig could not be built: {e}", pytrace=False)
    return summary


def _context(vm) -> str:
    return (f"\n--- run-vm: rc={vm['rc']} wall={vm['wall_seconds']}s {vm['run_vm_stderr'].strip()}"
            f"\n--- scratch: {vm['scratch']} (console.log, logs/, results.json)"
            f"\n--- console tail:\n{vm['console_tail'][-2500:]}")


def _check(vm, name: str):
    res = vm["results"]
    assert res is not None, f"the guest wrote no results{_context(vm)}"
    r = res["checks"].get(name)
    assert r is not None, (f"check {name!r} never ran in the guest (ran: {sorted(res['checks'])})"
                           f"{_context(vm)}")
    if r["status"] == "skip":
        pytest.skip(f"{name}: {r['detail']}")
    assert r["status"] == "pass", f"{name}: {r['detail']}{_context(vm)}"
    return r


def test_vm_ran_to_completion(vm):
    assert vm["rc"] == 0, f"guest script did not finish cleanly{_context(vm)}"
    assert vm["results"] and not vm["results"].get("partial"), f"results.json missing{_context(vm)}"
    assert vm["wall_seconds"] < WALL_LIMIT_S, f"VM run took {vm['wall_seconds']} s (limit {WALL_LIMIT_S})"


def test_tcmu_runner_baseline(vm):
    _check(vm, "runner_start")
    _check(vm, "runner_baseline_sha256")


def test_configfs_scripts_list_and_remove(vm):
    _check(vm, "configfs_list")
    _check(vm, "configfs_remove")


def test_daemon_starts(vm):
    _check(vm, "daemon_start")


def test_two_luns_created(vm):
    _check(vm, "lun_create")


def test_device_lookup(vm):
    _check(vm, "device_lookup")


def test_device_lookup_wait(vm):
    _check(vm, "device_lookup_wait")


def test_device_lookup_with_udevd(vm):
    _check(vm, "device_lookup_udev")


def test_pattern_p12_sha256(vm):
    _check(vm, "obd_p12_sha256")


def test_ext4_chain_L12_sha256(vm):
    _check(vm, "obd_l12_sha256")


def test_ext4_mount_files(vm):
    _check(vm, "ext4_files")


def test_iscsi_export_login_read(vm):
    _check(vm, "iscsi_sha256")
    _check(vm, "iscsi_unexport")


def test_device_lookup_finds_iscsi_disk_too(vm):
    _check(vm, "device_lookup_iscsi")


def test_daemon_restart_reattaches_existing_luns(vm):
    _check(vm, "daemon_reattach")  # SIGTERM, then a new daemon serves the same LUNs
    _check(vm, "daemon_reattach_kill")  # the same after SIGKILL


def test_writable_upper_persists_across_restart(vm):
    _check(vm, "rw_persist")


def test_benchmark_numbers(vm):
    _check(vm, "bench_runner")
    _check(vm, "bench_obd")
    bench = vm["results"]["bench"]
    print("bench:", json.dumps(bench, sort_keys=True))
    for key in ("runner_seq_mibs", "obd_seq_mibs", "ratio_seq",
                "runner_rand4k_qd1_iops", "obd_rand4k_qd1_iops", "ratio_rand4k_qd1"):
        assert key in bench and bench[key] > 0, f"bench {key} missing or zero: {bench}"
