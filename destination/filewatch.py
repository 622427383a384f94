"""Noticing that a file changed: inotify on Linux (immediate), stat polling as a safety net.

The destination service applies mesh-file changes within milliseconds because inotify wakes it
on the write itself; polling every ``poll_interval`` still catches changes inotify cannot see
(network filesystems, a watch that could not be set up). The parent directory is watched, so
atomic replaces (``os.replace``, Kubernetes ConfigMap symlink flips) are seen too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)

# <sys/inotify.h>
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
_EVENT = struct.Struct("iIII")
# IN_MODIFY is left out on purpose: it fires mid-write; IN_CLOSE_WRITE follows the last byte.
_MASK = IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE | IN_ATTRIB


class _Inotify:
    """A non-blocking inotify descriptor watching one directory (None when unavailable)."""

    def __init__(self, directory: Path) -> None:
        self.fd = -1
        name = ctypes.util.find_library("c")
        if name is None:
            return
        libc = ctypes.CDLL(name, use_errno=True)
        if not hasattr(libc, "inotify_init1"):
            return
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            return
        if libc.inotify_add_watch(fd, os.fsencode(directory), _MASK) < 0:
            os.close(fd)
            return
        self.fd = fd

    def drain(self) -> set[str]:
        """Names of the entries that changed since the last call."""
        names: set[str] = set()
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset + _EVENT.size <= len(buf):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(buf, offset)
                raw = buf[offset + _EVENT.size : offset + _EVENT.size + length]
                names.add(raw.rstrip(b"\0").decode(errors="replace"))
                offset += _EVENT.size + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()  # follows symlinks: a flipped ConfigMap link changes the inode
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


async def watch_file(
    path: Path, stop: asyncio.Event, *, poll_interval: float = 1.0
) -> AsyncIterator[None]:
    """Yield whenever ``path`` may have changed, until ``stop`` is set."""
    path = Path(path)
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    notify = _Inotify(path.parent)
    if notify.fd >= 0:

        def on_readable() -> None:
            # Only our file, or Kubernetes' ``..data`` symlink flip; ignore editors' temp files.
            if any(n == path.name or n.startswith("..") for n in notify.drain()):
                wake.set()

        loop.add_reader(notify.fd, on_readable)
    else:
        log.warning("inotify unavailable; polling %s every %.1fs", path, poll_interval)
    last = _fingerprint(path)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            waiter = asyncio.ensure_future(wake.wait())
            await asyncio.wait(
                {waiter, stopper}, timeout=poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            if stop.is_set():
                return
            current = _fingerprint(path)
            if wake.is_set() or current != last:
                wake.clear()
                last = current
                yield None
    finally:
        stopper.cancel()
        if notify.fd >= 0:
            with contextlib.suppress(Exception):
                loop.remove_reader(notify.fd)
        notify.close()
