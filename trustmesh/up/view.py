"""The live table of ``trustmesh up`` / ``demo``: one row per workload, from its proxy's metrics.

:func:`workload_rows` turns scrapes into plain rows (also the ``workloads`` of ``-o json``);
:func:`render_table` draws them with rich. Both take the time as a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from trustmesh.up.stats import ProxyStats


def expires_in(seconds: float) -> str:
    """``23h59m``, ``4m05s``, ``12s``, or ``expired``."""
    if seconds <= 0:
        return "expired"
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


def _ms(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


def workload_rows(stats: Mapping[str, ProxyStats | None], now: float) -> list[dict[str, Any]]:
    """One row per workload key (``ns/name``); a proxy that did not answer has ``up`` False."""
    rows = []
    for key, s in stats.items():
        if s is None:
            rows.append({"workload": key, "up": False})
            continue
        direction, http = s.http
        rows.append(
            {
                "workload": key,
                "up": True,
                "identity": s.identity,
                "cert_expires_in_seconds": round(s.cert_expiry - now) if s.cert_expiry else None,
                "tls_groups": s.groups(),
                "tls_refused": s.refused,
                "direction": direction,
                "requests": http.requests,
                "success_rate": http.success_rate,
                "p50_ms": _ms(http.quantile(0.5)),
                "p99_ms": _ms(http.quantile(0.99)),
                "tcp_connections": s.tcp_inbound,
            }
        )
    return rows


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name, justify in (
        ("WORKLOAD", "left"),
        ("IDENTITY", "left"),
        ("CERT EXPIRES", "right"),
        ("TLS GROUP", "left"),
        ("REQUESTS", "right"),
        ("SUCCESS", "right"),
        ("P50", "right"),
        ("P99", "right"),
        ("TCP CONNS", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in rows:
        if not row["up"]:
            table.add_row(row["workload"], "[red]proxy not answering[/red]", *[""] * 7)
            continue
        groups = ", ".join(sorted(row["tls_groups"])) or "-"
        if row["tls_refused"]:
            groups += f" [red]({row['tls_refused']} refused)[/red]"
        rate = row["success_rate"]
        expiry = row["cert_expires_in_seconds"]
        table.add_row(
            row["workload"],
            row["identity"] or "-",
            expires_in(expiry) if expiry is not None else "-",
            groups,
            f"{row['requests']}" + (" out" if row["direction"] == "outbound" else ""),
            f"{rate:.1%}" if rate is not None else "-",
            f"{row['p50_ms']:.1f} ms" if row["p50_ms"] is not None else "-",
            f"{row['p99_ms']:.1f} ms" if row["p99_ms"] is not None else "-",
            str(row["tcp_connections"]),
        )
    return table
