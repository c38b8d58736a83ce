#!/usr/bin/env bash
# Build (once) the Debian bookworm root filesystem the deployment tests run: the local base
# image for `docker build` (no image can be pulled here) and the systemd-nspawn machine that
# boots config/clawgate.service. debootstrap --variant=minbase plus python3 (3.11), venv,
# systemd and dbus; cached as a tarball in a folder reused across runs.
#
#   scripts/install-rootfs.sh        # build if needed; prints on stdout: ROOTFS_TAR=<path>
#
# Env: CLAWGATE_CACHE (default ~/.cache/clawgate). Needs root and debootstrap. The mirror is
# debootstrap's default (the Debian archive, as apt uses it). Progress goes to stderr.
set -euo pipefail

SUITE=bookworm
# Bump the version when the package list changes: the cached tarball is keyed by it.
VERSION=1
INCLUDE=python3,python3-venv,systemd,systemd-sysv,dbus,iproute2
CACHE="${CLAWGATE_CACHE:-$HOME/.cache/clawgate}"
TAR="$CACHE/rootfs-$SUITE-v$VERSION.tar"

log() { printf 'install-rootfs: %s\n' "$*" >&2; }
die() { log "ERROR: $1"; exit 1; }

mkdir -p "$CACHE"
exec 9>"$CACHE/.rootfs.lock"
flock -w 900 9 || die "another install-rootfs.sh holds $CACHE/.rootfs.lock"
if [ ! -s "$TAR" ]; then
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  command -v debootstrap >/dev/null || die "debootstrap is not installed"
  work=$(mktemp -d "$CACHE/.rootfs-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log "debootstrap --variant=minbase $SUITE (+ $INCLUDE), about a minute"
  debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$work/root" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
  # Smaller and reproducible enough: no apt lists or package cache in the image.
  rm -rf "$work/root/var/lib/apt/lists/"* "$work/root/var/cache/apt/"*.bin \
    "$work/root/var/cache/apt/archives/"*.deb
  chroot "$work/root" python3 -c \
    'import sys, venv, ensurepip; assert sys.version_info[:2] == (3, 11), sys.version' \
    || die "the rootfs has no python3.11 with venv"
  tar -C "$work/root" --numeric-owner -cf "$work/rootfs.tar" .
  mv -f "$work/rootfs.tar" "$TAR"
  log "cached $TAR ($(du -h "$TAR" | cut -f1))"
fi
echo "ROOTFS_TAR=$TAR"
