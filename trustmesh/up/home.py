"""The local PKI and runtime files of ``trustmesh up`` under ``$TRUSTMESH_HOME``.

The home is the same credential store ``trustmesh pki`` and ``trustmesh rotate`` use; ``up``
creates its anchor and issuer on first run and replaces an issuer that expired while nothing
was running. Runtime files live beside the store in ``<home>/up/``: the anchors PEM the proxies
start from, one workload token per service account (the embedded counterpart of a projected
ServiceAccount token, signed with the store's token key), and one log file per child.
One ``up`` at a time owns a home (``<home>/up/lock``). While its mesh is ready it publishes
where its components' admin ports are in ``<home>/up/mesh.json``, so that ``trustmesh check``
run on the same home checks them without being told.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from identity.validators import DEFAULT_AUDIENCE, sign_workload_token
from pki.errors import StoreCorrupt, StoreError
from pki.rotation import init_anchor, issue_issuer
from pki.store import FileStore, write_file_atomic

TOKEN_TTL = timedelta(hours=24)
# Tokens are re-signed well before they expire, so a proxy renewing at any time holds a valid one.
TOKEN_REFRESH = timedelta(hours=12)


class HomeInUse(RuntimeError):
    """Another ``trustmesh up`` holds the home."""


class HomeUnusable(RuntimeError):
    """The home's runtime directory or lock file cannot be created."""


@dataclass(frozen=True, slots=True)
class Home:
    """Paths of one ``up`` home."""

    root: Path

    @property
    def store(self) -> FileStore:
        return FileStore(self.root)

    @property
    def run_dir(self) -> Path:
        return self.root / "up"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def anchors(self) -> Path:
        return self.run_dir / "trust-anchors.pem"

    def token(self, namespace: str, service_account: str) -> Path:
        return self.run_dir / "tokens" / f"{namespace}.{service_account}.jwt"

    @property
    def published(self) -> Path:
        return self.run_dir / "mesh.json"

    def publish(self, info: dict[str, Any]) -> None:
        """Say where the running mesh is (``info``: what ``up -o json`` prints when ready), with
        this process's pid and start time: a file left by an ``up`` that was killed outright
        then names a process that is gone, and :meth:`running` ignores it."""
        started = _process_start(os.getpid())
        data = {**info, "pid": os.getpid(), "process_start": started}
        write_file_atomic(self.published, json.dumps(data, indent=2).encode() + b"\n")

    def unpublish(self) -> None:
        self.published.unlink(missing_ok=True)

    def running(self) -> RunningMesh | None:
        """The mesh an ``up`` running on this home published, or None: no file, or one whose
        process has ended (its pid gone, or now another process's), or one that cannot be read."""
        try:
            data = json.loads(self.published.read_bytes())
            pid, started = data["pid"], data["process_start"]
            control = data["control_plane"]["admin"]
            mesh = RunningMesh(
                pid=int(pid),
                identity=str(control["identity"]),
                destination=str(control["destination"]),
                proxies={
                    str(w["admin"]): str(w["workload"]) for w in data["workloads"] if w.get("admin")
                },
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None  # not one we wrote: a partial one is impossible (written atomically)
        if not isinstance(pid, int) or not isinstance(started, int):
            return None
        if _process_start(pid) != started:
            return None
        return mesh

    @contextlib.contextmanager
    def run_lock(self) -> Iterator[None]:
        """Hold the home for one ``up``; raise HomeInUse, naming the holder, when another has it.

        Two ``up`` runs on one home would fight over its files: the second rewrites the demo
        mesh file that the first one's destination watches, the tokens and the logs. The lock
        is an flock, so it goes with its process, however that process ends.
        """
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            where = e.filename or self.run_dir
            raise HomeUnusable(
                f"cannot use {self.root} as the trustmesh up home: {where}: {e.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise HomeInUse(
                f"another trustmesh up{pid} is running on {self.root}; "
                "stop it first, or give this one another --home"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            yield
        finally:
            os.close(fd)  # releases the flock


@dataclass(frozen=True, slots=True)
class RunningMesh:
    """The admin addresses of a running ``up``'s components, as it published them."""

    pid: int
    identity: str
    destination: str
    proxies: dict[str, str]  # admin HOST:PORT -> workload ("namespace/name")


def running_mesh(store: Path) -> RunningMesh | None:
    """The mesh of a ``trustmesh up`` running on the home that is ``store``, if any."""
    return Home(store.expanduser().resolve()).running()


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, field 22 of /proc/PID/stat), which
    with the pid names one process for good; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces and ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def ensure_pki(home: Home, *, now: datetime) -> str:
    """Create the anchor and issuer when missing (or the issuer when expired); returns what
    was done, for the operator: ``created``, ``issuer replaced`` or ``existing``."""
    store = home.store
    home.root.mkdir(parents=True, exist_ok=True)
    os.chmod(home.root, 0o700)
    versions = store.versions()
    if store.current_version() is None and len(versions) > 1:
        # A second version is only ever written after ``current`` pointed at the first, so the
        # link was lost. Creating the PKI here would wipe the archive (the store's clean-up
        # takes every version past a missing link for a partial write) and mint a new trust
        # anchor that no workload trusts. A lone version 1 may be a first run that was
        # interrupted before its link flip; the store discards it as such.
        raise StoreCorrupt(
            f"{home.root} holds versions {versions[0]}..{versions[-1]} but no "
            "'current' link; refusing to create a new trust anchor over them. Point it at the "
            f"version to use (ln -s versions/NNNNNN {home.root}/current) or move the directory "
            "away"
        )
    state = store.load() if store.current_version() is not None else None
    orphans = state is not None and (state.bundle is not None or state.issuer is not None)
    if state is not None and state.anchor is None and orphans:
        raise StoreCorrupt(
            f"{home.root} has a trust bundle or issuer but no trust anchor; refusing to create "
            "a new anchor beside them ('trustmesh pki anchor create --rotate' does that on "
            "purpose)"
        )
    if state is None or state.anchor is None:
        init_anchor(store, now=now)
        issue_issuer(store, now=now)
        action = "created"
    elif not state.anchor.is_valid_at(now):
        # An issuer signed now would be clamped to the anchor's NotAfter, i.e. already expired.
        raise StoreError(
            f"the trust anchor in {home.root} is not valid at {now:%Y-%m-%d %H:%M} UTC (valid "
            f"until {state.anchor.not_after:%Y-%m-%d %H:%M}); add a new one with 'trustmesh pki "
            "anchor create --rotate', or use a fresh --home"
        )
    else:
        if state.issuer is None or not state.issuer.certificate.is_valid_at(now):
            issue_issuer(store, now=now, reason="issuer replaced by trustmesh up")
            action = "issuer replaced"
        else:
            action = "existing"
    home.run_dir.mkdir(parents=True, exist_ok=True)
    sync_anchors(home)
    return action


def sync_anchors(home: Home) -> bool:
    """Rewrite the anchors file the proxies start from when the store's bundle differs from it
    (a rotation while ``up`` runs): a proxy restarted later must trust the anchors in use, not
    the ones of ``up``'s start. True when it was rewritten."""
    bundle = home.store.trust_bundle().pem()
    try:
        if home.anchors.read_bytes() == bundle:
            return False
    except FileNotFoundError:
        pass
    write_file_atomic(home.anchors, bundle)
    return True


def write_token(
    home: Home,
    namespace: str,
    service_account: str,
    *,
    now: datetime,
    ttl: timedelta = TOKEN_TTL,
    audience: str = DEFAULT_AUDIENCE,
) -> Path:
    """Sign a workload token for ``service_account`` and write it (0600) where its proxy reads it."""
    token = sign_workload_token(
        home.store, namespace, service_account, now=now, ttl=ttl, audience=audience
    )
    path = home.token(namespace, service_account)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_atomic(path, token + b"\n", mode=0o600)
    return path
