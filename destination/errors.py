"""The error tree of the destination package.

Every failure the destination service or its client reports is a :class:`DestinationError`.
The gRPC boundary (``destination.server.status_for``) maps each class to one status code; the
CLI maps them to exit codes. Messages are full sentences naming the document and field at fault.
"""

from __future__ import annotations


class DestinationError(Exception):
    """Base class of every error raised by the destination package."""


class InvalidResource(DestinationError, ValueError):
    """A mesh-file document or Kubernetes object is malformed; names the document and field."""

    def __init__(self, message: str, *, document: str = "", field: str = "") -> None:
        self.document = document
        self.field = field
        self.reason = message
        where = ": ".join(part for part in (document, field) if part)
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, document: str) -> InvalidResource:
        """The same error, attributed to ``document`` (e.g. ``mesh.yaml#3 Service default/web``)."""
        return InvalidResource(self.reason, document=document, field=self.field)


class InvalidMeshFile(DestinationError, ValueError):
    """The mesh file cannot be read or is not YAML."""


class InvalidTarget(DestinationError, ValueError):
    """A lookup target (authority, workload, context token, port) is malformed."""


class NotFound(DestinationError, LookupError):
    """The service, workload or authority asked for does not exist."""


class Unavailable(DestinationError):
    """The answer is not available yet (no state loaded, no trust bundle configured)."""


class SourceError(DestinationError):
    """A discovery source (mesh file, Kubernetes API) failed; the last good state is kept."""


class StartupError(DestinationError):
    """The server cannot start: an address is in use or cannot be bound."""
