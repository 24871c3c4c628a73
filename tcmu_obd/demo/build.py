"""Build the demo image: an ext4 root disk and its two overlaybd layers.

Layer 1 is a whole "installed system": a deterministic file tree put into a fresh ext4 with
`mkfs.ext4 -d`, turned into a committed, zstd-compressed, tar-wrapped layer by
`build_layer_from_raw` (what `tcmu-obd build -z -t` does). Layer 2 is an "apt upgrade" on top:
a copy of that disk changed in place with `debugfs -w` (files rewritten, added, removed, as a
mounted filesystem would change), and only the 4 KiB blocks that differ are written into a
`WritableLayer` whose parent is layer 1, then committed the same way. The merged image must
equal the changed disk (raw2) byte for byte; run.py checks that over NBD.

Where each demo file lives on disk comes from `debugfs -R "blocks PATH"` on raw2, so the
reader can fetch exactly those blocks over NBD and compare them with the source file.
Generated data is deterministic (seeded); mkfs gets a fixed UUID and hash seed.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ObdError
from ..format.lsmt import SECTOR
from ..image.writable import WritableLayer
from ..tools.layer_tools import build_layer_from_raw

MiB = 1 << 20
FS_BLOCK = 4096
ALGORITHM = "zstd"
LAYER1_UUID = "5EED0001-0DB0-4D15-8C00-000000000001"
LAYER2_UUID = "5EED0002-0DB0-4D15-8C00-000000000002"
FS_UUID = "5eed0000-0db0-4d15-8c00-0000000000fe"
KERNEL_OLD = "6.1.0-18-amd64"
KERNEL_NEW = "6.1.0-20-amd64"

# Files read over NBD by the demo (all exist in raw2); the layer they mostly come from is
# shown so the audience sees reads served from both layers.
DEMO_FILES = (
    ("/etc/os-release", "layer 2"),
    (f"/boot/vmlinuz-{KERNEL_NEW}", "layer 2"),
    (f"/boot/initrd.img-{KERNEL_OLD}", "layer 1"),
    ("/usr/bin/bash", "layer 1"),
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "layer 2"),
)


class DemoBuildError(ObdError):
    """A tool the demo needs is missing or failed (mkfs.ext4, debugfs)."""


@dataclass(frozen=True)
class Layer:
    path: Path  # the blob (tar(zfile(lsmt)))
    digest: str
    size: int
    uuid: str


@dataclass(frozen=True)
class DemoFile:
    path: str  # inside the filesystem
    size: int
    sha256: str
    extents: tuple[tuple[int, int], ...]  # (disk byte offset, length) runs, in file order
    layer: str


@dataclass
class BuiltImage:
    raw1: Path
    raw2: Path
    disk_size: int
    data_bytes: int  # bytes of file data in the tree
    changed_bytes: int  # 4 KiB blocks that differ between raw1 and raw2
    layers: list[Layer] = field(default_factory=list)
    files: list[DemoFile] = field(default_factory=list)
    raw2_sha256: str = ""


def disk_mib_for(size_mib: int) -> int:
    """Virtual disk size for `size_mib` of file data: about 3× the data, 16 MiB steps, ≥ 32."""
    return max(32, -(-(3 * size_mib + 16) // 16) * 16)


def _tool(name: str) -> str:
    for d in ("/sbin", "/usr/sbin", "/bin", "/usr/bin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    p = shutil.which(name)
    if p is None:
        raise DemoBuildError(f"{name} not found: install e2fsprogs (scripts/setup.sh)")
    return p


def _run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000", LC_ALL="C")
    r = subprocess.run(argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, **kw)
    if r.returncode != 0:
        raise DemoBuildError(f"{' '.join(argv[:3])}... failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-500:]}")
    return r


# ------------------------------------------------------------------------------------ file data

_WORDS = (b"linux kernel module firmware package debian amd64 library shared object symbol "
          b"version config system service daemon network storage block device image layer "
          b"registry overlay lazy fetch cache commit index segment mapping sector").split()


def _text(rng: random.Random, n: int, tag: str) -> bytes:
    """Compressible text (log/doc/map-like lines)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        words = b" ".join(rng.choice(_WORDS) for _ in range(8))
        out += b"%s %08x %s\n" % (tag.encode(), i, words)
        i += 1
    return bytes(out[:n])


def _binary(rng: random.Random, n: int, incompressible: float) -> bytes:
    """ELF-ish mix: `incompressible` of the bytes random, the rest repetitive tables/strings."""
    out = bytearray()
    piece = 16 * 1024
    table = bytes(range(256)) * 128
    while len(out) < n:
        if rng.random() < incompressible:
            out += rng.randbytes(piece)
        else:
            off = rng.randrange(len(table) - piece)
            out += table[off: off + piece]
    return bytes(out[:n])


def make_tree(root: Path, size_mib: int, seed: int = 1) -> int:
    """Write the layer-1 file tree under `root`; returns the bytes of file data written."""
    rng = random.Random(seed)
    total = size_mib * MiB
    files: dict[str, bytes] = {
        "etc/os-release": (b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                           b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
                           b'ID=debian\nHOME_URL="https://www.debian.org/"\nBUILD_ID=tcmu-obd-demo-1\n'),
        "etc/hostname": b"obd-demo\n",
        "etc/fstab": b"LABEL=demo-root / ext4 defaults 0 1\n",
        "etc/passwd": b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",
        "etc/debian_version": b"12.5\n",
    }
    # Share of the data budget per big file; the rest goes to many small libs and docs.
    files[f"boot/vmlinuz-{KERNEL_OLD}"] = _binary(rng, int(total * 0.08), 0.95)
    files[f"boot/initrd.img-{KERNEL_OLD}"] = _binary(rng, int(total * 0.12), 0.6)
    files[f"boot/System.map-{KERNEL_OLD}"] = _text(rng, int(total * 0.05), "ffffffff81")
    files["usr/bin/bash"] = _binary(rng, max(64 * 1024, int(total * 0.02)), 0.5)
    files["usr/bin/python3.11"] = _binary(rng, int(total * 0.08), 0.5)
    files["usr/lib/x86_64-linux-gnu/libc.so.6"] = _binary(rng, int(total * 0.04), 0.5)
    files["usr/lib/x86_64-linux-gnu/libssl.so.3"] = _binary(rng, max(32 * 1024, int(total * 0.01)), 0.5)
    files["var/lib/dpkg/status"] = _text(rng, int(total * 0.03), "Package:")
    used = sum(len(v) for v in files.values())
    i = 0
    while used < total:
        n = min(total - used, rng.randrange(16 * 1024, 512 * 1024))
        if i % 3 == 2:
            files[f"usr/share/doc/pkg{i:04d}/changelog"] = _text(rng, n, f"pkg{i:04d}")
        else:
            files[f"usr/lib/x86_64-linux-gnu/libdemo{i:04d}.so.1"] = _binary(rng, n, 0.5)
        used += n
        i += 1
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return used


def upgrade_tree(root: Path, size_mib: int, seed: int = 2) -> dict[str, Path]:
    """The "apt upgrade": new versions of a few files, written under `root` (a staging dir).
    Returns {fs path: local file} to write into the disk; run.py also removes one file."""
    rng = random.Random(seed)
    total = size_mib * MiB
    new = {
        "/etc/os-release": (b'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
                            b'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\n'
                            b'ID=debian\nHOME_URL="https://www.debian.org/"\nBUILD_ID=tcmu-obd-demo-2\n'),
        "/etc/debian_version": b"12.7\n",
        f"/boot/vmlinuz-{KERNEL_NEW}": _binary(rng, int(total * 0.08), 0.95),
        "/usr/lib/x86_64-linux-gnu/libssl.so.3": _binary(rng, max(32 * 1024, int(total * 0.01)), 0.5),
        "/usr/bin/obd-demo-tool": _binary(rng, 200 * 1024, 0.5),
    }
    out: dict[str, Path] = {}
    for i, (fs_path, data) in enumerate(new.items()):
        p = root / f"f{i}"
        p.write_bytes(data)
        out[fs_path] = p
    return out


# ------------------------------------------------------------------------------------ ext4 tools


def mkfs(tree: Path, raw: Path, disk_mib: int) -> None:
    with open(raw, "wb") as f:
        f.truncate(disk_mib * MiB)
    _run([_tool("mkfs.ext4"), "-q", "-F", "-b", str(FS_BLOCK), "-L", "demo-root", "-U", FS_UUID,
          "-E", f"hash_seed={FS_UUID},root_owner=0:0", "-d", str(tree), str(raw)])


def debugfs_write(raw: Path, replace: dict[str, Path], remove: list[str]) -> None:
    """Change the filesystem in place, as a mounted system being upgraded would."""
    cmds: list[str] = []
    for fs_path in remove:
        cmds.append(f"rm {fs_path}")
    for fs_path, local in replace.items():
        d, name = os.path.split(fs_path)
        cmds += [f"cd {d or '/'}", f"rm {name}", f"write {local} {name}"]
    script = raw.with_suffix(".debugfs")
    script.write_text("\n".join(cmds) + "\n")
    r = _run([_tool("debugfs"), "-w", "-f", str(script), str(raw)])
    script.unlink()
    # debugfs reports "rm: File not found" for new files; anything else is a real failure
    bad = [ln for ln in r.stderr.splitlines() if ln.strip() and "File not found by ext2_lookup" not in ln
           and not ln.startswith("debugfs ")]
    if bad:
        raise DemoBuildError(f"debugfs on {raw.name}: {bad[0]}")


def file_extents(raw: Path, fs_path: str, size: int) -> tuple[tuple[int, int], ...]:
    """(disk offset, length) runs holding `fs_path`'s bytes, in file order."""
    out = _run([_tool("debugfs"), "-R", f"blocks {fs_path}", str(raw)]).stdout.split()
    blocks = [int(b) for b in out]
    need = -(-size // FS_BLOCK)
    if len(blocks) < need:
        raise DemoBuildError(f"debugfs lists {len(blocks)} blocks for {fs_path}, need {need}")
    runs: list[list[int]] = []
    for b in blocks[:need]:
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += 1
        else:
            runs.append([b, 1])
    extents: list[tuple[int, int]] = []
    left = size
    for b, n in runs:
        length = min(n * FS_BLOCK, left)
        extents.append((b * FS_BLOCK, length))
        left -= length
    return tuple(extents)


# ------------------------------------------------------------------------------------ layers


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _layer(path: Path, uuid: str) -> Layer:
    return Layer(path, "sha256:" + sha256_file(path), path.stat().st_size, uuid)


def diff_into_layer(raw1: Path, raw2: Path, layer: WritableLayer) -> int:
    """Write into `layer` every 4 KiB block where raw2 differs from raw1 (blocks that became
    zero are discarded, i.e. zeroed mappings). Returns the bytes changed."""
    changed = 0
    chunk = 4 * MiB
    zero = bytes(FS_BLOCK)
    with open(raw1, "rb") as a, open(raw2, "rb") as b:
        pos = 0
        while True:
            x, y = a.read(chunk), b.read(chunk)
            if not y:
                break
            x = x.ljust(len(y), b"\0")
            if x != y:
                run_start, run = -1, bytearray()

                def flush() -> None:
                    nonlocal run_start, run
                    if run_start >= 0:
                        layer.pwrite(run_start, bytes(run))
                    run_start, run = -1, bytearray()

                for i in range(0, len(y), FS_BLOCK):
                    nb, ob = y[i: i + FS_BLOCK], x[i: i + FS_BLOCK]
                    if nb == ob:
                        flush()
                        continue
                    changed += len(nb)
                    if nb == zero[: len(nb)]:
                        flush()
                        layer.discard(pos + i, -(-len(nb) // SECTOR) * SECTOR)
                        continue
                    if run_start < 0:
                        run_start = pos + i
                    run += nb
                flush()
            pos += len(y)
    return changed


def build_image(workdir: Path, size_mib: int, log=lambda msg: None) -> BuiltImage:
    """Build everything under `workdir`; returns where it is and what to expect."""
    workdir.mkdir(parents=True, exist_ok=True)
    disk_mib = disk_mib_for(size_mib)
    tree = workdir / "tree"
    raw1, raw2 = workdir / "disk-v1.raw", workdir / "disk-v2.raw"
    data_bytes = make_tree(tree, size_mib)
    mkfs(tree, raw1, disk_mib)
    log(f"ext4 disk: {disk_mib} MiB virtual, {data_bytes / MiB:.1f} MiB of files (mkfs.ext4 -d)")

    staged = workdir / "upgrade"
    staged.mkdir()
    replace = upgrade_tree(staged, size_mib)
    shutil.copyfile(raw1, raw2)
    debugfs_write(raw2, replace, remove=[f"/boot/System.map-{KERNEL_OLD}"])

    l1 = workdir / "layer1.tar"
    build_layer_from_raw(raw1, l1, uuid=LAYER1_UUID, user_tag=b"tcmu-obd demo base",
                         algorithm=ALGORITHM, tar=True)
    rw_data, rw_index = workdir / "layer2.data", workdir / "layer2.index"
    with WritableLayer.create(rw_data, rw_index, disk_mib * MiB, uuid=LAYER2_UUID, parent_uuid=LAYER1_UUID) as rw:
        changed = diff_into_layer(raw1, raw2, rw)
        l2 = workdir / "layer2.tar"
        rw.commit(l2, uuid=LAYER2_UUID, parent_uuid=LAYER1_UUID, user_tag=b"tcmu-obd demo apt upgrade",
                  algorithm=ALGORITHM, tar=True)
    rw_data.unlink()
    rw_index.unlink()
    built = BuiltImage(raw1=raw1, raw2=raw2, disk_size=disk_mib * MiB, data_bytes=data_bytes,
                       changed_bytes=changed, layers=[_layer(l1, LAYER1_UUID), _layer(l2, LAYER2_UUID)])
    log(f"layer 1: {built.layers[0].size / MiB:.1f} MiB blob ({ALGORITHM}, tar) {built.layers[0].digest[:19]}…; "
        f"layer 2 (apt upgrade): {changed / MiB:.1f} MiB changed → {built.layers[1].size / MiB:.1f} MiB blob")

    for fs_path, layer_name in DEMO_FILES:
        local = replace.get(fs_path) or tree / fs_path.lstrip("/")
        size = local.stat().st_size
        built.files.append(DemoFile(fs_path, size, sha256_file(local), file_extents(raw2, fs_path, size), layer_name))
    built.raw2_sha256 = sha256_file(raw2)
    shutil.rmtree(tree)
    shutil.rmtree(staged)
    raw1.unlink()  # only raw2 (the expected disk) is needed from here on
    return built

