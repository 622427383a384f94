"""FileStore: versions, modes, the lock, digests, leftovers of interrupted writes."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pki_testkit import T0

from pki.errors import StoreCorrupt, StoreError, StoreLocked, StoreNotInitialized
from pki.rotation import init_anchor, issue_issuer
from pki.store import (
    ANCHOR_KEY,
    BUNDLE,
    ISSUER_KEY,
    FileStore,
    write_file_atomic,
    write_files_atomic,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    fs = FileStore(tmp_path / "store")
    init_anchor(fs, now=T0)
    issue_issuer(fs, now=T0)
    return fs


def test_modes_and_layout(store: FileStore) -> None:
    assert _mode(store.root) == 0o700
    state = store.load()
    assert state.version == 2 and store.versions() == [1, 2]
    for name in state.files:
        expected = 0o600 if name.endswith(".key") else 0o644
        assert _mode(state.path / name) == expected, name
    assert {ANCHOR_KEY, ISSUER_KEY} <= set(state.files)
    assert os.readlink(store.root / "current") == "versions/000002"
    assert store.read_file(BUNDLE) == state.require_bundle().pem()


def test_empty_store(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "none")
    assert fs.current_version() is None and fs.versions() == [] and fs.read_file(BUNDLE) is None
    with pytest.raises(StoreNotInitialized, match="anchor create"):
        fs.load()


def test_commit_needs_the_lock(store: FileStore) -> None:
    with pytest.raises(StoreError, match="lock"):
        store.commit({"x.pem": b"x"}, reason="test", now=T0)
    with store.lock(), pytest.raises(ValueError, match="invalid store file name"):
        store.commit({"../x": b"x"}, reason="test", now=T0)


def test_lock_contention_in_process(store: FileStore) -> None:
    other = FileStore(store.root)
    with store.lock(), pytest.raises(StoreLocked, match=f"pid {os.getpid()}"), other.lock():
        pass
    with other.lock():  # released again
        pass


def test_lock_contention_across_processes(store: FileStore) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys
                from pki.store import FileStore
                with FileStore({str(store.root)!r}).lock():
                    print("locked", flush=True)
                    sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"), store.lock(wait=0.2):
            pass
    finally:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        holder.stdout.close()
    with store.lock(wait=5):
        pass


def test_digest_mismatch_is_corrupt(store: FileStore) -> None:
    path = store.load().path / BUNDLE
    os.chmod(path, 0o644)
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(StoreCorrupt, match="digest"):
        store.load()


def test_missing_file_and_bad_meta_are_corrupt(store: FileStore) -> None:
    version = store.load().path
    (version / ISSUER_KEY).unlink()
    with pytest.raises(StoreCorrupt, match="missing"):
        store.load()
    (version / "meta.json").write_text("{not json")
    with pytest.raises(StoreCorrupt, match="JSON"):
        store.load()
    (version / "meta.json").write_text("[]")
    with pytest.raises(StoreCorrupt, match="files"):
        store.load()


def test_current_pointing_nowhere_is_corrupt(store: FileStore) -> None:
    link = store.root / "current"
    link.unlink()
    link.symlink_to("versions/banana")
    with pytest.raises(StoreCorrupt):
        store.load()


def test_partial_writes_are_cleaned_by_the_next_writer(store: FileStore) -> None:
    partial = store.versions_dir / ".tmp-3-99999"
    partial.mkdir()
    (partial / BUNDLE).write_bytes(b"half")
    (store.root / ".current.tmp").symlink_to("versions/.tmp-3-99999")
    assert store.load().version == 2  # readers ignore leftovers
    with store.lock():
        pass
    assert not partial.exists() and not (store.root / ".current.tmp").is_symlink()


def test_commit_deletes_and_prunes(store: FileStore) -> None:
    with store.lock():
        state = store.commit({ANCHOR_KEY: None}, reason="anchor key moved offline", now=T0)
        assert ANCHOR_KEY not in state.files and state.anchor_key is None
        with pytest.raises(StoreError, match="offline"):
            state.anchor_credential()
        assert store.prune(keep=1) == [1, 2]
    assert store.versions() == [3]
    with pytest.raises(StoreError, match="lock"):
        store.prune()


def test_commit_refuses_an_unloadable_version(store: FileStore) -> None:
    with store.lock(), pytest.raises(StoreCorrupt):
        store.commit({BUNDLE: b"not a bundle"}, reason="broken", now=T0)
    assert store.load().version == 2  # current never moved


def test_write_file_atomic(tmp_path: Path) -> None:
    target = tmp_path / "k.key"
    write_file_atomic(target, b"one", mode=0o600)
    write_file_atomic(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two" and _mode(target) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["k.key"]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, so that a write runs out of space for real (needs root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_pair_that_does_not_fit_leaves_the_old_pair_and_no_temporary_file(
    small_fs: Path,
) -> None:
    key, cert = small_fs / "leaf.pem.key", small_fs / "leaf.pem"
    write_files_atomic([(key, b"old key", 0o600), (cert, b"old cert", 0o644)])
    with pytest.raises(OSError) as exc:
        # the key fits, the certificate (with a long chain) does not
        write_files_atomic([(key, b"new key", 0o600), (cert, b"c" * 200_000, 0o644)])
    assert exc.value.errno == errno.ENOSPC
    assert key.read_bytes() == b"old key" and cert.read_bytes() == b"old cert"
    assert sorted(p.name for p in small_fs.iterdir()) == ["leaf.pem", "leaf.pem.key"]
    # a single file that does not fit: the same
    with pytest.raises(OSError):
        write_file_atomic(key, b"k" * 200_000, mode=0o600)
    assert key.read_bytes() == b"old key"
    assert sorted(p.name for p in small_fs.iterdir()) == ["leaf.pem", "leaf.pem.key"]


def test_a_failed_rename_removes_the_files_not_yet_in_place(tmp_path: Path) -> None:
    first, blocked = tmp_path / "a.key", tmp_path / "b.pem"
    blocked.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(IsADirectoryError):
        write_files_atomic([(first, b"a", 0o600), (blocked, b"b", 0o644)])
    # The renames are the one step that is not all-or-nothing: the first file is in place.
    assert first.read_bytes() == b"a" and blocked.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.key", "b.pem"]


def test_temporary_files_of_a_dead_writer_are_removed_by_the_next(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    target = tmp_path / "k.key"
    stale = tmp_path / f".k.key.tmp-{dead.pid}"
    stale.write_bytes(b"half a key")
    alive = tmp_path / f".k.key.tmp-{os.getppid()}"  # a live writer's file is not touched
    alive.write_bytes(b"in progress")
    other = tmp_path / f".other.key.tmp-{dead.pid}"  # nor another target's
    other.write_bytes(b"x")
    odd = tmp_path / ".k.key.tmp-\u00b2"  # isdigit() says yes, int() says no: ignored
    odd.write_bytes(b"x")
    write_file_atomic(target, b"key", mode=0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["k.key", alive.name, other.name, odd.name]
    )


def test_a_write_that_cannot_start_names_the_file_asked_for(tmp_path: Path) -> None:
    """The error named our temporary file (.k.key.tmp-PID), which the user never asked for."""
    target = tmp_path / "missing-dir" / "k.key"
    with pytest.raises(FileNotFoundError) as e:
        write_file_atomic(target, b"key", mode=0o600)
    assert e.value.filename == str(target) and ".tmp-" not in str(e.value)


def test_version_directories_with_odd_digit_names_are_ignored(store: FileStore) -> None:
    (store.versions_dir / "\u00b2").mkdir()  # isdigit() says yes, int() says no
    assert store.load().version == 2
    with store.lock():
        pass


def test_a_private_key_readable_by_others_is_refused_on_load(store: FileStore) -> None:
    # commit() always writes keys 0600; a looser mode means the store was changed behind
    # TrustMesh's back, and loading it would use (and keep) an exposed key.
    path = store.load().path / ISSUER_KEY
    os.chmod(path, 0o640)
    with pytest.raises(StoreCorrupt, match=r"issuer\.key has mode 0640.*chmod 600"):
        store.load()
    os.chmod(path, 0o600)
    assert store.load().issuer is not None


def test_a_pending_issuer_key_is_dated_by_the_versions_that_hold_it(tmp_path: Path) -> None:
    """The age of an issuer CSR out for signing is that of its key: the creation time of the
    oldest version, in the run back from the current one, that holds the same key. An older
    version that cannot be read ends the run (a lower bound), and does not raise."""
    from datetime import timedelta

    from pki.rotation import request_issuer

    store = FileStore(tmp_path / "s")
    init_anchor(store, now=T0)
    assert store.pending_issuer_key_since() is None  # none pending
    made, _ = request_issuer(store, now=T0 + timedelta(hours=1))
    init_anchor(store, now=T0 + timedelta(hours=5), stage=True)  # a later version, same key
    assert store.pending_issuer_key_since() == T0 + timedelta(hours=1)
    (store.version_path(made.version) / "meta.json").write_text("{not json")
    assert store.pending_issuer_key_since() == T0 + timedelta(hours=5)
    request_issuer(store, now=T0 + timedelta(hours=6), new_key=True)
    assert store.pending_issuer_key_since() == T0 + timedelta(hours=6)
