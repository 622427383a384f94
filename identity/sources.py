"""Where the issuer comes from: the FileStore, a directory with Kubernetes Secret-volume
semantics, or a Kubernetes Secret watched through the API.

Every source offers ``revision()`` (cheap; changes whenever the issuer may have changed) and
``load()`` (the candidate credential and the anchors to check it against). The
:class:`~identity.watcher.IssuerWatcher` polls ``revision()`` and validates what ``load()``
returns before the service uses it.
"""

from __future__ import annotations

import base64
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from identity.errors import IssuerSourceError
from identity.issuer import ISSUER_FILES, TLS_CA, bundle_from_pem, credential_from_files
from pki.bundle import TrustBundle
from pki.certs import Credential
from pki.errors import PKIError
from pki.store import FileStore

log = logging.getLogger(__name__)

ISSUER_SECRET = "trustmesh-identity-issuer"
TRUST_ROOTS_CONFIGMAP = "trustmesh-identity-trust-roots"
TRUST_ROOTS_KEY = "ca-bundle.crt"


class IssuerSource(Protocol):
    description: str

    def revision(self) -> object:
        """A value that differs whenever the issuer may have changed."""
        ...

    def load(self) -> tuple[Credential, TrustBundle]:
        """The candidate issuer and the trust anchors it must chain to."""
        ...


class StoreSource:
    """The embedded FileStore: issuer and bundle come from the same atomic version."""

    def __init__(self, store: FileStore) -> None:
        self.store = store
        self.description = f"store {store.root}"

    def revision(self) -> object:
        return self.store.current_version()

    def load(self) -> tuple[Credential, TrustBundle]:
        try:
            state = self.store.load()
            return state.require_issuer(), state.require_bundle()
        except PKIError as e:
            raise IssuerSourceError(
                f"cannot read the issuer from {self.description}: {e}"
            ) from None


class DirectorySource:
    """A mounted Secret: ``crt.pem``/``key.pem`` or ``tls.crt``/``tls.key``/``ca.crt``.

    The kubelet updates a Secret volume by writing a new hidden directory and swapping the
    ``..data`` symlink, so the link target is the revision and files are read through the
    resolved link, all from one version. A plain directory (no ``..data``) falls back to file
    stat data. The anchors are fixed at start (``anchors``, else the ``ca.crt`` present then),
    as Linkerd does: a new issuer must chain to the anchors the service started with.
    """

    def __init__(
        self, directory: str | os.PathLike[str], anchors: TrustBundle | None = None
    ) -> None:
        self.directory = Path(directory)
        self.description = f"directory {self.directory}"
        if anchors is None:
            ca = self._read_all().get(TLS_CA)
            if not ca:
                raise IssuerSourceError(
                    f"{self.description} has no {TLS_CA}; pass the trust anchors explicitly "
                    "(--trust-anchors) for the crt.pem/key.pem format"
                )
            anchors = bundle_from_pem(ca, source=f"{self.directory / TLS_CA}")
        self.anchors = anchors

    def revision(self) -> object:
        try:
            return ("..data", os.readlink(self.directory / "..data"))
        except OSError:
            pass
        stats = []
        for name in ISSUER_FILES:
            try:
                st = os.stat(self.directory / name)
            except OSError:
                continue
            stats.append((name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stats)

    def _read_all(self) -> dict[str, bytes]:
        base = self.directory
        data_link = base / "..data"
        if data_link.is_symlink():
            base = data_link.resolve()
        files = {}
        for name in ISSUER_FILES:
            try:
                files[name] = (base / name).read_bytes()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise IssuerSourceError(f"cannot read {base / name}: {e.strerror}") from None
        if not files:
            raise IssuerSourceError(f"{self.description} holds no issuer files")
        return files

    def load(self) -> tuple[Credential, TrustBundle]:
        return credential_from_files(self._read_all(), source=self.description), self.anchors


class KubernetesSecretSource:
    """The issuer Secret, followed by a watch on the API in a background thread.

    The thread re-lists and re-watches after any error or watch timeout, with a bounded backoff,
    so the watch never silently stops (Linkerd's file watcher quits on its first error). Anchors
    come from the trust-roots ConfigMap at start, else the Secret's ``ca.crt``.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        name: str = ISSUER_SECRET,
        watch_timeout: int = 30,
        read_timeout: float = 45.0,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        from kubernetes import client as k8s

        self._core = k8s.CoreV1Api(api_client)
        self.namespace = namespace
        self.name = name
        self.description = f"Secret {namespace}/{name}"
        self._watch_timeout = watch_timeout
        # The client-side read timeout ends a watch even when the server ignores
        # timeout_seconds, so the loop re-lists and notices stop() in bounded time.
        self._read_timeout = read_timeout
        self._on_error = on_error
        self._cond = threading.Condition()
        self._data: dict[str, bytes] | None = None
        self._revision = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._set(self._read_secret())
        self.anchors = self._read_anchors()

    # --- API reads ----------------------------------------------------------------------

    def _read_secret(self) -> dict[str, bytes] | None:
        try:
            secret = self._core.read_namespaced_secret(self.name, self.namespace)
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return None
            raise IssuerSourceError(f"cannot read {self.description}: {_reason(e)}") from None
        return _decode(getattr(secret, "data", None))

    def _read_anchors(self) -> TrustBundle:
        cm_name = f"ConfigMap {self.namespace}/{TRUST_ROOTS_CONFIGMAP}"
        pem = None
        try:
            cm = self._core.read_namespaced_config_map(TRUST_ROOTS_CONFIGMAP, self.namespace)
            pem = (cm.data or {}).get(TRUST_ROOTS_KEY)
        except Exception as e:
            if getattr(e, "status", None) != 404:
                raise IssuerSourceError(f"cannot read {cm_name}: {_reason(e)}") from None
        if pem:
            return bundle_from_pem(pem.encode(), source=cm_name)
        ca = (self._data or {}).get(TLS_CA)
        if not ca:
            raise IssuerSourceError(
                f"no trust anchors: ConfigMap {self.namespace}/{TRUST_ROOTS_CONFIGMAP} key "
                f"{TRUST_ROOTS_KEY} is missing and {self.description} has no {TLS_CA}"
            )
        return bundle_from_pem(ca, source=f"{self.description} {TLS_CA}")

    def _set(self, data: dict[str, bytes] | None) -> None:
        with self._cond:
            if data != self._data:
                self._data = data
                self._revision += 1
                self._cond.notify_all()

    # --- IssuerSource -------------------------------------------------------------------

    def revision(self) -> object:
        with self._cond:
            return self._revision

    def load(self) -> tuple[Credential, TrustBundle]:
        with self._cond:
            data = self._data
        if data is None:
            raise IssuerSourceError(f"{self.description} does not exist")
        return credential_from_files(data, source=self.description), self.anchors

    # --- the watch thread ---------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="issuer-secret-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        from kubernetes import watch

        backoff = 0.1
        while not self._stop.is_set():
            try:
                self._set(self._read_secret())  # re-list: catch up on anything missed
                w = watch.Watch()
                for event in w.stream(
                    self._core.list_namespaced_secret,
                    namespace=self.namespace,
                    field_selector=f"metadata.name={self.name}",
                    timeout_seconds=self._watch_timeout,
                    _request_timeout=(5.0, self._read_timeout),
                ):
                    if self._stop.is_set():
                        w.stop()
                        break
                    obj = event.get("object")
                    meta = getattr(obj, "metadata", None)
                    if getattr(meta, "name", None) != self.name:
                        continue  # the selector may be ignored by the server
                    kind = event.get("type")
                    self._set(None if kind == "DELETED" else _decode(getattr(obj, "data", None)))
                backoff = 0.1
            except Exception as e:  # the watch must survive anything the API does
                if _is_read_timeout(e):
                    continue  # an idle watch ended: re-list and watch again

                log.warning(
                    "issuer Secret watch failed (%s); retrying in %.1fs", _reason(e), backoff
                )
                if self._on_error is not None:
                    self._on_error(_reason(e))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def _is_read_timeout(e: BaseException) -> bool:
    from urllib3.exceptions import ReadTimeoutError

    return isinstance(e, ReadTimeoutError | TimeoutError) or isinstance(
        getattr(e, "__context__", None), ReadTimeoutError | TimeoutError
    )


def _decode(data: dict[str, str] | None) -> dict[str, bytes]:
    out = {}
    for key, value in (data or {}).items():
        try:
            out[key] = base64.b64decode(value)
        except (ValueError, TypeError):
            continue
    return out


def _reason(e: BaseException) -> str:
    return str(getattr(e, "reason", None) or e).splitlines()[0] if str(e) else type(e).__name__
