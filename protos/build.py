"""Generate the Python modules for every ``protos/*.proto`` file (``python -m protos.build``)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path = ROOT) -> list[Path]:
    """Run protoc for each stale proto; return the proto files that were (re)generated."""
    from grpc_tools import protoc  # build-time dependency only

    include = Path(protoc.__file__).resolve().parent / "_proto"
    sources = sorted((root / "protos").glob("*.proto"))
    stale = [p for p in sources if _stale(p)]
    if stale:
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={root}",
            f"--pyi_out={root}",
            f"--grpc_python_out={root}",
            *(str(p.relative_to(root)) for p in sources),
        ]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed for {', '.join(p.name for p in sources)}")
    return stale


def _stale(proto: Path) -> bool:
    out = proto.with_name(proto.stem + "_pb2.py")
    return not out.exists() or out.stat().st_mtime < proto.stat().st_mtime


if __name__ == "__main__":
    regenerated = generate()
    print(f"protos: {len(regenerated)} regenerated", file=sys.stderr)
