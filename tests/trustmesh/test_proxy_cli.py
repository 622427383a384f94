"""``trustmesh proxy run`` start-up refusals: bad values are usage errors before anything
starts, and an address in use is one line naming the listener."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pki.rotation import init_anchor
from pki.store import FileStore
from trustmesh.cli import cli
from trustmesh.errors import run_cli


def _proxy_run(tmp_path: Path, *options: str, anchors: bytes = b"", token: str = "") -> int:
    """``trustmesh proxy run`` for workload w-0 with these files and ``options``: exit code."""
    anchors_file, token_file = tmp_path / "anchors.pem", tmp_path / "token"
    anchors_file.write_bytes(anchors)
    token_file.write_text(token)
    return run_cli(cli, ["proxy", "run", "--workload", "w-0", "--token-file", str(token_file),
                         "--trust-anchors", str(anchors_file), *options])  # fmt: skip


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--head-timeout", "0"), ("--head-timeout", "-1"), ("--detect-timeout", "soon")],
)
def test_timeouts_must_be_positive_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    assert _proxy_run(tmp_path, flag, value) == 2
    assert f"Invalid value for '{flag}'" in capsys.readouterr().err


def test_an_admin_address_in_use_is_one_line_naming_the_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=datetime.now(UTC))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = _proxy_run(
            tmp_path, "--admin-listen", f"127.0.0.1:{port}",
            anchors=store.trust_bundle().pem(), token="t",
        )  # fmt: skip
        assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: cannot listen on 127.0.0.1:{port} (admin): Address already in use"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--identity-addr", "identity"), ("--identity-addr", "identity:0"),
     ("--destination-addr", ":8086"), ("--destination-addr", "dest:99999")],
)  # fmt: skip
def test_control_plane_addresses_must_name_a_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    """A bare host was taken as a gRPC target on port 443, and the proxy retried it for ever
    with a warning per attempt; now it is a usage error naming the flag."""
    assert _proxy_run(tmp_path, flag, value) == 2
    assert f"error: {flag} {value!r} is not HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["vsock:2:8086", "unix:", "dns:///identity"])
def test_unusable_grpc_targets_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    assert _proxy_run(tmp_path, "--identity-addr", value) == 2
    assert f"error: --identity-addr {value!r}: " in capsys.readouterr().err


def test_the_sidecar_loads_neither_grpcio_nor_prometheus_client() -> None:
    """grpcio's C core cost every proxy 12 MiB of library pages and 7 threads, and
    prometheus_client 3 MiB: the sidecar's control-plane client (proxy/rpc.py) and its metrics
    (proxy/control.py) are the proxy's own. A stray import would bring them back."""
    code = (
        "import sys; import trustmesh.cli, trustmesh.commands.proxy, trustmesh.up.sidecar; "
        "print(' '.join(m for m in ('grpc', 'prometheus_client') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr
