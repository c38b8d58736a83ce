"""python -m benchmarks: see benchmarks/harness.py (benchmarks/run.sh builds and installs first)."""

import sys

from .harness import main

sys.exit(main())
