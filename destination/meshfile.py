"""The mesh file: a multi-document YAML of Kubernetes-style resources (the embedded source).

:func:`load_mesh_text` parses a whole file into a :class:`ClusterState` or refuses it with an
error naming the document and field; nothing partial is ever returned. Services with a selector
get one derived EndpointSlice per selected Workload, so the mesh file and Kubernetes feed the
same resolvers. :class:`MeshFileSource` watches the file and publishes each valid change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from destination.errors import InvalidMeshFile, InvalidResource
from destination.filewatch import watch_file
from destination.parsing import describe, parse_resource
from destination.resources import (
    AuthorizationPolicy,
    ClusterState,
    ContainerPort,
    EndpointSlice,
    HTTPRoute,
    MeshConfig,
    MeshTLSAuthentication,
    Meta,
    NetworkAuthentication,
    Resource,
    Server,
    Service,
    SliceEndpoint,
    Workload,
)

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 16 * 1024 * 1024
# libyaml's safe loader parses ~5x faster than the pure-Python one; both refuse arbitrary tags.
_LOADER = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)  # refuse absurd files rather than exhaust memory


def load_mesh_text(text: str, source: str = "mesh file") -> ClusterState:
    """Parse every document of ``text``; raise on the first invalid one."""
    try:
        documents = list(yaml.load_all(text, Loader=_LOADER))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise InvalidMeshFile(
            f"{source}: not valid YAML{where}: {getattr(e, 'problem', e)}"
        ) from None
    resources: list[Resource] = []
    seen: dict[tuple[str, str, str], int] = {}
    for number, data in enumerate(documents, start=1):
        if data is None:
            continue
        label = f"{source} document {number} ({describe(data)})"
        try:
            resource = parse_resource(data)
        except InvalidResource as e:
            raise e.located(label) from None
        if resource is None:
            continue
        meta = getattr(resource, "meta", None)
        key = (
            (type(resource).__name__, meta.namespace, meta.name) if meta else ("MeshConfig", "", "")
        )
        if key in seen:
            raise InvalidResource(
                f"duplicates document {seen[key]}", document=label, field="metadata.name"
            )
        seen[key] = number
        resources.append(resource)
    return build_state(resources, source)


def build_state(resources: list[Resource], source: str = "mesh file") -> ClusterState:
    """Group resources into a state, deriving EndpointSlices for selector-based Services."""
    by_type: dict[type, list[Any]] = {}
    for r in resources:
        by_type.setdefault(type(r), []).append(r)
    workloads: list[Workload] = by_type.get(Workload, [])
    services: list[Service] = by_type.get(Service, [])
    slices: list[EndpointSlice] = list(by_type.get(EndpointSlice, []))
    for svc in services:
        slices.extend(_derive_slices(svc, workloads, source))
    configs = by_type.get(MeshConfig, [])
    return ClusterState(
        workloads=tuple(workloads),
        services=tuple(services),
        slices=tuple(slices),
        servers=tuple(by_type.get(Server, [])),
        authorization_policies=tuple(by_type.get(AuthorizationPolicy, [])),
        mesh_tls=tuple(by_type.get(MeshTLSAuthentication, [])),
        network_authentications=tuple(by_type.get(NetworkAuthentication, [])),
        http_routes=tuple(by_type.get(HTTPRoute, [])),
        config=configs[0] if configs else MeshConfig(),
    )


def _derive_slices(svc: Service, workloads: list[Workload], source: str) -> list[EndpointSlice]:
    if svc.selector is None:
        return []
    selector = dict(svc.selector)
    out: list[EndpointSlice] = []
    owners: dict[tuple[str, int], str] = {}
    for w in workloads:
        labels = dict(w.meta.labels)
        if w.meta.namespace != svc.meta.namespace or not selector:
            continue
        if any(labels.get(k) != v for k, v in selector.items()):
            continue
        ports = []
        for sp in svc.ports:
            target = (
                sp.target_port if isinstance(sp.target_port, int) else w.port_named(sp.target_port)
            )
            if target is None:
                continue  # like Kubernetes: a workload without the named port serves none
            other = owners.setdefault((w.address, target), w.meta.name)
            if other != w.meta.name:
                raise InvalidResource(
                    f"workloads {other} and {w.meta.name} both serve {w.address}:{target}; give them "
                    "distinct addresses or named ports",
                    document=f"{source} (Service {svc.meta})",
                    field="spec.selector",
                )
            ports.append(ContainerPort(sp.name, target))
        if ports:
            out.append(
                EndpointSlice(
                    Meta(f"{svc.meta.name}-{w.meta.name}", svc.meta.namespace),
                    svc.meta.name,
                    tuple(ports),
                    (SliceEndpoint((w.address,), w.ready, w.meta.name),),
                )
            )
    return out


def has_resources(state: ClusterState) -> bool:
    """Whether ``state`` holds any resource at all (an empty or comment-only file does not)."""
    return any(
        (state.workloads, state.services, state.slices, state.servers,
         state.authorization_policies, state.mesh_tls, state.network_authentications,
         state.http_routes)
    )  # fmt: skip


class MeshFileSource:
    """Watches a mesh file; every valid change goes to ``publish``, an invalid one is refused.

    ``on_reload(result, error)`` is told every outcome (``applied``, ``unchanged``, ``refused``)
    so the service can count reloads and expose the last error.
    """

    def __init__(
        self,
        path: Path,
        publish: Callable[[ClusterState], None],
        on_reload: Callable[[str, str | None], None] = lambda result, error: None,
        *,
        poll_interval: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self._publish = publish
        self._on_reload = on_reload
        self._poll_interval = poll_interval
        self._digest: str | None = None
        self._refused_digest: str | None = None
        self._serving_resources = False  # the last published state had resources
        self.last_error: str | None = None

    def _read(self) -> bytes:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise InvalidMeshFile(f"{self.path}: cannot read: {e.strerror or e}") from None
        if len(data) > MAX_FILE_BYTES:
            raise InvalidMeshFile(f"{self.path}: larger than {MAX_FILE_BYTES} bytes")
        return data

    def load(self) -> ClusterState:
        """Read and parse the file now; raises when it is invalid (used at startup)."""
        data = self._read()
        state = self._parse(data)
        self._digest = hashlib.sha256(data).hexdigest()
        self._serving_resources = has_resources(state)
        return state

    def _parse(self, data: bytes) -> ClusterState:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidMeshFile(f"{self.path}: not UTF-8 text") from None
        return load_mesh_text(text, str(self.path))

    def reload(self) -> str:
        """Re-read the file; publish it when valid and changed. Returns the outcome."""
        try:
            data = self._read()
        except InvalidMeshFile as e:
            return self._refuse(str(e), None)
        digest = hashlib.sha256(data).hexdigest()
        if digest == self._digest:
            if self.last_error is not None:  # put back as it was: nothing is refused any more
                self._refused_digest, self.last_error = None, None
                self._on_reload("unchanged", None)
                log.info("mesh file %s is back to the state in use", self.path)
            return "unchanged"
        if digest == self._refused_digest:
            return "unchanged"  # the same bad content again: already reported
        try:
            state = self._parse(data)
        except (InvalidMeshFile, InvalidResource) as e:
            return self._refuse(str(e), digest)
        has_resources_now = has_resources(state)
        if self._serving_resources and not has_resources_now:
            return self._refuse(
                f"{self.path}: no resources (empty, or only comments); a file being written, or "
                "truncated by mistake, looks like this, so the mesh is not emptied by a reload. "
                "To serve an empty mesh, restart the destination service with this file",
                digest,
            )
        self._digest, self._refused_digest, self.last_error = digest, None, None
        self._serving_resources = has_resources_now
        self._publish(state)
        self._on_reload("applied", None)
        log.info("mesh file %s applied", self.path)
        return "applied"

    def _refuse(self, error: str, digest: str | None) -> str:
        self._refused_digest = digest
        self.last_error = error
        self._on_reload("refused", error)
        log.error("mesh file refused, keeping the last good state: %s", error)
        return "refused"

    async def run(self, stop: asyncio.Event) -> None:
        """Reload on every change of the file until ``stop`` is set."""
        async for _ in watch_file(self.path, stop, poll_interval=self._poll_interval):
            self.reload()
