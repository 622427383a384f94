"""``trustmesh proxy run`` start-up refusals: bad values are usage errors before anything
starts, and an address in use is one line naming the listener."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
from loopback import unused_port

from pki.rotation import init_anchor
from pki.store import FileStore
from proxy.policy import DefaultPolicy
from proxy.settings import KexPolicy, Listen
from trustmesh.cli import cli
from trustmesh.errors import run_cli
from trustmesh.up.sidecar_config import SidecarConfig


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


def _proxy_process(tmp_path: Path, *options: str) -> subprocess.Popen[str]:
    """A real ``trustmesh proxy run`` for workload w-0, with a real trust bundle and token."""
    store = FileStore(tmp_path / "store")
    init_anchor(store, now=datetime.now(UTC))
    anchors, token = tmp_path / "anchors.pem", tmp_path / "token"
    anchors.write_bytes(store.trust_bundle().pem())
    token.write_text("t")
    argv = [sys.executable, "-m", "trustmesh", "proxy", "run", "--workload", "w-0",
            "--token-file", str(token), "--trust-anchors", str(anchors),
            "--outbound-listen", "127.0.0.1:0", "--inbound-listen", "127.0.0.1:0", *options]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_an_admin_address_in_use_is_one_line_naming_the_listener(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _proxy_process(tmp_path, "--admin-listen", f"127.0.0.1:{port}")
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (admin): Address already in use"
    )


def test_proxy_run_becomes_the_sidecar_process_without_the_cli(tmp_path: Path) -> None:
    """Same PID, the sidecar's own module, serving its admin port; SIGTERM ends it with 0."""
    admin = unused_port()
    # Nothing answers on the control-plane addresses: the proxy waits for its certificate.
    proc = _proxy_process(
        tmp_path, "--admin-listen", f"127.0.0.1:{admin}",
        "--identity-addr", f"127.0.0.1:{unused_port()}", "--destination-addr", f"127.0.0.1:{unused_port()}",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        live = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/live", timeout=2) as r:
                    live = r.status
                break
            except OSError:
                time.sleep(0.1)
        assert live == 200, proc.stderr.read() if proc.poll() is not None else "no /live"
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[1:4] == [b"-m", b"trustmesh.up.sidecar_process", b"default/w-0"]
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"TRUSTMESH_SIDECAR_CONFIG=" in environ  # the hand-over, read at start
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_sidecar_process_says_who_starts_it() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "trustmesh.up.sidecar_process"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "TRUSTMESH_SIDECAR_CONFIG"},
    )  # fmt: skip
    assert out.returncode == 2
    assert "is started by `trustmesh proxy run`" in out.stderr


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


def test_the_sidecar_process_loads_neither_grpcio_protobuf_prometheus_client_nor_click() -> None:
    """grpcio's C core cost every proxy 12 MiB of library pages and 7 threads, protobuf 2.5 MiB,
    prometheus_client 3 MiB and the CLI 1.9: the sidecar's control-plane client (proxy/rpc.py),
    codec (protos/lite.py) and metrics (proxy/control.py) are the proxy's own, and its process
    is not the CLI's. A stray import would bring them back."""
    unwanted = ("grpc", "google.protobuf", "prometheus_client", "click", "trustmesh.cli")
    code = (
        "import sys; import trustmesh.up.sidecar_process, trustmesh.up.sidecar; "
        f"print(' '.join(m for m in {unwanted!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_the_cli_checks_a_sidecars_flags_without_loading_the_proxy() -> None:
    """Before it becomes the sidecar's process, ``trustmesh proxy run`` imports only what checks
    its flags: the proxy is imported once, by the process that runs it (start-up time)."""
    heavy = ("OpenSSL", "cryptography", "h2", "httptools", "uvloop", "trustmesh.up.sidecar")
    code = (
        "import sys; import trustmesh.cli, trustmesh.commands.proxy, trustmesh.up.sidecar_process; "
        f"print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "", out.stdout + out.stderr


def test_the_handed_over_configuration_reads_back_equal(tmp_path: Path) -> None:
    config = SidecarConfig(
        namespace="shop", workload="web-0", service_account="web",
        token_file=tmp_path / "token", trust_anchors=tmp_path / "anchors.pem",
        identity_addr="dns:///identity:8080", identity_name="id.example",
        destination_addr="[::1]:8086", destination_name=None,
        outbound=Listen("127.0.0.1", 0), inbound=Listen("::1", 4143), admin=Listen("127.0.0.1", 1),
        upstreams=((Listen("127.0.0.1", 9000), "api.shop.svc.cluster.local:8080"),),
        app_host="127.0.0.2", app_ports=(8080, 9090), kex=KexPolicy.HYBRID_PREFERRED,
        default_inbound_policy=DefaultPolicy.DENY, bundle_from="file", trust_domain="example.org",
        control_plane_namespace="cp", cluster_domain="corp.local", startup_wait=1.5,
        detect_timeout=0.25, head_timeout=3.0, shutdown_grace=2.5,
    )  # fmt: skip
    assert SidecarConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not JSON"),
        ("[]", "unknown settings: (not an object)"),
        ('{"namespace": "a", "workload": "b", "colour": 1}', "unknown settings: colour"),
        ('{"namespace": "a", "workload": "b"}', "missing"),
        ('{"namespace": "a", "workload": "b", "service_account": "c", "token_file": "t", '
         '"trust_anchors": "a", "kex": "quantum"}', "'quantum' is not a valid KexPolicy"),
        ('{"namespace": "A!", "workload": "b", "service_account": "c", "token_file": "t", '
         '"trust_anchors": "a"}', "namespace"),
    ],
)  # fmt: skip
def test_a_bad_hand_over_is_refused_by_name(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        SidecarConfig.from_json(text)


def test_the_shutdown_grace_is_a_number_of_seconds_not_below_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _proxy_run(tmp_path, "--shutdown-grace", "-1") == 2
    assert "--shutdown-grace" in capsys.readouterr().err
