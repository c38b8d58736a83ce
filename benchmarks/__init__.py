"""clawgate load benchmark: run with benchmarks/run.sh (see benchmarks/harness.py)."""
