"""The one exception tree of clawgate.

Every error clawgate raises on purpose is a :class:`ClawgateError`. Third-party
exceptions (OSError, aiohttp, pyjwt, json) are translated where they enter, so
callers only ever catch these. Each access error maps to exactly one HTTP status (a 403,
502 or 503 is a Decision or a direct answer of the front end, never an exception)::

    ClawgateError
    ├── ConfigError                 bad config: message names the key path; exit 2
    ├── TokenStoreError             unreadable/invalid token file
    ├── AccessError                 a request is refused; .status is the HTTP status
    │   ├── BadRequest              400  malformed or smuggling-shaped head
    │   ├── Unauthenticated         401  no/invalid credential (WWW-Authenticate: Bearer)
    │   ├── MisdirectedRequest      421  Host names something else (DNS rebinding)
    │   └── TooManyRequests         429  source locked out (Retry-After)
    └── TailscaleError              LocalAPI errors, translated from HTTP/OS errors
        ├── LocalAPIUnavailable     socket missing, refused, timeout, 5xx, bad JSON
        ├── PeerNotFound            404 from whois: not a tailnet peer
        └── LocalAPIDenied          403 from the LocalAPI (whois / cert access denied)
"""

from __future__ import annotations

__all__ = [
    "AccessError",
    "BadRequest",
    "ClawgateError",
    "ConfigError",
    "LocalAPIDenied",
    "LocalAPIUnavailable",
    "MisdirectedRequest",
    "PeerNotFound",
    "TailscaleError",
    "TokenStoreError",
    "TooManyRequests",
    "Unauthenticated",
]


class ClawgateError(Exception):
    """Base of every error clawgate raises on purpose."""


class ConfigError(ClawgateError):
    """The configuration is invalid. ``str(err)`` is ``"key.path: what is wrong"``."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class TokenStoreError(ClawgateError):
    """The token file cannot be read or is malformed."""


class AccessError(ClawgateError):
    """A request is refused. ``reason`` is short, safe to show, and never holds a secret."""

    status: int = 403

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class BadRequest(AccessError):
    status = 400


class HeadTooLarge(BadRequest):
    """More request-head lines or bytes than the limits allow (431).

    Raised by proxy.core.http1, which re-exports it. Defined here, in plain Python: a class
    compiled by mypyc that overrides a class attribute of a Python base (``status``) would
    keep the base's value."""

    status = 431


class Unauthenticated(AccessError):
    status = 401


class MisdirectedRequest(AccessError):
    status = 421


class TooManyRequests(AccessError):
    status = 429

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class TailscaleError(ClawgateError):
    """An error talking to tailscaled's LocalAPI."""


class LocalAPIUnavailable(TailscaleError):
    """Socket missing or refused, timeout, 5xx, or a body that is not the expected JSON."""


class PeerNotFound(TailscaleError):
    """whois answered 404: the address is not a node of this tailnet."""


class LocalAPIDenied(TailscaleError):
    """The LocalAPI answered 403 (``whois access denied`` / ``cert access denied``)."""
