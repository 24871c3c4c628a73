#!/bin/bash
# Build (or refresh) the VM rig: guest kernel + initramfs, cached in the rig dir.
#
#   tests/vm/build-rig.sh [RIG_DIR]        (default: <repo>/rig, git-ignored)
#
# Steps (each skipped when its output is already there and up to date):
#   1. pick the kernel version Debian's linux-image-amd64 depends on (or $RIG_KVER),
#      `apt-get download` the .deb (needs network to the Debian archive), `dpkg-deb -x` it
#   2. `depmod` the unpacked tree (the package ships no modules.dep; its postinst makes it)
#   3. extract the uncompressed ELF vmlinux from vmlinuz (PVH boot: qemu skips the XZ
#      decompression, ~4 s faster per boot under TCG)
#   4. resolve the module load order with `modprobe --show-depends` (softdeps included),
#      copy busybox-static + tests/vm/init + those modules into a gzip cpio initramfs
#
# Host packages: qemu-system-x86 busybox-static cpio kmod (apt-get), python3 (vmlinux extraction).
# Exit status != 0 with a message on stderr when anything is missing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RIG=${1:-${RIG_DIR:-$REPO/rig}}
mkdir -p "$RIG"
RIG=$(cd "$RIG" && pwd)

die() { echo "build-rig: error: $*" >&2; exit 1; }
log() { echo "build-rig: $*" >&2; }

for tool in busybox cpio depmod modprobe gzip python3 dpkg-deb qemu-system-x86_64; do
    p=$(command -v "$tool" || true)
    [ -n "$p" ] || [ -x "/sbin/$tool" ] || [ -x "/usr/sbin/$tool" ] || \
        die "missing host tool '$tool' (apt-get install -y qemu-system-x86 busybox-static cpio kmod)"
done
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "/bin/busybox missing (apt-get install -y busybox-static)"
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || \
    log "warning: $BUSYBOX does not look static; install busybox-static"

# 1. kernel version + package --------------------------------------------------------
resolve_kver() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: linux-image-\(6\.1\.0-[0-9]*-amd64\)$/\1/p' | head -n1
}
KVER=${RIG_KVER:-}
if [ -z "$KVER" ] && [ -f "$RIG/kernel.version" ]; then
    KVER=$(cat "$RIG/kernel.version")   # keep the cached kernel while it is usable
    if [ ! -f "$RIG/kernel/lib/modules/$KVER/modules.dep" ] && \
       ! ls "$RIG"/linux-image-"$KVER"_*_amd64.deb >/dev/null 2>&1; then
        KVER=   # cache gone: follow the archive (an old ABI may no longer be downloadable)
    fi
fi
if [ -z "$KVER" ]; then
    KVER=$(resolve_kver)
    [ -n "$KVER" ] || die "cannot resolve the kernel version: 'apt-cache depends linux-image-amd64' gave no linux-image-6.1.0-*-amd64 (run apt-get update, or set RIG_KVER)"
fi
MODDIR=$RIG/kernel/lib/modules/$KVER
if [ ! -f "$MODDIR/modules.dep" ] || [ ! -f "$RIG/kernel/boot/vmlinuz-$KVER" ]; then
    DEB=$(ls "$RIG"/linux-image-"$KVER"_*_amd64.deb 2>/dev/null | head -n1 || true)
    if [ -z "$DEB" ]; then
        log "downloading linux-image-$KVER (apt-get download)"
        (cd "$RIG" && apt-get download "linux-image-$KVER") >&2 || \
            die "apt-get download linux-image-$KVER failed: no network to the Debian archive? (the VM rig needs the guest kernel .deb)"
        DEB=$(ls "$RIG"/linux-image-"$KVER"_*_amd64.deb 2>/dev/null | head -n1 || true)
        [ -n "$DEB" ] || die "apt-get download produced no .deb for linux-image-$KVER"
    fi
    log "unpacking $(basename "$DEB")"
    rm -rf "$RIG/kernel"
    dpkg-deb -x "$DEB" "$RIG/kernel"
    # 2. module index (absolute base dir; the .deb has none)
    depmod -b "$RIG/kernel" "$KVER"
fi
echo "$KVER" > "$RIG/kernel.version"

# 3. uncompressed vmlinux (PVH entry) --------------------------------------------------
if [ ! -s "$RIG/vmlinux" ] || [ "$RIG/kernel/boot/vmlinuz-$KVER" -nt "$RIG/vmlinux" ]; then
    log "extracting vmlinux"
    python3 - "$RIG/kernel/boot/vmlinuz-$KVER" "$RIG/vmlinux.tmp" <<'EOF'
import lzma, sys
data = open(sys.argv[1], "rb").read()
magic = b"\xfd7zXZ\x00"
pos = data.find(magic)
while pos >= 0:
    try:
        dec = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = dec.decompress(data[pos:])
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
    except lzma.LZMAError:
        pass
    pos = data.find(magic, pos + 1)
sys.exit("no XZ-compressed ELF found in " + sys.argv[1])
EOF
    mv "$RIG/vmlinux.tmp" "$RIG/vmlinux"
fi

# 4. initramfs --------------------------------------------------------------------------
# Top-level modules; their dependencies and softdeps come from modprobe --show-depends.
WANT="virtio_pci 9pnet_virtio 9p overlay sd_mod
configfs target_core_mod target_core_user tcm_loop
target_core_file target_core_iblock target_core_pscsi iscsi_target_mod
crc32c_generic ext4 iscsi_tcp"
# Arch-accelerated variants are left out (the generic ones are listed); they are fine
# under TCG but not needed.
SKIP_RE='(crct10dif-pclmul|crc32c-intel)\.ko$'

STAMP_INPUT="$KVER $WANT $(sha256sum "$HERE/init" "$0" "$BUSYBOX" | cut -d' ' -f1 | tr '\n' ' ')"
STAMP=$(echo "$STAMP_INPUT" | sha256sum | cut -d' ' -f1)
if [ -s "$RIG/initramfs.img" ] && [ "$(cat "$RIG/initramfs.stamp" 2>/dev/null)" = "$STAMP" ]; then
    log "initramfs up to date ($RIG/initramfs.img)"
    exit 0
fi

log "building initramfs"
STAGE=$(mktemp -d "$RIG/initramfs.stage.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE"/{bin,sbin,dev,proc,sys,tmp,newroot,lower,upper,etc}
cp "$BUSYBOX" "$STAGE/bin/busybox"
for a in sh mount umount mkdir insmod modprobe ln cat echo chroot poweroff sleep ip mknod \
         switch_root env ls sync rm cp date uname; do
    ln -sf busybox "$STAGE/bin/$a"
done
cp "$HERE/init" "$STAGE/init"
chmod 755 "$STAGE/init"

: > "$STAGE/etc/modules.load"
declare -A seen=()
for m in $WANT; do
    while read -r verb path _; do
        [ "$verb" = insmod ] || continue
        [[ $path =~ $SKIP_RE ]] && continue
        [ -n "${seen[$path]:-}" ] && continue
        seen[$path]=1
        rel=${path#"$RIG/kernel"}
        mkdir -p "$STAGE$(dirname "$rel")"
        cp "$path" "$STAGE$rel"
        echo "$rel" >> "$STAGE/etc/modules.load"
    done < <(modprobe -d "$RIG/kernel" -S "$KVER" --show-depends "$m" 2>/dev/null || \
             die "modprobe --show-depends $m failed")
done
[ -s "$STAGE/etc/modules.load" ] || die "no modules resolved"
cp "$MODDIR"/modules.builtin* "$MODDIR"/modules.order "$STAGE/lib/modules/$KVER/" 2>/dev/null || true
depmod -b "$STAGE" "$KVER"
(cd "$STAGE" && find . -print0 | cpio --null -o -H newc --quiet | gzip -1) > "$RIG/initramfs.img.tmp"
mv "$RIG/initramfs.img.tmp" "$RIG/initramfs.img"
echo "$STAMP" > "$RIG/initramfs.stamp"
log "initramfs: $(wc -l < "$STAGE/etc/modules.load") modules, $(du -h "$RIG/initramfs.img" | cut -f1)"
