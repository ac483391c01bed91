#!/usr/bin/env bash
# The README's two commands on a fresh Debian 12, as a new user would run them:
# a `debootstrap --variant=minbase bookworm` root with only this machine's
# package-registry settings copied in, a clean clone of HEAD, then
#   ./bazelw run //vmcache:server   until the pool is full (then stopped), and
#   ./bazelw test //...
# Run it (as root) before a change to the bootstrap or the guest lands. Slow:
# it installs everything from scratch (about 10 min before the tests start).
#
# Usage: tools/fresh-machine-check.sh [--keep] [--workdir DIR] [--test-args "ARGS"]
#   --keep        leave the root in place afterwards (the mounts are always undone)
#   --workdir     where the root and the logs go (default: a new directory under /var/tmp;
#                 the root is removed at the end, the logs stay)
#   --test-args   extra arguments for `bazel test //...` (e.g. "--test_output=errors")
#
# Everything it mounts lives in a private mount namespace of its own, so a
# killed run leaves no mount on the host; the trap also stops the processes
# running inside the root, unmounts and removes the root on failure or Ctrl-C.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
suite=bookworm
# The pool of the default configuration fills in ~10-60 s under TCG; ten
# minutes means the server is broken, not slow.
server_full_timeout_s=600
# SIGTERM makes the server stop its VMs and unmount its template; give it that long.
server_stop_timeout_s=60

keep=0
workdir=""
test_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) keep=1 ;;
    --workdir) workdir=$2; shift ;;
    --test-args) test_args=$2; shift ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "fresh-machine-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

say() { printf 'fresh-machine-check: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (debootstrap, chroot, mounts); run it with sudo"

# Re-run inside a private mount namespace: the mounts below vanish with it.
if [ -z "${KVF_FRESH_IN_NS:-}" ]; then
  export KVF_FRESH_IN_NS=1
  exec unshare --mount --propagation private -- "$0" "$@" \
    $([ $keep = 1 ] && echo --keep) ${workdir:+--workdir "$workdir"} ${test_args:+--test-args "$test_args"}
fi

started=$SECONDS
phase_start=$SECONDS
phase() { say "$1 took $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap on the host"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

head=$(git -C "$repo" rev-parse HEAD)
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  say "warning: uncommitted changes in $repo are NOT checked (the clone is HEAD $head)"
fi

if [ -z "$workdir" ]; then
  workdir=$(mktemp -d /var/tmp/kvf-fresh.XXXXXX)
else
  mkdir -p "$workdir"
fi
root=$workdir/root
src=/src/kata-vmfactory
server_pid=""
# The server's process group (see below), or its first pid before setsid has run.
server_alive() { kill -0 -- "-$server_pid" 2>/dev/null || kill -0 "$server_pid" 2>/dev/null; }
stop_server() {
  kill -TERM -- "-$server_pid" 2>/dev/null || kill -TERM "$server_pid" 2>/dev/null
  for _ in $(seq "$server_stop_timeout_s"); do server_alive || return 0; sleep 1; done
  return 1
}

# Pids of processes whose root directory is the chroot: only what this check started.
inside_pids() {
  local p
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ] && echo "${p#/proc/}"
  done
  return 0
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  if [ -n "$server_pid" ] && server_alive; then
    stop_server
  fi
  if [ -x "$root/usr/bin/bazel" ] && [ -d "$root$src" ]; then
    chroot "$root" /bin/sh -c "cd $src && bazel shutdown" >/dev/null 2>&1
  fi
  local pids
  pids=$(inside_pids)
  if [ -n "$pids" ]; then
    say "stopping what still runs in the root: $(echo $pids)"
    kill -TERM $pids 2>/dev/null; sleep 2; kill -KILL $(inside_pids) 2>/dev/null
  fi
  # Deepest mounts first; the namespace would drop them anyway on exit.
  grep -F " $root" /proc/self/mounts | cut -d' ' -f2 | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null
  done
  if grep -qF " $root" /proc/self/mounts; then
    say "mounts remain under $root; not removing it"
  elif [ $keep = 1 ]; then
    say "kept $root"
  else
    rm -rf --one-file-system "$root"
  fi
  say "logs in $workdir"
  say "total $((SECONDS - started)) s, exit code $rc"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The host's Debian mirror and its keyring: the first deb822 stanza (or
# sources.list line) that serves $suite.
mirror=""
keyring=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -e "$f" ] || continue
  read -r mirror keyring < <(awk -v suite="$suite" '
    /^[[:space:]]*$/ { if (uri != "" && ok) { print uri, key; exit } uri = ""; key = ""; ok = 0; next }
    /^URIs:/ { uri = $2 } /^Signed-By:/ { key = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite) ok = 1 }
    END { if (uri != "" && ok) print uri, key }' "$f") || true
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -e /etc/apt/sources.list ]; then
  mirror=$(awk -v suite="$suite" '$1 == "deb" && $3 == suite { print $2; exit }' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || die "no apt source for $suite in /etc/apt/sources.list{,.d}: cannot pick a mirror"

say "debootstrap --variant=minbase $suite into $root (HEAD $head)"
debootstrap --variant=minbase ${keyring:+--keyring="$keyring"} "$suite" "$root" "$mirror" \
  > "$workdir/debootstrap.log" 2>&1 || { tail -20 "$workdir/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
phase "debootstrap"

# This machine's package-registry settings, read now (never stored in the repository).
rm -f "$root/etc/apt/sources.list"
cp -a /etc/apt/sources.list "$root/etc/apt/" 2>/dev/null || true
for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources /etc/apt/apt.conf.d/* /etc/apt/auth.conf.d/*; do
  [ -f "$f" ] || continue
  mkdir -p "$root$(dirname "$f")"
  cp -a "$f" "$root$f"
done
for f in $(grep -hoE '^Signed-By:[[:space:]]*/\S+|signed-by=/[^] ]+' /etc/apt/sources.list.d/* /etc/apt/sources.list 2>/dev/null \
           | sed -E 's/^Signed-By:[[:space:]]*//; s/^signed-by=//' | sort -u); do
  [ -f "$f" ] && { mkdir -p "$root$(dirname "$f")"; cp -a "$f" "$root$f"; }
done
for f in /etc/pip.conf /etc/xdg/pip /root/.config/pip /root/.pip ${PIP_CONFIG_FILE:-}; do
  [ -e "$f" ] || continue
  mkdir -p "$root$(dirname "$f")"
  cp -a "$f" "$root$(dirname "$f")/"
done
# Extra CAs: the root's ca-certificates (installed by the bootstrap) adds them to its bundle.
if [ -d /usr/local/share/ca-certificates ]; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
cp -L /etc/hosts "$root/etc/hosts"

# A booted machine's / is a mount point; dockerd's image loading remounts it (private) and
# fails on a plain directory. Before any other mount here, so they land on top of it.
mount --bind "$root" "$root"

# pip settings given in the environment go in too; paths they name are bound read-only,
# except the CA bundle, which the root's ca-certificates builds (with the extra CAs above).
env_args=(HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin)
while IFS='=' read -r name value; do
  env_args+=("$name=$value")
  for v in $value; do
    case "$v" in /etc/ssl/*|/usr/share/ca-certificates/*|/usr/local/share/ca-certificates/*) continue ;; esac
    if [[ "$v" == /* ]] && [ -e "$v" ] && [ ! -e "$root$v" ]; then
      if [ -d "$v" ]; then mkdir -p "$root$v"; else mkdir -p "$root$(dirname "$v")"; touch "$root$v"; fi
      mount --bind "$v" "$root$v" && mount -o remount,bind,ro "$root$v"
    fi
  done
done < <(env | grep -E '^(PIP_[A-Z_]+|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE)=' || true)

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
# systemd mounts the cgroup2 hierarchy on a booted Debian; dockerd refuses to start without it.
mount -t cgroup2 cgroup2 "$root/sys/fs/cgroup"
mount --rbind /dev "$root/dev"   # /dev/kvm, /dev/pts, /dev/shm
mount -t tmpfs -o mode=755 tmpfs "$root/run"

git clone -q --no-checkout "$repo" "$root$src"
git -C "$root$src" checkout -q --detach "$head"
phase "root set-up (registry settings, mounts, clone)"

inroot() { chroot "$root" /usr/bin/env -i "${env_args[@]}" /bin/bash -c "cd $src && $1"; }

# 1. The server command, until the pool is full. Its first run is the bootstrap.
server_log=$workdir/server.log
say "./bazelw run //vmcache:server (log: $server_log)"
# Its own session and process group (setsid keeps the pid): SIGTERM to the group reaches the
# server whichever of bazelw, the Bazel client or the binary holds it.
( exec setsid chroot "$root" /usr/bin/env -i "${env_args[@]}" /bin/bash -c \
    "cd $src && exec ./bazelw run //vmcache:server" ) > "$server_log" 2>&1 &
server_pid=$!
deadline=$((SECONDS + server_full_timeout_s))
full=0
while server_alive; do
  if grep -q 'vmcache: VM cache server start' "$server_log"; then
    want=$(sed -nE 's/^vmcache: preparing ([0-9]+) .*/\1/p' "$server_log" | head -1)
    have=$(grep -c '^vmcache: VM .* ready in' "$server_log" || true)
    if [ -n "$want" ] && [ "$have" -ge "$want" ]; then full=1; break; fi
  fi
  # The first run spends a long time in the bootstrap and the build: the
  # deadline counts from the server's own start.
  grep -q '^vmcache: preparing' "$server_log" || deadline=$((SECONDS + server_full_timeout_s))
  [ $SECONDS -lt $deadline ] || break
  sleep 2
done
if [ $full = 1 ]; then
  phase "set-up + build + server start to a full pool of $want"
  grep -E '^(bootstrap|vmcache):' "$server_log" | sed 's/^/  /' >&2
else
  tail -30 "$server_log" >&2
  die "the server did not reach a full pool (log above)"
fi
stop_server || die "the server did not stop within ${server_stop_timeout_s} s of SIGTERM"
server_pid=""
grep -q 'vmcache: VM cache server stop' "$server_log" || die "the server exited without its stop message (see $server_log)"
phase "server stop"

# 2. The test command.
test_log=$workdir/test.log
say "./bazelw test //... (log: $test_log)"
set +e
inroot "./bazelw test //... $test_args" > "$test_log" 2>&1
test_rc=$?
set -e
grep -E '^//|Executed|PASSED|FAILED|TIMEOUT' "$test_log" | tail -60 >&2
phase "./bazelw test //..."
[ $test_rc -eq 0 ] || die "./bazelw test //... exited $test_rc (log: $test_log)"
say "PASSED: both README commands on a fresh Debian 12 root"
