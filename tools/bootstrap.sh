#!/usr/bin/env bash
# Makes a fresh Debian 12 machine able to build, run and test the project:
# apt packages, the pinned Python venv, and the guest kernel. Idempotent:
# when everything is already there it does no work and prints nothing.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
state=${KATA_VMFACTORY_STATE:-/var/cache/kata-vmfactory}
venv=${KATA_VMFACTORY_VENV:-$state/venv}

# What a `debootstrap --variant=minbase bookworm` root lacks for the README's
# two commands (tools/fresh-machine-check.sh proves the list):
# - bazel-bootstrap: Debian's Bazel 4.2.3 (the newest reachable offline);
# - python3-dev, gcc, libc6-dev: Python.h and a C toolchain for the Cython
#   extensions in native/ and the guest's static helper (bazel-bootstrap pulls
#   build-essential today; named here because the project needs them, not Bazel);
# - python3-venv: the pinned venv; ca-certificates: pip's HTTPS;
# - busybox-static and cpio go into the guest image;
# - systemd brings systemd-analyze, which checks the VMCache unit;
# - containerd (it brings runc and containerd-shim-runc-v2): the engine the containerd tests
#   drive kata-runtime with. Its tests start a private daemon; the system service stays as
#   Debian installs it (enabled, for a node that uses containerd), and no test talks to it.
apt_packages=(bazel-bootstrap qemu-system-x86 busybox-static cpio
              python3 python3-dev python3-venv gcc libc6-dev ca-certificates systemd containerd)

step() { printf 'bootstrap: %s\n' "$*" >&2; }

missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" -eq 0 ] || { echo "bootstrap: need root to install ${missing[*]}" >&2; exit 1; }
  step "installing ${missing[*]}"
  t0=$SECONDS
  # apt's output is kept for a failure only (dpkg reports on stdout).
  apt_log=$(mktemp /tmp/bootstrap-apt.XXXXXX)
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$apt_log" 2>&1; then
    tail -n 40 "$apt_log" >&2
    echo "bootstrap: installing ${missing[*]} failed (apt's last lines above, all of it in $apt_log)" >&2
    exit 1
  fi
  rm -f "$apt_log"
  step "apt done in $((SECONDS - t0)) s"
fi

# The venv runs on the machine's CPython (a shared libpython build: the guest
# image carries the same interpreter). A stamp of the requirements' hash makes
# the second run free.
base_python=${KATA_VMFACTORY_PYTHON:-$(command -v python3)}
want=$(cat "$root/requirements.txt" | sha256sum | cut -d' ' -f1)
have=$(cat "$venv/.requirements.sha256" 2>/dev/null || true)
if [ "$want" != "$have" ] || [ ! -x "$venv/bin/python3" ]; then
  t0=$SECONDS
  if [ ! -x "$venv/bin/python3" ]; then
    step "creating venv $venv"
    mkdir -p "$(dirname "$venv")"
    "$base_python" -m venv "$venv"
  fi
  step "installing requirements.txt into $venv"
  "$venv/bin/python3" -m pip install -q --disable-pip-version-check -r "$root/requirements.txt"
  echo "$want" > "$venv/.requirements.sha256"
  step "venv done in $((SECONDS - t0)) s"
fi

# The guest kernel is pinned (tools/guest_kernel.pin.json); a stamp of the
# pin file's hash, written once `current` is that kernel, makes the second run free.
pin_want=$(sha256sum < "$root/tools/guest_kernel.pin.json" | cut -d' ' -f1)
pin_have=$(cat "$state/kernel/.pin.sha256" 2>/dev/null || true)
if [ "$pin_want" != "$pin_have" ] || [ ! -e "$state/kernel/current/kernel.json" ]; then
  t0=$SECONDS
  step "fetching the pinned guest kernel into $state/kernel"
  "$venv/bin/python3" "$root/tools/guest_kernel.py" --cache-dir "$state/kernel"
  echo "$pin_want" > "$state/kernel/.pin.sha256"
  step "kernel done in $((SECONDS - t0)) s"
fi
