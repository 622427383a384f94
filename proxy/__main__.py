"""``python -m proxy --config FILE``: run one proxy until SIGINT/SIGTERM.

Prints one JSON line with the bound ports once listening (ports 0 choose free ones).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path

import yaml

from proxy.app import proxy_from_config
from proxy.errors import ProxyError
from proxy.listener import tune_gc


async def _run(config_path: Path) -> None:
    config = yaml.safe_load(config_path.read_text())
    loop = asyncio.get_running_loop()
    proxy = proxy_from_config(config, config_path.parent, loop.time)
    await proxy.start()
    collections = tune_gc()
    print(json.dumps({name: proxy.port(name) for name in proxy.servers}), flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    collections.cancel()
    await proxy.stop(proxy.settings.shutdown_grace)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="YAML or JSON proxy config")
    args = parser.parse_args(argv)
    try:
        import uvloop
    except ImportError:  # uvloop is optional; asyncio works, ~15% slower per request
        uvloop = None  # type: ignore[assignment]
    try:
        if uvloop is not None:
            uvloop.run(_run(args.config))
        else:
            asyncio.run(_run(args.config))
    except (ProxyError, OSError, yaml.YAMLError) as e:
        print(f"proxy: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
