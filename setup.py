"""Build hook: generate the gRPC/protobuf modules from protos/*.proto into the build tree."""

from __future__ import annotations

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProtos(build_py):
    def run(self) -> None:
        from protos.build import generate  # local source tree; needs grpcio-tools

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})
