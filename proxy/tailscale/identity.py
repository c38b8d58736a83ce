"""Tailnet identities: the frozen ``Identity`` of a peer, its cache, and the monitor.

``IdentityCache`` answers "who is this peer" from memory on the per-connection hot path
and asks tailscaled at most once per new peer (single-flight). ``TailscaleMonitor`` keeps
the cache honest by flushing it on every network-map change seen on the IPN bus, and polls
status for our own addresses, backend state, key expiry and peer paths.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Protocol, TypeVar

from ..core.networks import hostport, is_loopback, unmap_ip
from ..errors import TailscaleError
from ..tasks import spawn

__all__ = [
    "BACKEND_STATES",
    "BUS_MASK",
    "Identity",
    "IdentityCache",
    "IdentitySource",
    "StatusSource",
    "TailscaleMonitor",
    "cache_key",
    "classify_notify",
    "is_loopback",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# ipn.State, in order: the IPN bus sends the index, status sends the name.
BACKEND_STATES: Final[tuple[str, ...]] = (
    "NoState",
    "InUseOtherUser",
    "NeedsLogin",
    "NeedsMachineAuth",
    "Stopped",
    "Starting",
    "Running",
)
# NotifyInitialState | NotifyRateLimit (merges bursts on 1.78+, ignored before).
BUS_MASK: Final = 2 | 256

# The shared pseudo-user of tagged nodes: never a person, never a login.
_TAGGED_LOGIN: Final = "tagged-devices"
# IPN bus fields that mean "the network map changed".
_NETMAP_FIELDS: Final = ("NetMap", "SelfChange", "PeersChanged", "PeersRemoved", "PeerChangedPatch")
# Fields that do not make a line non-bare: every line carries them.
_ALWAYS_FIELDS: Final = frozenset({"Version", "SessionID"})


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a tailnet peer is, from one whois answer. Immutable; safe to share and cache."""

    login: str | None
    display_name: str | None
    profile_pic: str | None
    node_name: str
    node_host: str
    node_id: str
    tags: tuple[str, ...] = ()
    os: str | None = None
    addresses: tuple[str, ...] = ()
    # Raw JSON values (dicts, lists) are unhashable: hash the rest, compare all.
    caps: Mapping[str, tuple[Any, ...]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    tailnet: str | None = None

    @property
    def tagged(self) -> bool:
        """A tagged node (server, CI runner) is identified by its tags, not a person."""
        return len(self.tags) > 0

    @property
    def principal(self) -> str:
        """The login, or ``"tag:a,tag:b"`` for a tagged node (``node:<name>`` if neither)."""
        if self.tags:
            return ",".join(self.tags)
        if self.login:
            return self.login
        return f"node:{self.node_name}"

    def to_log(self) -> dict[str, Any]:
        return {"node": self.node_name, "login": self.login, "tags": list(self.tags), "os": self.os}

    @classmethod
    def from_whois(cls, body: Any) -> Identity:
        """Build from a decoded ``apitype.WhoIsResponse``; unknown fields are ignored.

        Raises ValueError when a field we rely on is missing or of the wrong type.
        """
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        node = body.get("Node")
        if not isinstance(node, dict):
            raise ValueError("no Node")
        name = node.get("Name")
        if not isinstance(name, str) or not name:
            raise ValueError("Node has no Name")
        profile = body.get("UserProfile")
        if profile is not None and not isinstance(profile, dict):
            raise ValueError("UserProfile is not an object")
        profile = profile or {}
        tags = node.get("Tags")
        if tags is not None and (
            not isinstance(tags, list) or not all(isinstance(t, str) for t in tags)
        ):
            raise ValueError("Node.Tags is not a list of strings")
        tag_tuple = tuple(tags or ())
        addresses = node.get("Addresses")
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            raise ValueError("Node.Addresses is not a list of strings")
        hostinfo = node.get("Hostinfo")
        os_name = _opt_str(hostinfo.get("OS")) if isinstance(hostinfo, dict) else None

        computed = _opt_str(node.get("ComputedName"))
        fqdn = name.rstrip(".")
        tailnet: str | None = None
        if computed and name.startswith(computed + "."):
            tailnet = name[len(computed) + 1 :].rstrip(".") or None

        login: str | None = None
        display: str | None = None
        picture: str | None = None
        if not tag_tuple:
            login = _opt_str(profile.get("LoginName"))
            if login == _TAGGED_LOGIN:
                login = None
            else:
                display = _opt_str(profile.get("DisplayName"))
                picture = _opt_str(profile.get("ProfilePicURL"))

        return cls(
            login=login,
            display_name=display,
            profile_pic=picture,
            node_name=fqdn,
            node_host=computed or fqdn.split(".", 1)[0],
            node_id=_opt_str(node.get("StableID")) or "",
            tags=tag_tuple,
            os=os_name,
            # Node.Addresses are host prefixes ("100.1.2.3/32"): keep the address.
            addresses=tuple(a.split("/", 1)[0] for a in addresses),
            caps=_parse_capmap(body.get("CapMap")),
            tailnet=tailnet,
        )


def _parse_capmap(value: Any) -> Mapping[str, tuple[Any, ...]]:
    # CapMap has no omitempty: null when empty; a capability without values is null too.
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict):
        raise ValueError("CapMap is not an object")
    caps: dict[str, tuple[Any, ...]] = {}
    for name, values in value.items():
        if values is None:
            caps[name] = ()
        elif isinstance(values, list):
            caps[name] = tuple(values)
        else:
            raise ValueError(f"CapMap[{name!r}] is not a list")
    return MappingProxyType(caps)


class IdentitySource(Protocol):
    """Anything that can answer whois; ``LocalAPIClient`` in production, fakes in tests."""

    async def whois(self, ip: str, port: int) -> Identity: ...


class StatusLike(Protocol):
    """What the monitor reads of a status answer (``localapi.Status`` is one; a Protocol
    because localapi imports this module's ``Identity``)."""

    @property
    def backend_state(self) -> str: ...
    @property
    def tailscale_ips(self) -> tuple[str, ...]: ...
    @property
    def self_dns_name(self) -> str | None: ...
    @property
    def key_expiry(self) -> datetime | None: ...
    @property
    def expired(self) -> bool: ...
    @property
    def cert_domains(self) -> tuple[str, ...]: ...
    @property
    def tun(self) -> bool | None: ...
    @property
    def magic_dns_suffix(self) -> str: ...
    @property
    def peer_paths(self) -> Mapping[str, str]: ...


class StatusSource(Protocol):
    """What the monitor needs from the LocalAPI."""

    async def status(self, peers: bool = True) -> StatusLike: ...

    def watch_ipn_bus(self, mask: int) -> AsyncGenerator[dict[str, Any], None]: ...


def cache_key(ip: str, port: int) -> str:
    """The cache key of a peer: its IP (unmapped), never the port, except on loopback.

    With ``--tun=userspace-networking`` tailnet peers arrive from ``127.0.0.1:<ephemeral>``
    and only that exact ``ip:port`` identifies them, for the life of that connection.
    """
    # The same loopback rule as the front end's (proxy.core.networks): the two must
    # agree on which peers are userspace-networking peers.
    ip = unmap_ip(ip)
    if is_loopback(ip):
        return hostport(ip, port)
    return ip


class IdentityCache:
    """whois answers by peer key, with a TTL, single-flight misses and no cached failures.

    ``get`` is the hot path (one dict lookup and a float compare). ``lookup`` asks the
    source on a miss; concurrent misses for one key share one call. A failure
    (PeerNotFound, LocalAPIUnavailable, ...) reaches every waiter and is never stored.

    Loopback peers (userspace networking) are keyed ``ip:port``: call ``forget`` with
    ``cache_key(ip, port)`` when their connection closes, because the port is reused. A
    PeerNotFound for a loopback peer means "a local process, no identity": the caller
    treats it as no identity, never as a tailnet identity.
    """

    __slots__ = (
        "_clock",
        "_entries",
        "_generation",
        "_inflight",
        "_max_entries",
        "_source",
        "_tasks",
        "_ttl",
        "errors",
        "flushes",
        "hits",
        "misses",
    )

    def __init__(
        self,
        source: IdentitySource,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_entries: int = 65536,
    ) -> None:
        if ttl < 0 or max_entries <= 0:
            raise ValueError("ttl must be >= 0 (0: no caching) and max_entries positive")
        self._source = source
        self._ttl = ttl
        self._clock = clock
        self._max_entries = max_entries
        self._entries: dict[str, tuple[Identity, float]] = {}
        self._inflight: dict[str, asyncio.Task[Identity]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Bumped by flush(): an answer that was in flight across a flush is not stored.
        self._generation = 0
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, ip: str, port: int = 0) -> Identity | None:
        """The fresh cached identity of a peer, or None. Never does I/O."""
        entry = self._entries.get(ip)
        if entry is None:
            # Only v4-mapped and loopback peers have a key other than their IP.
            key = cache_key(ip, port)
            if key == ip:
                return None
            entry = self._entries.get(key)
            if entry is None:
                return None
        if entry[1] > self._clock():
            self.hits += 1
            return entry[0]
        return None

    async def lookup(self, ip: str, port: int) -> Identity:
        """The identity of a peer, from the cache or one (shared) whois call."""
        key = cache_key(ip, port)
        entry = self._entries.get(key)
        if entry is not None and entry[1] > self._clock():
            self.hits += 1
            return entry[0]
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            task = spawn(self._fetch(key, ip, port, self._generation), f"whois {key}", self._tasks)
            self._inflight[key] = task
        # shield: one cancelled waiter must not cancel the call the others wait for.
        return await asyncio.shield(task)

    async def _fetch(self, key: str, ip: str, port: int, generation: int) -> Identity:
        try:
            identity = await self._source.whois(ip, port)
        except Exception:
            self.errors += 1
            raise
        finally:
            if self._inflight.get(key) is asyncio.current_task():
                del self._inflight[key]
        if generation == self._generation:
            self._store(key, identity)
        return identity

    def _store(self, key: str, identity: Identity) -> None:
        if self._ttl == 0:
            return  # cacheTtl 0: every new connection asks tailscaled (single-flight only)
        now = self._clock()
        if len(self._entries) >= self._max_entries and key not in self._entries:
            self._evict(now)
        self._entries[key] = (identity, now + self._ttl)

    def _evict(self, now: float) -> None:
        for stale in [k for k, (_, expires) in self._entries.items() if expires <= now]:
            del self._entries[stale]
        # Still full: drop the oldest insertions (dicts keep insertion order).
        excess = len(self._entries) - self._max_entries + 1
        for old in list(self._entries)[: max(excess, 0)]:
            del self._entries[old]

    def forget(self, key: str) -> None:
        """Drop one entry (a closed loopback connection: its port will be reused)."""
        self._entries.pop(key, None)

    def flush(self) -> None:
        """Drop everything, including in-flight calls: the network map changed."""
        self._entries.clear()
        self._inflight.clear()
        self._generation += 1
        self.flushes += 1

    async def aclose(self) -> None:
        """Cancel in-flight whois calls (shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def classify_notify(note: Mapping[str, Any]) -> tuple[bool, int | None]:
    """(flush the identity cache?, new backend state index or None) for one bus line.

    Non-null ``State``, a bare line (all null), or any netmap field = flush. Lines with
    only ``Engine`` or ``Health`` (or prefs, login URLs, ...) change no identity.
    """
    state = note.get("State")
    if state is not None:
        return True, state if isinstance(state, int) else None
    for name in _NETMAP_FIELDS:
        if note.get(name) is not None:
            return True, None
    bare = all(v is None for k, v in note.items() if k not in _ALWAYS_FIELDS)
    return bare, None


AddressesCallback = Callable[[list[str]], Awaitable[None] | None]
StateCallback = Callable[[str], Awaitable[None] | None]


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TailscaleMonitor:
    """Watches the IPN bus (flushing the cache) and polls status, in two owned tasks.

    The bus is reconnected with exponential backoff until ``stop()``; the cache is flushed
    on every (re)connect and disconnect, since changes in between were not seen. Status is
    polled every ``poll_interval`` seconds and after each state or self change.
    """

    def __init__(
        self,
        api: StatusSource,
        cache: IdentityCache | None = None,
        *,
        on_addresses: AddressesCallback | None = None,
        on_state: StateCallback | None = None,
        poll_interval: float = 30.0,
        key_expiry_warn_days: float = 14.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        mask: int = BUS_MASK,
        now: Callable[[], datetime] = _utcnow,
    ) -> None:
        self._api = api
        self._cache = cache
        self._on_addresses = on_addresses
        self._on_state = on_state
        self._poll_interval = poll_interval
        self._warn_days = key_expiry_warn_days
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._mask = mask
        self._now = now
        self._tasks: set[asyncio.Task[Any]] = set()
        self._poll_now = asyncio.Event()
        self._polled = False
        self._connected_at = 0.0
        self._reported_state: str | None = None
        self._warned_expiry: datetime | None = None

        self.backend_state: str | None = None
        self.tailscale_ips: tuple[str, ...] = ()
        self.key_expiry: datetime | None = None
        self.expired = False
        self.cert_domains: tuple[str, ...] = ()
        self.self_dns_name: str | None = None
        self.tun: bool | None = None
        self.magic_dns_suffix = ""
        self.peer_paths: dict[str, str] = {}
        self.last_error: str | None = None
        self.reachable = False
        self.bus_connected = False
        self.connects = 0
        self.polls = 0

    @property
    def running(self) -> bool:
        return self.reachable and self.backend_state == "Running"

    def start(self) -> None:
        """Start the bus watcher and the status poller (needs a running loop)."""
        if self._tasks:
            raise RuntimeError("TailscaleMonitor already started")
        spawn(self._watch_forever(), "tailscale-ipn-bus", self._tasks)
        spawn(self._poll_forever(), "tailscale-status-poll", self._tasks)

    async def stop(self) -> None:
        """Cancel both tasks and wait for them (closes the bus stream)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self.bus_connected = False

    def _flush(self) -> None:
        if self._cache is not None:
            self._cache.flush()

    async def _watch_forever(self) -> None:
        delay = self._backoff_initial
        while True:
            try:
                await self._watch_once()
                reason = "IPN bus closed by tailscaled"
            except TailscaleError as exc:
                reason = str(exc)
            except Exception as exc:
                # A bug here must not silently end the only thing that flushes the cache:
                # log it loudly and go round again (flushing, so we fail towards whois).
                log.exception("tailscale IPN bus watcher failed")
                reason = f"internal error: {type(exc).__name__}"
            loop_time = asyncio.get_running_loop().time()
            if self.bus_connected and loop_time - self._connected_at >= self._backoff_max:
                # A long-lived stream ended: reconnect fast. One that keeps dropping right
                # after connecting (a flapping daemon) keeps backing off instead.
                delay = self._backoff_initial
            self.bus_connected = False
            self.last_error = reason
            self._flush()
            log.warning("tailscale IPN bus: %s; reconnecting in %.1fs", reason, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_max)

    async def _watch_once(self) -> None:
        async with aclosing(self._api.watch_ipn_bus(self._mask)) as lines:
            async for note in lines:
                if not self.bus_connected:
                    # Changes while we were away were not seen: start from empty.
                    self.bus_connected = True
                    self._connected_at = asyncio.get_running_loop().time()
                    self.connects += 1
                    self._flush()
                    self._poll_now.set()
                err = note.get("ErrMessage")
                if err:
                    # 1.102+: "IPN bus consumer fell behind; closing watch". The daemon
                    # closes the stream; we reconnect (with backoff) and flush.
                    raise TailscaleError(f"IPN bus: {err}")
                flush, state = classify_notify(note)
                if flush:
                    self._flush()
                if state is not None:
                    name = BACKEND_STATES[state] if 0 <= state < len(BACKEND_STATES) else None
                    if name is not None:
                        self.backend_state = name
                        await self._report_state(name)
                    self._poll_now.set()
                elif note.get("SelfChange") is not None:
                    self._poll_now.set()

    async def _poll_forever(self) -> None:
        while True:
            self._poll_now.clear()
            await self.poll()
            try:
                async with asyncio.timeout(self._poll_interval):
                    await self._poll_now.wait()
            except TimeoutError:
                pass  # the periodic poll

    async def poll(self) -> None:
        """Poll status once and update the public fields; errors land in ``last_error``."""
        self.polls += 1
        try:
            status = await self._api.status(peers=True)
        except TailscaleError as exc:
            self.reachable = False
            self.last_error = str(exc)
            self._polled = True
            log.warning("tailscale status: %s", exc)
            return
        self._polled = True
        self.reachable = True
        if self.bus_connected:
            self.last_error = None
        self.backend_state = status.backend_state
        self.key_expiry = status.key_expiry
        self.expired = status.expired
        self._log_key_expiry()
        self.cert_domains = status.cert_domains
        self.self_dns_name = status.self_dns_name
        self.tun = status.tun
        self.magic_dns_suffix = status.magic_dns_suffix
        self.peer_paths = dict(status.peer_paths)
        await self._report_state(status.backend_state)
        if status.tailscale_ips != self.tailscale_ips:
            self.tailscale_ips = status.tailscale_ips
            await self._call(self._on_addresses, list(status.tailscale_ips), "on_addresses")

    def _log_key_expiry(self) -> None:
        # The daemon never warns "expiring soon": say it in the log, once per expiry time.
        expiry = self.key_expiry
        if expiry is None or expiry == self._warned_expiry:
            return
        seconds = (expiry - self._now()).total_seconds()
        if self.expired or seconds <= self._warn_days * 86400:
            self._warned_expiry = expiry
            when = expiry.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if self.expired or seconds <= 0:
                log.warning(
                    "tailscale node key expired at %s: run `tailscale up` to "
                    "re-authenticate this node",
                    when,
                )
            else:
                log.warning(
                    "tailscale node key expires in %d days (%s): re-authenticate "
                    "or disable key expiry for this node",
                    math.floor(seconds / 86400),
                    when,
                )

    async def _report_state(self, name: str) -> None:
        if name != self._reported_state:
            self._reported_state = name
            await self._call(self._on_state, name, "on_state")

    async def _call(self, callback: Callable[[Any], Any] | None, arg: Any, what: str) -> None:
        if callback is None:
            return
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except Exception:
            # A broken callback must not stop the monitor that keeps the cache honest.
            log.exception("tailscale monitor %s callback failed", what)

    def health(self) -> dict[str, Any]:
        """A JSON-ready summary for /health, with a warning when action is needed."""
        warnings: list[str] = []
        if not self._polled:
            warnings.append("tailscale status not polled yet")
        elif not self.reachable:
            warnings.append(f"tailscaled unreachable: {self.last_error}")
        elif self.backend_state != "Running":
            warnings.append(f"tailscale is {self.backend_state}, not Running")
        expiry_iso: str | None = None
        days_left: int | None = None
        if self.key_expiry is not None:
            expiry_iso = self.key_expiry.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            seconds = (self.key_expiry - self._now()).total_seconds()
            days_left = math.floor(seconds / 86400)
            if self.expired or seconds <= 0:
                warnings.append(f"node key expired at {expiry_iso}")
            elif seconds <= self._warn_days * 86400:
                warnings.append(f"node key expires in {days_left} days ({expiry_iso})")
        elif self.expired:
            warnings.append("node key expired")
        return {
            "state": self.backend_state,
            "running": self.running,
            "reachable": self.reachable,
            "bus_connected": self.bus_connected,
            "tailscale_ips": list(self.tailscale_ips),
            "tun": self.tun,
            "cert_domains": list(self.cert_domains),
            "key_expiry": expiry_iso,
            "key_expiry_days_left": days_left,
            "expired": self.expired,
            "peer_ips": len(self.peer_paths),
            "last_error": self.last_error,
            "warning": "; ".join(warnings) or None,
        }
