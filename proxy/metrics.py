"""Proxy metrics with Linkerd's names, counted in plain ints and rendered only at scrape time.

Per-request counting is attribute arithmetic on objects the dispatchers keep across requests
(:class:`Count` for one counter, :class:`HttpSeries` for one HTTP label set); rarer events do a
dict increment. Prometheus text is built by :meth:`ProxyMetrics.render`, which folds the kept
objects into their families. Byte counters of live connections are read from the links at
scrape time, so a long-lived connection shows its traffic before it closes.
"""

from __future__ import annotations

import os
import resource
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

# linkerd/metrics/src/latency.rs
LATENCY_BUCKETS_MS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)  # fmt: skip


class Count:
    """One counter of a family, kept by a hot caller and incremented in place (``n += 1``)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


class Family:
    """A counter or gauge family: label values tuple -> number."""

    __slots__ = ("counts", "help", "kind", "labels", "name", "values")

    def __init__(self, name: str, kind: str, help: str, labels: tuple[str, ...]) -> None:
        self.name, self.kind, self.help, self.labels = name, kind, help, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.counts: dict[tuple[str, ...], Count] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        self.values[key] = self.values.get(key, 0) + amount

    def count(self, key: tuple[str, ...]) -> Count:
        """The in-place counter of ``key`` (shown once it is above zero)."""
        kept = self.counts.get(key)
        if kept is None:
            kept = self.counts[key] = Count()
        return kept

    def set(self, key: tuple[str, ...], value: float) -> None:
        self.values[key] = value

    def get(self, key: tuple[str, ...]) -> float:
        kept = self.counts.get(key)
        return self.values.get(key, 0) + (kept.n if kept is not None else 0)

    def lines(self, extra: dict[tuple[str, ...], float] | None = None) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        values = dict(self.values)
        for key, kept in self.counts.items():
            if kept.n:
                values[key] = values.get(key, 0) + kept.n
        for key, amount in (extra or {}).items():
            values[key] = values.get(key, 0) + amount
        for key, value in sorted(values.items()):
            yield f"{self.name}{_labels(self.labels, key)} {_number(value)}"


class Histogram:
    """A histogram with fixed buckets: label values -> [bucket counts..., sum]."""

    __slots__ = ("buckets", "help", "labels", "name", "values")

    def __init__(
        self, name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> None:
        self.name, self.help, self.labels, self.buckets = name, help, labels, buckets
        self.values: dict[tuple[str, ...], list[float]] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        counts = self.values.get(key)
        if counts is None:
            counts = self.values[key] = [0] * (len(self.buckets) + 2)
        counts[bisect_left(self.buckets, value)] += 1
        counts[-1] += value

    def count(self, key: tuple[str, ...]) -> int:
        counts = self.values.get(key)
        return int(sum(counts[:-1])) if counts else 0

    def lines(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        names = (*self.labels, "le")
        for key, counts in sorted(self.values.items()):
            running = 0.0
            for bound, n in zip((*self.buckets, "+Inf"), counts[:-1], strict=True):
                running += n
                yield f"{self.name}_bucket{_labels(names, (*key, str(bound)))} {_number(running)}"
            yield f"{self.name}_count{_labels(self.labels, key)} {_number(running)}"
            yield f"{self.name}_sum{_labels(self.labels, key)} {_number(counts[-1])}"


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True) if v != "")
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


TCP_LABELS = ("direction", "peer", "tls", "client_id", "server_id")
_BUCKETS = tuple(float(b) for b in LATENCY_BUCKETS_MS)


class HttpSeries:
    """The counters of one HTTP label set, kept by a dispatcher and updated in place per request.

    ``labels`` are request_total's (direction, authority, tls, client_id, server_id);
    ``requests`` is request_total's counter for them. :meth:`respond` counts a response in
    response_total and response_latency_ms, updating the histogram's own bucket list, so the
    exposition is exactly what ``inc``/``observe`` would have produced.
    """

    __slots__ = ("labels", "metrics", "requests", "statuses")

    def __init__(self, metrics: ProxyMetrics, labels: tuple[str, ...]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.requests = metrics.request_total.count(labels)
        # status -> (response_total counter, latency histogram buckets + sum)
        self.statuses: dict[int, tuple[Count, list[float]]] = {}

    def respond(self, status: int, latency_ms: float) -> None:
        kept = self.statuses.get(status) or self._status(status)
        kept[0].n += 1
        cells = kept[1]
        cells[bisect_left(_BUCKETS, latency_ms)] += 1
        cells[-1] += latency_ms

    def _status(self, status: int) -> tuple[Count, list[float]]:
        labels, code = self.labels, str(status)
        responses = self.metrics.response_total.count(
            (*labels, code, "failure" if status >= 500 else "success")
        )
        histogram = self.metrics.response_latency_ms
        key = (labels[0], labels[1], code)
        cells = histogram.values.get(key)
        if cells is None:
            cells = histogram.values[key] = [0] * (len(_BUCKETS) + 2)
        kept = self.statuses[status] = (responses, cells)
        return kept


# The connection's side of every authorization family: (target_port, srv_name, tls, client_id).
AUTHZ_LABELS = ("target_port", "srv_name", "tls", "client_id")


class ProxyMetrics:
    """Every metric family the data plane reports."""

    def __init__(self) -> None:
        http = ("direction", "authority", "tls", "client_id", "server_id")
        self.request_total = Family("request_total", "counter", "HTTP requests.", http)
        self.response_total = Family(
            "response_total",
            "counter",
            "HTTP responses.",
            (*http, "status_code", "classification"),
        )
        self.response_latency_ms = Histogram(
            "response_latency_ms",
            "Time to the response head, in milliseconds.",
            ("direction", "authority", "status_code"),
            _BUCKETS,
        )
        self.tcp_open_total = Family("tcp_open_total", "counter", "Opened connections.", TCP_LABELS)
        self.tcp_close_total = Family(
            "tcp_close_total", "counter", "Closed connections.", (*TCP_LABELS, "errno")
        )
        self.tcp_open_connections = Family(
            "tcp_open_connections", "gauge", "Connections open now.", TCP_LABELS
        )
        self.tcp_read_bytes_total = Family(
            "tcp_read_bytes_total", "counter", "Bytes read from peers.", TCP_LABELS
        )
        self.tcp_write_bytes_total = Family(
            "tcp_write_bytes_total", "counter", "Bytes written to peers.", TCP_LABELS
        )
        self.tls_handshakes_total = Family(
            "tls_handshakes_total",
            "counter",
            "Mesh TLS handshakes by side, negotiated group and result.",
            ("direction", "group", "result"),
        )
        # Outbound route behaviour: requests sent again (request_total and response_total count
        # each try where it went), and requests answered 504 or cut by a route timeout.
        self.retry_total = Family(
            "retry_total",
            "counter",
            "HTTP requests sent again by a route's retry policy, by why (status, timeout).",
            ("direction", "authority", "reason"),
        )
        # Policy decisions, in the families Linkerd's proxy reports them in, with the labels of
        # Linkerd's that this proxy has (target port, server, route, authorization, client);
        # ``reason`` is ours: why an HTTP request was denied (unauthorized).
        self.inbound_http_authz_allow_total = Family(
            "inbound_http_authz_allow_total",
            "counter",
            "Inbound HTTP requests allowed by policy.",
            (*AUTHZ_LABELS, "route_name", "authz_name"),
        )
        self.inbound_http_authz_deny_total = Family(
            "inbound_http_authz_deny_total",
            "counter",
            "Inbound HTTP requests denied by policy (403).",
            (*AUTHZ_LABELS, "route_name", "reason"),
        )
        self.inbound_http_route_not_found_total = Family(
            "inbound_http_route_not_found_total",
            "counter",
            "Inbound HTTP requests no route of their server matched (404).",
            AUTHZ_LABELS,
        )
        self.inbound_tcp_authz_allow_total = Family(
            "inbound_tcp_authz_allow_total",
            "counter",
            "Inbound TCP connections allowed by policy.",
            (*AUTHZ_LABELS, "authz_name"),
        )
        self.inbound_tcp_authz_deny_total = Family(
            "inbound_tcp_authz_deny_total",
            "counter",
            "Inbound TCP connections denied by policy (closed).",
            AUTHZ_LABELS,
        )
        self._live: dict[Any, tuple[str, ...]] = {}
        self._series: dict[tuple[str, ...], HttpSeries] = {}

    def http_series(self, labels: tuple[str, ...]) -> HttpSeries:
        """The counters of HTTP label set ``labels``; dispatchers keep them across requests."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = HttpSeries(self, labels)
        return series

    # -- connections ------------------------------------------------------------------------

    def opened(self, link: Any, labels: tuple[str, ...]) -> None:
        """Track ``link`` (with ``bytes_in``/``bytes_out``) under TCP ``labels``."""
        self._live[link] = labels
        link.tracker = self
        self.tcp_open_total.inc(labels)

    def accepted(self) -> list[Any]:
        """The open connections clients made to this proxy (not the ones it dialled)."""
        return [link for link, labels in self._live.items() if labels[1] == "src"]

    def closed(self, link: Any, errno: str = "") -> None:
        labels = self._live.pop(link, None)
        if labels is None:
            return
        self.tcp_close_total.inc((*labels, errno))
        self.tcp_read_bytes_total.inc(labels, link.bytes_in)
        self.tcp_write_bytes_total.inc(labels, link.bytes_out)

    def render(self) -> str:
        """Prometheus text exposition of every family."""
        reads: dict[tuple[str, ...], float] = {}
        writes: dict[tuple[str, ...], float] = {}
        opened: dict[tuple[str, ...], float] = {}
        for link, labels in self._live.items():
            reads[labels] = reads.get(labels, 0) + link.bytes_in
            writes[labels] = writes.get(labels, 0) + link.bytes_out
            opened[labels] = opened.get(labels, 0) + 1
        self.tcp_open_connections.values = opened
        out: list[str] = []
        for fam in (
            self.request_total,
            self.response_total,
            self.tcp_open_total,
            self.tcp_close_total,
            self.tcp_open_connections,
            self.tls_handshakes_total,
            self.retry_total,
            self.inbound_http_authz_allow_total,
            self.inbound_http_authz_deny_total,
            self.inbound_http_route_not_found_total,
            self.inbound_tcp_authz_allow_total,
            self.inbound_tcp_authz_deny_total,
        ):
            out.extend(fam.lines())
        out.extend(self.response_latency_ms.lines())
        out.extend(self.tcp_read_bytes_total.lines(reads))
        out.extend(self.tcp_write_bytes_total.lines(writes))
        out.extend(process_lines())
        return "\n".join(out) + "\n"


# What /proc/self/stat's fields 14 (utime), 15 (stime), 22 (starttime), 23 (vsize) and 24 (rss)
# are counted in: clock ticks, bytes and pages (proc(5)).
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


_BOOT = _boot_time()


def process_lines() -> list[str]:
    """The process families Prometheus client libraries and Linkerd's proxy export
    (``process_resident_memory_bytes``, ``process_cpu_seconds_total``...), read from /proc; none
    where there is no /proc."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            # The command name (field 2) is in parentheses and may hold spaces: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
        open_fds = len(os.listdir("/proc/self/fd")) - 1  # not the one listing them
    except (OSError, IndexError):
        return []
    # fields[0] is field 3 of proc(5) (the state).
    utime, stime = int(fields[11]), int(fields[12])
    samples: list[tuple[str, str, str, int | float]] = [
        ("process_cpu_seconds_total", "counter", "CPU time this process has used, user and system, in seconds.",
         (utime + stime) / _TICKS),
        ("process_open_fds", "gauge", "File descriptors this process holds open (sockets included).", open_fds),
        ("process_max_fds", "gauge", "The soft limit on open file descriptors (RLIMIT_NOFILE).",
         resource.getrlimit(resource.RLIMIT_NOFILE)[0]),
        ("process_virtual_memory_bytes", "gauge", "Virtual address space of this process in bytes.",
         int(fields[20])),
        ("process_resident_memory_bytes", "gauge", "Memory of this process resident in RAM (RSS) in bytes.",
         int(fields[21]) * _PAGE),
        ("process_threads", "gauge", "OS threads of this process.", int(fields[17])),
    ]  # fmt: skip
    if _BOOT is not None:
        samples.append(
            ("process_start_time_seconds", "gauge",
             "When this process started, in seconds since the Unix epoch.",
             _BOOT + int(fields[19]) / _TICKS)
        )  # fmt: skip
    out: list[str] = []
    for name, kind, help_text, value in samples:
        out += (f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value!r}")
    return out
