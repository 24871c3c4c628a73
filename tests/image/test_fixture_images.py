"""Every image the upstream tools made reads bit-exactly, in every wrapping and stack."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from tcmu_obd.config import load_global_config
from tcmu_obd.image.stack import open_image
from tests.support.images import image_sha256
from tests.support.paths import FIXTURES_OBD

EXPECTED = json.loads((FIXTURES_OBD / "expected.json").read_text())
SVC = FIXTURES_OBD / "svc.overlaybd.json"


def _cases():
    for group in ("ext4-chain", "pattern"):
        for name, spec in EXPECTED[group]["images"].items():
            for config in spec["configs"]:
                yield pytest.param(group, name, config, id=f"{group}:{config.split('/')[-1]}")


@pytest.fixture
def group_dir(tmp_path, request):
    """A private copy of a fixture group (writable layers are opened read-write)."""

    def copy(group: str):
        dst = tmp_path / group
        shutil.copytree(FIXTURES_OBD / group, dst)
        for p in dst.rglob("*"):
            p.chmod(0o755 if p.is_dir() else 0o644)
        return dst

    return copy


@pytest.mark.parametrize("group,name,config", list(_cases()))
async def test_fixture_config_reads_expected_raw(group, name, config, group_dir):
    spec = EXPECTED[group]["images"][name]
    base = group_dir(group) if "rw" in config else FIXTURES_OBD / group
    image = await open_image(str(base / config), load_global_config(SVC))
    try:
        assert image.size == spec["raw_size"]
        assert await image_sha256(image) == spec["raw_sha256"]
    finally:
        await image.aclose()


def _debugfs(raw, request: str) -> str:
    out = subprocess.run(["debugfs", "-R", request, str(raw)], capture_output=True, text=True, check=True)
    return out.stdout + out.stderr


@pytest.mark.parametrize("name", ["L1", "L12"])
def test_ext4_contents_match_expected(name, tmp_path):
    """Export through the CLI, then read the filesystem with e2fsprogs' debugfs."""
    import hashlib

    from tcmu_obd.cli import main

    spec = EXPECTED["ext4-chain"]["images"][name]
    config = FIXTURES_OBD / "ext4-chain" / spec["configs"][-1]
    raw = tmp_path / f"{name}.raw"
    assert main(["export", "--global-config", str(SVC), "--no-progress", str(config), str(raw)]) == 0
    assert raw.stat().st_size == spec["raw_size"]
    assert raw.stat().st_blocks * 512 < spec["raw_size"] // 4, "export must write a sparse file"
    for path, want in spec["files"].items():
        dumped = tmp_path / "dumped"
        _debugfs(raw, f"dump -p {path} {dumped}")
        data = dumped.read_bytes()
        assert len(data) == want["size"], path
        assert hashlib.sha256(data).hexdigest() == want["sha256"], path
        assert f"Mode:  {want['mode'][2:].zfill(4)}" in _debugfs(raw, f"stat {path}"), path
        dumped.unlink()
    for link, target in spec["symlinks"].items():
        assert f'Fast link dest: "{target}"' in _debugfs(raw, f"stat {link}")
    for path in spec["absent"]:
        assert "File not found" in _debugfs(raw, f"stat {path}"), path
