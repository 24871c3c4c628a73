#!/bin/bash
# Boot the rig VM once, run a script inside it, power off.
#
#   tests/vm/run-vm.sh SCRATCH_DIR GUEST_SCRIPT [TIMEOUT_S]
#
# SCRATCH_DIR   writable dir shared into the guest (9p) at the same path; gets
#               console.log, guest-env.sh, guest-rc
# GUEST_SCRIPT  absolute host path of a bash script; the guest sees the host root read-only
#               (plus a tmpfs overlay), so it runs in place with cwd = SCRATCH_DIR
# TIMEOUT_S     hard wall-clock limit for qemu (default 600)
#
# Env: RIG_DIR (default <repo>/rig, built by build-rig.sh), RIG_MEM (default 3G), RIG_SMP (2).
# Exit status: the guest script's exit status; 124 = timeout; 125 = no guest-rc written.
# Only one VM runs at a time per rig dir (flock on RIG_DIR/vm.lock): TCG is CPU-heavy.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
RIG=${RIG_DIR:-$REPO/rig}
SCRATCH=$(cd "$1" && pwd)
GUEST_SCRIPT=$2
TMO=${3:-600}

for f in vmlinux initramfs.img; do
    [ -s "$RIG/$f" ] || { echo "run-vm: $RIG/$f missing: run tests/vm/build-rig.sh" >&2; exit 2; }
done
case "$GUEST_SCRIPT" in /*) ;; *) echo "run-vm: GUEST_SCRIPT must be absolute" >&2; exit 2 ;; esac

# The guest PATH: the real python bin dir first (pyenv shims are bash scripts that cost
# seconds per call under TCG), then the usual system dirs.
PYBIN=$(python3 -c 'import os,sys; print(os.path.dirname(os.path.realpath(sys.executable)))' 2>/dev/null || true)
GPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ -n "$PYBIN" ] && GPATH=$PYBIN:$GPATH
cat > "$SCRATCH/guest-env.sh" <<EOF
GPATH='$GPATH'
GHOME='/root'
EOF
rm -f "$SCRATCH/guest-rc"

exec 9>"$RIG/vm.lock"
flock 9

start=$EPOCHREALTIME
set +e
timeout --foreground -k 5 "$TMO" qemu-system-x86_64 \
    -accel tcg,thread=multi -cpu max -m "${RIG_MEM:-3G}" -smp "${RIG_SMP:-2}" \
    -nographic -monitor none -serial stdio -no-reboot -nic none \
    -kernel "$RIG/vmlinux" -initrd "$RIG/initramfs.img" \
    -append "console=ttyS0 panic=-1 loglevel=4 rig.scratch=$SCRATCH rig.run=$GUEST_SCRIPT" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev "local,id=scratch,path=$SCRATCH,security_model=none" \
    -device virtio-9p-pci,fsdev=scratch,mount_tag=scratch \
    </dev/null 2>&1 | while IFS= read -r line; do
        # host seconds since launch, so boot phases can be timed from outside
        printf '[%8.3f] %s\n' "$(bc <<<"$EPOCHREALTIME - $start")" "$line"
    done > "$SCRATCH/console.log"
qrc=${PIPESTATUS[0]}
set -e
grc=$(cat "$SCRATCH/guest-rc" 2>/dev/null || echo none)
echo "run-vm: qemu rc=$qrc guest-rc=$grc wall=$(bc <<<"$EPOCHREALTIME - $start")s" | tee -a "$SCRATCH/console.log" >&2
if [ "$qrc" = 124 ]; then exit 124; fi
case "$grc" in
    ''|none) exit 125 ;;
    *[!0-9]*) exit 125 ;;
    *) exit "$grc" ;;
esac
