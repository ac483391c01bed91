#!/usr/bin/env bash
# Makes a fresh Debian 12 machine able to build, run and test the project:
# apt packages, the pinned Python venv, the guest kernel, and an extracted (not installed)
# dockerd for the Docker test. Idempotent:
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
# - busybox-static and cpio go into the guest image, lz4 compresses it (the format the guest
#   kernel unpacks fastest under TCG);
# - systemd brings systemd-analyze, which checks the VMCache unit;
# - containerd (it brings runc and containerd-shim-runc-v2): the engine the containerd tests
#   drive kata-runtime with. Its tests start a private daemon; the system service stays as
#   Debian installs it (enabled, for a node that uses containerd), and no test talks to it;
# - procps: `kata-runtime ps ID` prints the host's `ps` table of the container's processes, as
#   runc does (containerd's Top uses the JSON form).
apt_packages=(bazel-bootstrap qemu-system-x86 busybox-static cpio lz4
              python3 python3-dev python3-venv gcc libc6-dev ca-certificates systemd containerd procps)

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

# Docker's daemon for //tests/integration:docker_test: Debian's docker.io (dockerd 20.10),
# downloaded and extracted into the cache, NOT installed (no docker service or group, no
# /var/lib/docker, no iptables rules on this machine); the test starts a private dockerd from it.
# About 36 MB, 1-3 s here; the extracted tree makes the second run free (remove $state/docker
# to fetch a newer one). Without docker.io in the apt sources the test skips, saying why.
docker_root=$state/docker/root
if [ ! -x "$docker_root/usr/sbin/dockerd" ]; then
  t0=$SECONDS
  step "fetching Debian's docker.io into $state/docker (extracted, not installed)"
  docker_tmp=$(mktemp -d "$state/docker.XXXXXX")
  # apt drops to the _apt user to download; the directory is root's, so download as root. A
  # stale package list names a version the mirror no longer has: update it once and retry.
  fetch_docker() { (cd "$docker_tmp" && apt-get download -qq -o APT::Sandbox::User=root docker.io) >/dev/null 2>&1; }
  if { fetch_docker || { apt-get update -qq >/dev/null 2>&1 && fetch_docker; }; } \
       && dpkg-deb -x "$docker_tmp"/docker.io_*.deb "$docker_tmp/root"; then
    mkdir -p "$state/docker"
    rm -rf "$docker_root"
    mv "$docker_tmp/root" "$docker_root"
    step "docker.io done in $((SECONDS - t0)) s ($("$docker_root/usr/sbin/dockerd" --version))"
  else
    step "could not fetch docker.io; //tests/integration:docker_test will skip"
  fi
  rm -rf "$docker_tmp"
fi
