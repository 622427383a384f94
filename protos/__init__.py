"""Protocol Buffers sources for TrustMesh's gRPC APIs and the modules generated from them.

The ``*.proto`` files are the source of truth; ``*_pb2.py`` / ``*_pb2_grpc.py`` are generated at
build time (``python -m protos.build``, run by ``make`` and by the package build) and never
committed. ``identity.proto`` and ``destination.proto`` are wire-compatible with Linkerd's
``io.linkerd.proxy.identity`` and ``io.linkerd.proxy.destination`` packages.
"""
