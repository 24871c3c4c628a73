"""The wheel: built from a clean copy of the sources (compiling the cffi extension against the
system's libtcmu), installed into a fresh venv, and run from there.

Runtime dependencies come from the project's own venv through a .pth file, so the test needs no
package index; the project itself is only importable from the installed wheel (the project venv's
editable-install hook is not loaded: .pth files of a directory added that way are not processed).
Installing with dependencies from an index is the same wheel; docs/operations.md shows it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from tests.support.paths import FIXTURES_OBD, REPO_ROOT

SOURCES = ["pyproject.toml", "setup.py", "README.md", "csrc", "tcmu_obd"]


def test_wheel_builds_extension_installs_and_runs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            # no build products of the checkout: the wheel must compile its own extension
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(src)], check=True, timeout=300)
    (wheel,) = dist.glob("tcmu_obd-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "tcmu-obd = tcmu_obd.cli:run" in zf.read(entry_points).decode()
    assert any(n.startswith("tcmu_obd/frontends/tcmu/_libtcmu") and n.endswith(".so") for n in names)
    assert "tcmu_obd/ops/sdnotify.py" in names and "tcmu_obd/tools/config_check.py" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, timeout=300)
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = subprocess.run(
        [str(vpy), "-c", "import tcmu_obd.frontends.tcmu._libtcmu as m; print(m.__file__); "
                         "print(callable(m.lib.tcmulib_initialize))"],
        capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split()
    assert Path(where[0]).is_relative_to(site) and where[1] == "True"

    tool = venv / "bin" / "tcmu-obd"
    helped = subprocess.run([str(tool), "--help"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "serve", "config", "fetch", "export"):
        assert command in helped.stdout
    config = FIXTURES_OBD / "pattern" / "configs" / "p1.lz4.zfile.config.v1.json"
    checked = subprocess.run([str(tool), "config", "check", str(config)],
                             capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "would serve: 8388608 bytes" in checked.stdout
