"""The live table of ``trustmesh up`` / ``demo``: one row per workload, from its proxy's metrics.

:func:`workload_rows` turns scrapes into plain rows (also the ``workloads`` of ``-o json``);
:func:`render_table` draws them with rich. Both take the time as a parameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich import box
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


_IDENTITY_MARK = ".serviceaccount.identity."


def _latency(p50: float | None, p99: float | None) -> str:
    return "-" if p50 is None or p99 is None else f"{p50:.1f}/{p99:.1f}"


def short_identity(identity: str | None) -> tuple[str, str]:
    """``web.demo.serviceaccount.identity.trustmesh.cluster.local`` -> (``web.demo``, suffix)."""
    if not identity:
        return "-", ""
    head, mark, tail = identity.partition(_IDENTITY_MARK)
    return (head, mark[1:] + tail) if mark else (identity, "")


def render_table(rows: list[dict[str, Any]], title: str) -> Table:
    """The table for people; compact enough for 80 columns (full identities are in -o json)."""
    suffixes = {short_identity(r.get("identity"))[1] for r in rows if r["up"]} - {""}
    caption = f"identities: <sa>.<ns>.{suffixes.pop()}" if len(suffixes) == 1 else None
    table = Table(
        title=title,
        title_justify="left",
        caption=caption,
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for name, justify in (
        ("WORKLOAD", "left"),
        ("IDENTITY", "left"),
        ("CERT", "right"),
        ("TLS GROUP", "left"),
        ("REQS", "right"),
        ("OK", "right"),
        ("P50/P99 ms", "right"),
        ("TCP", "right"),
    ):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        workload = row["workload"].rpartition("/")[2]
        if not row["up"]:
            table.add_row(workload, "-", "-", "[red]proxy down[/red]", *[""] * 4)
            continue
        groups = ", ".join(sorted(row["tls_groups"])) or "-"
        if row["tls_refused"]:
            groups += f" [red]({row['tls_refused']} refused)[/red]"
        rate = row["success_rate"]
        expiry = row["cert_expires_in_seconds"]
        identity = short_identity(row["identity"])[0] if caption else row["identity"] or "-"
        table.add_row(
            workload,
            identity,
            expires_in(expiry) if expiry is not None else "-",
            groups,
            f"{row['requests']}" + ("→" if row["direction"] == "outbound" else ""),
            ("100%" if rate == 1 else f"{rate:.1%}") if rate is not None else "-",
            _latency(row["p50_ms"], row["p99_ms"]),
            str(row["tcp_connections"]),
        )
    return table
