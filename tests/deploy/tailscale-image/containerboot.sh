#!/bin/sh
# A stand-in for the official tailscale/tailscale image's containerboot, for the
# environment variables config/compose.yml sets (https://tailscale.com/kb/1282/docker):
#   TS_AUTHKEY, TS_STATE_DIR, TS_SOCKET, TS_USERSPACE (default true), TS_HOSTNAME,
#   TS_EXTRA_ARGS (to `tailscale up`), TS_TAILSCALED_EXTRA_ARGS (to tailscaled),
#   TS_ACCEPT_DNS (default false).
# tailscaled runs in the foreground (its exit ends the container); `tailscale up` runs
# beside it, as containerboot does.
set -eu
socket="${TS_SOCKET:-/tmp/tailscaled.sock}"
mkdir -p "$(dirname "$socket")"
set -- --socket="$socket"
if [ -n "${TS_STATE_DIR:-}" ]; then
  mkdir -p "$TS_STATE_DIR"
  set -- "$@" --statedir="$TS_STATE_DIR"
else
  set -- "$@" --state=mem:
fi
case "${TS_USERSPACE:-true}" in
  true|1) set -- "$@" --tun=userspace-networking ;;
  *) set -- "$@" --tun=tailscale0 ;;
esac
# shellcheck disable=SC2086  # word splitting of the *_EXTRA_ARGS is the interface
/usr/local/bin/tailscaled "$@" ${TS_TAILSCALED_EXTRA_ARGS:-} &
daemon=$!
trap 'kill -TERM "$daemon" 2>/dev/null' TERM INT
i=0
while [ ! -S "$socket" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
up_args="--accept-dns=${TS_ACCEPT_DNS:-false} --hostname=${TS_HOSTNAME:-$(cat /proc/sys/kernel/hostname)}"
[ -n "${TS_AUTHKEY:-}" ] && up_args="$up_args --authkey=$TS_AUTHKEY"
# shellcheck disable=SC2086
/usr/local/bin/tailscale --socket="$socket" up $up_args ${TS_EXTRA_ARGS:-} \
  || echo "containerboot: tailscale up exited $?" >&2 &
wait "$daemon" || true
wait "$daemon"
