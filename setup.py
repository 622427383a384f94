"""Build hook: generate the gRPC/protobuf modules from protos/*.proto into the build tree."""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProtos(build_py):
    def run(self) -> None:
        # The build runs in an isolated environment (editable installs too) where the source
        # tree is not importable unless put on the path.
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from protos.build import generate  # local source tree; needs grpcio-tools

        generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
