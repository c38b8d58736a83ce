"""The ``clawgate`` command: one module per group of subcommands.

main (parser, serve, check-config, reload), tokens, jwt (keygen, issue, JWT revocation),
ops (status), doctor, firewall; common holds what they share. This package is the only
place that reads argv or the environment for settings, or installs uvloop.
"""

from __future__ import annotations

from .main import main

__all__ = ["main"]
