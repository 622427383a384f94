"""The sidecar's own process: what ``trustmesh proxy run`` becomes once its flags are checked.

``trustmesh proxy run`` parses and checks its flags with click, then replaces itself
(``os.execve``: the same PID, standard streams and parent) with ``python -m
trustmesh.up.sidecar_process NAMESPACE/WORKLOAD``, handing the checked configuration over in
the ``TRUSTMESH_SIDECAR_CONFIG`` environment variable (JSON, no secret: the token is read from
its file). The long-running process then holds the proxy and its control-plane clients only,
not click and the CLI, which took 1.9 MiB of resident memory in every sidecar.

Failures read as the CLI's: one ``error: ...`` line on stderr and exit status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from pki.errors import PKIError
from proxy.errors import ProxyError
from trustmesh.outcome import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, os_error
from trustmesh.up.sidecar_config import SidecarConfig

HANDOVER = "TRUSTMESH_SIDECAR_CONFIG"
LOG_LEVEL = "TRUSTMESH_PROXY_LOG_LEVEL"  # the variable of ``--log-level``
MODULE = "trustmesh.up.sidecar_process"


def exec_sidecar(config: SidecarConfig, log_level: str) -> NoReturn:
    """Replace this process with the sidecar's own, running ``config``."""
    if not sys.executable:
        raise OSError("the Python interpreter's path is unknown: cannot start the sidecar")
    env = dict(os.environ)
    env[HANDOVER] = config.to_json()
    env[LOG_LEVEL] = log_level
    # The new interpreter finds this package where this one did, however it was started.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    name = f"{config.namespace}/{config.workload}"  # shows in ps which workload this is
    os.execve(sys.executable, [sys.executable, "-m", MODULE, name], env)


def _fail(message: str, code: int = EXIT_FAILURE) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main() -> int:
    text = os.environ.pop(HANDOVER, None)
    if text is None:
        return _fail(
            f"{MODULE} is started by `trustmesh proxy run`, which hands it its configuration",
            EXIT_USAGE,
        )
    try:
        config = SidecarConfig.from_json(text)
        logging.basicConfig(
            level=os.environ.get(LOG_LEVEL, "info").upper(),
            stream=sys.stderr,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    except ValueError as e:
        return _fail(str(e), EXIT_USAGE)

    from trustmesh.up.sidecar import run_sidecar  # the proxy itself: not before it is needed

    def announce(ports: dict[str, int]) -> None:
        print(json.dumps(ports), flush=True)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await run_sidecar(config, stop, announce)

    try:
        try:
            import uvloop
        except ImportError:  # optional: asyncio works, somewhat slower per request
            asyncio.run(serve())
        else:
            uvloop.run(serve())
    except (ProxyError, PKIError, ValueError) as e:
        return _fail(str(e))
    except OSError as e:
        return _fail(os_error(e))
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
