#!/bin/sh
# One-time set-up on a fresh Debian 12 machine: system packages, then the project in .venv/.
# Safe to re-run; it only installs what is missing.
set -eu
cd "$(dirname "$0")/.."

APT_PACKAGES="
  python3-venv python3-dev gcc libffi-dev
  libtcmu2 tcmu-runner
  docker-registry apache2-utils skopeo
  qemu-system-x86 qemu-utils nbdkit libnbd-bin
  e2fsprogs busybox-static cpio kmod bc open-iscsi fio udev
  iproute2 zstd liblz4-1 systemd tinyproxy
"
missing=""
for p in $APT_PACKAGES; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
fi

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel cffi
# Editable mode "compat" puts the checkout on sys.path with one .pth line; the default mode
# installs an import hook that every interpreter start loads (~20 ms, pathlib and friends)
# before the program runs, which a regular install does not. Setuptools calls compat
# transitional: if it is gone, the default mode.
.venv/bin/python -m pip install -q -e '.[test,bench]' --config-settings editable_mode=compat 2>/dev/null ||
  .venv/bin/python -m pip install -q -e '.[test,bench]'
# An editable install leaves our modules uncompiled; compile them now, as pip does for a
# regular install, so no run (with PYTHONDONTWRITEBYTECODE set, every run) pays for it.
.venv/bin/python -m compileall -q tcmu_obd >/dev/null
echo "tcmu-obd installed: $(.venv/bin/tcmu-obd --version)"
