"""clawgate: an access-control proxy in front of the OpenClaw gateway, for Tailscale.

The import name is ``proxy``; the distribution and console script are ``clawgate``.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
