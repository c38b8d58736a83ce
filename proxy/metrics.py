"""Counters for /metrics, kept as plain integers on the hot path.

Incrementing an attribute costs tens of nanoseconds; prometheus-client objects take a
lock per update. So the proxy counts into this object and a custom collector turns it
into Prometheus metric families only when /metrics is scraped.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

__all__ = ["Metrics", "MetricsCollector", "HANDSHAKE_BUCKETS"]

HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.accepted = 0
        self.active = 0
        self.tunnels = 0
        self.refused: Counter[str] = Counter()  # by reason
        self.decisions: Counter[tuple[str, int]] = Counter()  # (allow|deny, status)
        self.bytes_up = 0
        self.bytes_down = 0
        self.upstream_errors = 0
        self.localapi_errors = 0
        self.log_errors = 0
        self.hs_counts = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.hs_sum = 0.0

    def observe_handshake(self, seconds: float) -> None:
        self.hs_counts[bisect.bisect_left(HANDSHAKE_BUCKETS, seconds)] += 1
        self.hs_sum += seconds


class MetricsCollector(Collector):
    """Exposes a Metrics object (and extra gauges from ``extra``) at scrape time."""

    def __init__(
        self,
        get: Callable[[], Metrics],
        extra: Callable[[], dict[str, Any]] | None = None,
        live_bytes: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        self._get = get
        self._extra = extra
        # Bytes of connections still open: a WebSocket session lives for hours, and a
        # counter that only grows at close would show nothing of it until then.
        self._live_bytes = live_bytes

    def collect(self) -> Iterator[Any]:
        m = self._get()
        c = CounterMetricFamily("clawgate_connections_accepted", "TCP connections accepted")
        c.add_metric([], m.accepted)
        yield c
        r = CounterMetricFamily(
            "clawgate_connections_refused",
            "Connections or requests refused, by reason",
            labels=["reason"],
        )
        for reason, n in sorted(m.refused.items()):
            r.add_metric([reason], n)
        yield r
        d = CounterMetricFamily(
            "clawgate_decisions", "Access decisions", labels=["result", "status"]
        )
        for (result, status), n in sorted(m.decisions.items()):
            d.add_metric([result, str(status)], n)
        yield d
        g = GaugeMetricFamily("clawgate_connections_active", "Client connections open")
        g.add_metric([], m.active)
        yield g
        t = GaugeMetricFamily("clawgate_tunnels_active", "WebSocket tunnels open")
        t.add_metric([], m.tunnels)
        yield t
        live_up, live_down = self._live_bytes() if self._live_bytes is not None else (0, 0)
        b = CounterMetricFamily("clawgate_bytes", "Bytes relayed", labels=["direction"])
        b.add_metric(["client_to_gateway"], m.bytes_up + live_up)
        b.add_metric(["gateway_to_client"], m.bytes_down + live_down)
        yield b
        u = CounterMetricFamily("clawgate_upstream_errors", "Failures reaching the gateway")
        u.add_metric([], m.upstream_errors)
        yield u
        la = CounterMetricFamily("clawgate_localapi_errors", "Failed tailscaled LocalAPI calls")
        la.add_metric([], m.localapi_errors)
        yield la
        le = CounterMetricFamily("clawgate_log_errors", "Access log lines dropped")
        le.add_metric([], m.log_errors)
        yield le
        h = HistogramMetricFamily(
            "clawgate_handshake_seconds", "Accept to first byte forwarded upstream"
        )
        cum = 0
        buckets = []
        for bound, n in zip((*HANDSHAKE_BUCKETS, float("inf")), m.hs_counts, strict=True):
            cum += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cum))
        h.add_metric([], buckets, m.hs_sum)
        yield h
        if self._extra is not None:
            for name, (kind, help_, value) in self._extra().items():
                fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(name, help_)
                fam.add_metric([], value)
                yield fam
