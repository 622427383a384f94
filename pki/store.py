"""``FileStore``: the embedded credential store, a versioned archive with an atomic pointer.

Layout::

    <root>/lock                     flock()ed by writers
    <root>/current -> versions/000007
    <root>/versions/000007/         one complete version: bundle.pem, anchor.pem, anchor.key,
                                    issuer.pem, issuer.key, … and meta.json (sha256 of each file)

A write builds the next version in a temporary directory, fsyncs every file and the directory,
renames it into ``versions/`` and then flips ``current`` with ``os.replace`` on a symlink. A crash
at any instant therefore leaves ``current`` at the old or the new complete version, never a mix;
leftovers of an interrupted write are removed by the next writer. Keys are written 0600 and the
store directory is 0700. Readers take no lock: they resolve ``current`` once and read that
version, and ``meta.json`` digests catch any file that does not belong to it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pki.bundle import TrustBundle
from pki.certs import Certificate, Credential, load_pem_chain
from pki.errors import PKIError, StoreCorrupt, StoreError, StoreLocked, StoreNotInitialized
from pki.keys import PrivateKey

BUNDLE = "bundle.pem"
ANCHOR = "anchor.pem"
ANCHOR_KEY = "anchor.key"
ISSUER = "issuer.pem"
ISSUER_KEY = "issuer.key"
# A staged anchor rotation: the new anchor is in the bundle (so that workloads receive it) but
# signs nothing until 'pki anchor activate' promotes it to ANCHOR.
NEXT_ANCHOR = "next-anchor.pem"
NEXT_ANCHOR_KEY = "next-anchor.key"
# The key of an issuer whose CSR is out for signing by an anchor whose key is kept offline
# ('pki issuer csr'); 'pki issuer import' pairs the signed certificate with it.
PENDING_ISSUER_KEY = "pending-issuer.key"
# The lifetime new issuers are given. An issuer certificate can be cut short by its anchor's
# NotAfter, so a certificate's own window is not a safe record of it.
ISSUER_SETTINGS = "issuer.json"
META = "meta.json"
_VERSION_DIGITS = 6
_MAX_ISSUER_LIFETIME_SECONDS = 100 * 366 * 86400
DEFAULT_KEEP_VERSIONS = 20


def _crash_point(label: str) -> None:
    """Test hook: with ``TRUSTMESH_CRASH_AT=<label>`` set, the process SIGKILLs itself here.

    The crash test uses it to kill a real ``trustmesh rotate`` at every step of a write; it is
    inert unless the variable names this exact step.
    """
    if os.environ.get("TRUSTMESH_CRASH_AT") == label:
        os.kill(os.getpid(), 9)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(fd: int, data: bytes, mode: int) -> None:
    """Set ``mode`` (whatever the umask did), write all of ``data``, fsync and close ``fd``."""
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _stage(path: Path, data: bytes, mode: int) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and fsync it; return its path.

    On any error the temporary file is removed, so a failed write (a full disk, a bad
    permission) leaves nothing behind. Temporary files that a killed writer left for ``path``
    are removed first.
    """
    _remove_stale_temps(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        _write_synced(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), data, mode)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            # Named by the file the caller asked for, not by our temporary one.
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    return tmp


def _remove_stale_temps(path: Path) -> None:
    prefix = f".{path.name}.tmp-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            pid = entry.name[len(prefix) :]
            if not entry.name.startswith(prefix) or not (pid.isascii() and pid.isdigit()):
                continue
            if int(pid) != os.getpid() and not _process_exists(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def write_new_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Create ``path`` (it must not exist: FileExistsError), write ``data``, fsync the file and
    its directory. For a key that exists nowhere else: never over another file, and on disk
    before anything that depends on it is committed. A failed write removes the file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        _write_synced(fd, data, mode)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise


def write_file_atomic(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` via a temporary file, fsync and ``os.replace``."""
    write_files_atomic([(path, data, mode)])


def write_files_atomic(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write several files that belong together (a private key and its certificate).

    Every file is written and fsynced under a temporary name first; only when all of them are
    on disk are they renamed into place, back to back. A failure while writing (a full disk)
    therefore leaves every target as it was and no temporary file behind. What no rename-based
    scheme can avoid is a SIGKILL between the renames (microseconds apart): then the first
    files are new and the rest old, and a reader that checks the pair (FileCredentials does)
    keeps its last good one until the write is repeated.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            staged.append((_stage(path, data, mode), path))
        _crash_point("files-staged")
        while staged:
            tmp, path = staged[0]
            os.replace(tmp, path)
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    for parent in dict.fromkeys(path.parent for path, _, _ in files):
        _fsync_dir(parent)


def is_secret(name: str) -> bool:
    return name.endswith(".key")


def _check_key_mode(path: Path) -> None:
    # commit() writes keys 0600, so a looser mode means the store was changed outside
    # TrustMesh: refuse (like ssh) rather than keep using a key others may have read.
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        raise StoreCorrupt(
            f"{path} has mode {mode:04o}; private keys must be readable by their owner only "
            f"(chmod 600 {path})"
        )


@dataclass(frozen=True, slots=True)
class StoreState:
    """One version of the store, fully loaded."""

    version: int
    path: Path
    created: str
    reason: str
    files: tuple[str, ...]
    bundle: TrustBundle | None
    anchor: Certificate | None
    anchor_key: PrivateKey | None
    issuer: Credential | None
    next_anchor: Certificate | None = None  # staged: in the bundle, not yet signing
    next_anchor_key: PrivateKey | None = None
    issuer_lifetime: timedelta | None = None  # from issuer.json; None in older stores
    pending_issuer_key: PrivateKey | None = None  # an issuer CSR is out for signing

    def anchor_credential(self) -> Credential:
        if self.anchor is None:
            raise StoreNotInitialized(
                "the store has no trust anchor; run 'trustmesh pki anchor create'"
            )
        if self.anchor_key is None:
            raise StoreError(
                "the anchor's private key is not in the store (kept offline): 'trustmesh pki "
                "issuer csr' here, sign the CSR where the key is ('trustmesh pki issuer sign "
                "--csr') and 'trustmesh pki issuer import' the certificate"
            )
        return Credential(self.anchor, self.anchor_key)

    def require_bundle(self) -> TrustBundle:
        if self.bundle is None:
            raise StoreNotInitialized(
                "the store has no trust bundle; run 'trustmesh pki anchor create'"
            )
        return self.bundle

    def require_issuer(self) -> Credential:
        if self.issuer is None:
            raise StoreNotInitialized("the store has no issuer; run 'trustmesh pki issuer create'")
        return self.issuer


def issuer_settings(lifetime: timedelta) -> bytes:
    """The contents of ``issuer.json`` recording ``lifetime`` (whole seconds)."""
    return json.dumps({"lifetime_seconds": int(lifetime.total_seconds())}).encode() + b"\n"


def _parse_issuer_settings(data: bytes, version: int) -> timedelta:
    try:
        seconds = json.loads(data)["lifetime_seconds"]
    except (ValueError, TypeError, KeyError):
        raise StoreCorrupt(
            f"version {version}: {ISSUER_SETTINGS} is not a JSON object with 'lifetime_seconds'"
        ) from None
    if (
        not isinstance(seconds, int)
        or isinstance(seconds, bool)
        or not 0 < seconds <= _MAX_ISSUER_LIFETIME_SECONDS
    ):
        raise StoreCorrupt(
            f"version {version}: {ISSUER_SETTINGS} has lifetime_seconds={seconds!r}; "
            "expected a positive whole number of seconds"
        )
    return timedelta(seconds=seconds)


class FileStore:
    """A directory holding the trust anchors, the issuer and their keys (see module doc)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    # --- reading ----------------------------------------------------------------------

    def current_version(self) -> int | None:
        try:
            target = os.readlink(self.root / "current")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreCorrupt(f"{self.root}/current is not a symlink: {e.strerror}") from None
        try:
            return int(Path(target).name)
        except ValueError:
            raise StoreCorrupt(f"{self.root}/current points at {target!r}, not a version") from None

    def version_path(self, version: int) -> Path:
        return self.versions_dir / f"{version:0{_VERSION_DIGITS}d}"

    def versions(self) -> list[int]:
        if not self.versions_dir.is_dir():
            return []
        return sorted(
            int(p.name)
            for p in self.versions_dir.iterdir()
            if p.name.isascii() and p.name.isdigit()
        )

    def read_version(self, version: int) -> dict[str, bytes]:
        """All files of ``version``, checked against its ``meta.json`` digests."""
        path = self.version_path(version)
        meta = self._meta(path)
        files: dict[str, bytes] = {}
        for name, digest in meta["files"].items():
            try:
                data = (path / name).read_bytes()
            except FileNotFoundError:
                raise StoreCorrupt(f"{path / name} is listed in meta.json but missing") from None
            if hashlib.sha256(data).hexdigest() != digest:
                raise StoreCorrupt(f"{path / name} does not match its digest in meta.json")
            if is_secret(name):
                _check_key_mode(path / name)
            files[name] = data
        return files

    def _meta(self, path: Path) -> dict[str, Any]:
        try:
            meta = json.loads((path / META).read_text())
        except FileNotFoundError:
            raise StoreCorrupt(f"{path} has no meta.json") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise StoreCorrupt(f"{path / META} is not valid JSON: {e}") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            raise StoreCorrupt(f"{path / META} lacks the 'files' table")
        return meta

    def load(self) -> StoreState:
        """The current version, parsed. Raises StoreNotInitialized for an empty store."""
        version = self.current_version()
        if version is None:
            raise StoreNotInitialized(
                f"no TrustMesh store at {self.root}; run 'trustmesh pki anchor create --store {self.root}'"
            )
        return self._parse(version)

    def _parse(self, version: int) -> StoreState:
        files = self.read_version(version)
        meta = self._meta(self.version_path(version))
        try:
            bundle = TrustBundle.from_pem(files[BUNDLE]) if BUNDLE in files else None
            anchor = Certificate.from_pem(files[ANCHOR]) if ANCHOR in files else None
            anchor_key = PrivateKey.load(files[ANCHOR_KEY]) if ANCHOR_KEY in files else None
            next_anchor = Certificate.from_pem(files[NEXT_ANCHOR]) if NEXT_ANCHOR in files else None
            next_key = PrivateKey.load(files[NEXT_ANCHOR_KEY]) if NEXT_ANCHOR_KEY in files else None
            if next_anchor is None and next_key is not None:
                raise StoreCorrupt(f"version {version} has {NEXT_ANCHOR_KEY} but no {NEXT_ANCHOR}")
            if next_anchor is not None and (
                bundle is None or next_anchor.fingerprint not in bundle.fingerprints
            ):
                raise StoreCorrupt(
                    f"version {version} stages anchor {next_anchor.fingerprint[:16]}, which is not "
                    "in its trust bundle"
                )
            if next_key and next_anchor and not next_key.matches(next_anchor.x509.public_key()):
                raise StoreCorrupt(
                    f"version {version}: {NEXT_ANCHOR_KEY} is not the key of {NEXT_ANCHOR}"
                )
            issuer = None
            if ISSUER in files:
                if ISSUER_KEY not in files:
                    raise StoreCorrupt(f"version {version} has {ISSUER} but no {ISSUER_KEY}")
                chain = load_pem_chain(files[ISSUER])
                issuer = Credential(chain[0], PrivateKey.load(files[ISSUER_KEY]), chain[1:])
            pending = files.get(PENDING_ISSUER_KEY)
            pending_key = PrivateKey.load(pending) if pending is not None else None
            issuer_lifetime = None
            if ISSUER_SETTINGS in files:
                issuer_lifetime = _parse_issuer_settings(files[ISSUER_SETTINGS], version)
        except StoreCorrupt:
            raise
        except PKIError as e:
            raise StoreCorrupt(f"version {version} of {self.root} is unreadable: {e}") from None
        return StoreState(
            version=version,
            path=self.version_path(version),
            created=str(meta.get("created", "")),
            reason=str(meta.get("reason", "")),
            files=tuple(sorted(files)),
            bundle=bundle,
            anchor=anchor,
            anchor_key=anchor_key,
            issuer=issuer,
            next_anchor=next_anchor,
            next_anchor_key=next_key,
            issuer_lifetime=issuer_lifetime,
            pending_issuer_key=pending_key,
        )

    def pending_issuer_key_since(self) -> datetime | None:
        """When the current pending issuer key (an issuer CSR out for signing) was made: the
        creation time of the oldest kept version, in the run back from the current one, that
        holds the same key. None without one. When every kept version holds it (older ones
        were pruned), or an older one cannot be read, the time is a lower bound on its age."""
        version = self.current_version()
        if version is None:
            return None
        key = self.read_version(version).get(PENDING_ISSUER_KEY)
        if key is None:
            return None
        since = None
        for v in reversed([v for v in self.versions() if v <= version]):
            try:
                if self.read_version(v).get(PENDING_ISSUER_KEY) != key:
                    break
                since = datetime.fromisoformat(str(self._meta(self.version_path(v))["created"]))
            except (StoreCorrupt, OSError, KeyError, ValueError):
                break  # an older version that cannot be read or dated ends the run there
        return since

    def trust_bundle(self) -> TrustBundle:
        return self.load().require_bundle()

    def issuer(self) -> Credential:
        return self.load().require_issuer()

    def read_file(self, name: str) -> bytes | None:
        version = self.current_version()
        if version is None:
            return None
        return self.read_version(version).get(name)

    # --- writing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, *, wait: float = 0.0) -> Iterator[FileStore]:
        """Hold the store's write lock; raise StoreLocked if another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    holder = _read_holder(fd)
                    os.close(fd)
                    raise StoreLocked(
                        f"another process{holder} holds the lock on {self.root}; try again later"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            self._clean_partial_writes()
            yield self
        finally:
            self._lock_fd = None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _clean_partial_writes(self) -> None:
        # A write killed before its flip leaves a .tmp- directory, or a complete version newer
        # than ``current`` that nothing ever pointed at: both are discarded.
        current = self.current_version() or 0
        if self.versions_dir.is_dir():
            for p in self.versions_dir.iterdir():
                if p.name.startswith(".tmp-") or (
                    p.name.isascii() and p.name.isdigit() and int(p.name) > current
                ):
                    shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.root / ".current.tmp").unlink()

    def commit(
        self, changes: Mapping[str, bytes | None], *, reason: str, now: datetime
    ) -> StoreState:
        """Write a new version: the current files updated by ``changes`` (None deletes a file).

        The caller must hold :meth:`lock`. The new version is validated by loading it back before
        ``current`` moves to it.
        """
        if self._lock_fd is None:
            raise StoreError("FileStore.commit() needs the store lock (use 'with store.lock():')")
        for name in changes:
            if "/" in name or name.startswith(".") or name == META:
                raise ValueError(f"invalid store file name {name!r}")
        self.root.chmod(0o700)
        self.versions_dir.mkdir(exist_ok=True, mode=0o700)
        previous = self.current_version()
        files = self.read_version(previous) if previous is not None else {}
        for name, data in changes.items():
            if data is None:
                files.pop(name, None)
            else:
                files[name] = data
        version = max(self.versions(), default=0) + 1
        tmp = self.versions_dir / f".tmp-{version}-{os.getpid()}"
        tmp.mkdir(mode=0o700)
        for name, data in sorted(files.items()):
            _crash_point(f"write:{name}")
            write_file_atomic(tmp / name, data, mode=0o600 if is_secret(name) else 0o644)
        meta = {
            "version": version,
            "created": now.isoformat(),
            "reason": reason,
            "previous": previous,
            "files": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
        }
        _crash_point("write:meta")
        write_file_atomic(tmp / META, json.dumps(meta, indent=2).encode() + b"\n")
        _crash_point("rename")
        final = self.version_path(version)
        os.rename(tmp, final)
        _fsync_dir(self.versions_dir)
        state = self._parse(version)  # refuse to point at a version that does not load
        _crash_point("flip")
        link = self.root / ".current.tmp"
        with contextlib.suppress(FileNotFoundError):
            link.unlink()
        os.symlink(f"versions/{final.name}", link)
        os.replace(link, self.root / "current")
        _fsync_dir(self.root)
        _crash_point("flipped")
        return state

    def prune(self, keep: int = DEFAULT_KEEP_VERSIONS) -> list[int]:
        """Delete all but the newest ``keep`` versions (never the current one)."""
        if self._lock_fd is None:
            raise StoreError("FileStore.prune() needs the store lock")
        current = self.current_version()
        old = [v for v in self.versions()[:-keep] if v != current] if keep > 0 else []
        for v in old:
            shutil.rmtree(self.version_path(v))
        return old


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        pid = os.read(fd, 32).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
