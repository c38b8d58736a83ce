#!/usr/bin/env bash
# Hot-path A/B: proxy CPU per connection / per message, baseline splice alongside.
#   benchmarks/profile_hotpath.sh [--reps 3] [--root before=/tmp/tree --root after=.] [--pyspy NAME]
# See benchmarks/profile_hotpath.py and benchmarks/notes/hotpath.md.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-$(pwd)/.venv/bin/python}" -m benchmarks.profile_hotpath "$@"
