#!/usr/bin/env bash
# clawgate load benchmark: ONE command.
#   benchmarks/run.sh            full run (3 repetitions, ~20 min)
#   benchmarks/run.sh --quick    smoke test (1 repetition, short measurements, ~3 min)
#   benchmarks/run.sh --help     all options (targets, tests, durations, --tailscale-socket ...)
#   benchmarks/run.sh --topology loopback   everything on 127.0.0.1 (no namespaces)
# It installs what is missing (nginx, haproxy, gcc, libssl-dev, openssl, iproute2: Debian apt,
# as root), builds the C load client (with OpenSSL) and echo backend into benchmarks/out/,
# checks them against python websockets, then runs every target and writes
# benchmarks/out/results-*.json and benchmarks/RESULTS.md.
# Traffic stays on loopback and inside two network namespaces the harness creates (and
# deletes) itself; every load run is bounded in count and time, the whole run by --max-minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
OUT=$ROOT/benchmarks/out
mkdir -p "$OUT"

args=() check=1
for a in "$@"; do
  case "$a" in
    --no-check) check=0 ;;
    --help|-h) exec "$PY" -m benchmarks --help ;;
    *) args+=("$a") ;;
  esac
done

need=()
command -v nginx   >/dev/null || need+=(nginx)
command -v haproxy >/dev/null || need+=(haproxy)
command -v gcc     >/dev/null || need+=(gcc libc6-dev)
command -v taskset >/dev/null || need+=(util-linux)
command -v openssl >/dev/null || need+=(openssl)
command -v ip      >/dev/null || need+=(iproute2)
[ -e /usr/include/openssl/ssl.h ] || need+=(libssl-dev)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then echo "run.sh: need root to apt-get install ${need[*]}" >&2; exit 1; fi
  echo "run.sh: installing ${need[*]} from Debian" >&2
  policy_tmp=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep apt from starting nginx/haproxy services
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
    policy_tmp=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$policy_tmp" = 1 ]; then rm -f /usr/sbin/policy-rc.d; trap - EXIT; fi
fi

for prog in echo loadgen; do
  src=benchmarks/$prog.c
  if [ ! -x "$OUT/$prog" ] || [ "$src" -nt "$OUT/$prog" ] || [ benchmarks/ws_common.h -nt "$OUT/$prog" ]; then
    echo "run.sh: gcc -O2 $src -> benchmarks/out/$prog" >&2
    libs=(); [ "$prog" = loadgen ] && libs=(-lssl -lcrypto)
    gcc -O2 -Wall -Wextra -o "$OUT/$prog" "$src" "${libs[@]}"
  fi
done

# 10,000 idle connections = 10k client sockets + 20k proxy sockets + 10k echo sockets
ulimit -Hn 262144 2>/dev/null || true
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ "$check" = 1 ]; then
  "$PY" -m benchmarks.check
fi
export BENCH_COMMAND="benchmarks/run.sh $*"
exec "$PY" -m benchmarks "${args[@]}"
