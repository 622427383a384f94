"""Child-process supervision for ``trustmesh up``: start in order, wait for readiness, restart a
crashed child with backoff, and stop everything on Ctrl-C or SIGTERM.

Children run in their own session (a terminal's Ctrl-C reaches only the supervisor, which then
stops them in rounds, see :class:`ChildSpec`) and get ``PR_SET_PDEATHSIG`` so that none outlives a supervisor
that was killed outright. Each child's output goes to ``<log_dir>/<name>.log``.

The death signal is set by ``setpriv --pdeathsig`` (util-linux) exec'ing the child, not by a
``preexec_fn``: a ``preexec_fn`` makes subprocess use fork() instead of vfork(), which runs
grpc's fork handlers in the child, and in a process that has used grpc about one child in a
hundred then crashed (SIGSEGV or SIGABRT on a closed epoll descriptor) before its exec.
"""

from __future__ import annotations

import ctypes
import functools
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("trustmesh.up")

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the supervisor died before the death signal was set
        os._exit(143)


_SETPRIV = shutil.which("setpriv")
_SH = shutil.which("sh")
# Run by setpriv once the death signal is set: a supervisor that died before that (a SIGKILL
# right after the fork) would never send it, so the child checks that its parent is still the
# supervisor, else it exits; then it becomes the real command (same pid).
_PARENT_GUARD = 'test "$PPID" = "$1" || exit 143; shift; exec "$@"'


def _with_death_signal(argv: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """``argv`` made to receive SIGTERM when the supervisor dies: through setpriv (and a shell
    that checks the parent, see _PARENT_GUARD), else through a ``preexec_fn`` when grpc is not
    loaded here (see the module docstring), else not at all."""
    parent = os.getpid()
    if _SETPRIV is not None:
        guard = [_SH, "-c", _PARENT_GUARD, "sh", str(parent)] if _SH is not None else []
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *guard, *argv], None
    if "grpc" in sys.modules:
        return argv, None
    return argv, functools.partial(_die_with_parent, parent)


@dataclass(frozen=True, slots=True)
class ReadyCheck:
    """How to tell a child is ready: HTTP 200 on ``path`` at ``addr``, or a TCP accept."""

    addr: tuple[str, int]
    path: str | None = "/ready"

    def __call__(self) -> bool:
        try:
            if self.path is None:
                with socket.create_connection(self.addr, timeout=0.5):
                    return True
            conn = http.client.HTTPConnection(*self.addr, timeout=0.5)
            try:
                conn.request("GET", self.path)
                return conn.getresponse().status == 200
            finally:
                conn.close()
        except OSError:
            return False


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """One child. Stopping, children go in rounds by ``stop_order``, lowest first: a round is
    sent SIGTERM together and awaited before the next round is (so a proxy can drain before
    the application it forwards to goes). ``stop_timeout``: the seconds it has after SIGTERM
    before SIGKILL, when it needs longer than the supervisor's timeout (a drain grace)."""

    name: str
    argv: tuple[str, ...]
    ready: Callable[[], bool] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 30.0
    restart: bool = True
    stop_order: int = 0
    stop_timeout: float | None = None


class SupervisorError(RuntimeError):
    """A child could not be started or did not become ready."""


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen[bytes]
    restarts: int = 0  # in a row: reset once the child has run STABLE_AFTER seconds
    next_restart: float = 0.0
    started: float = 0.0  # monotonic time of the last spawn
    log_offset: int = 0  # size of its log file at the last spawn: later lines are this run's


def _status(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class Supervisor:
    """Owns a set of child processes for the lifetime of ``trustmesh up``."""

    MAX_RESTARTS = 5
    STABLE_AFTER = 60.0  # seconds a child must run for its next exit to count as a new one
    LOG_LINES = 5
    # A child's log beyond this is moved to <name>.log.1 (replacing the one before), so a mesh
    # left up for weeks, or a proxy logging a client's refused requests, cannot fill the disk.
    MAX_LOG_BYTES = 10 * 1024 * 1024
    LOG_CHECK_EVERY = 5.0  # seconds

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[_Child] = []
        self._stopping = False
        self._logs_checked = 0.0
        log_dir.mkdir(parents=True, exist_ok=True)

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def failure(self, child: _Child, when: str) -> str:
        """What to tell the operator about a child that exited: name, status, ``when``, and
        the last lines it wrote in this run (often the reason: 'cannot listen on ...')."""
        path = self.log_path(child.spec.name)
        status = "did not exit" if child.proc.returncode is None else _status(child.proc.returncode)
        try:
            with open(path, "rb") as f:
                f.seek(max(child.log_offset, f.seek(0, os.SEEK_END) - 16384))
                text = f.read().decode("utf-8", "replace")
        except OSError:
            text = ""
        lines = [line.rstrip() for line in text.splitlines() if line.strip()]
        tail = lines[-self.LOG_LINES :]
        if not tail:
            return f"{child.spec.name} {status} {when}; its log {path} is empty"
        shown = "\n".join(f"  | {line[:300]}" for line in tail)
        return f"{child.spec.name} {status} {when}; last lines of {path}:\n{shown}"

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        argv, preexec = _with_death_signal(list(spec.argv))
        out = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - child owns it
        try:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **spec.env},
                start_new_session=True,
                preexec_fn=preexec,  # only prctl(), and only without grpc loaded
            )
        finally:
            out.close()

    def rotate_logs(self, max_bytes: int | None = None) -> list[str]:
        """Rotate every child log over ``max_bytes`` (default MAX_LOG_BYTES) in place: its
        content is copied to ``<name>.log.1`` and the file truncated. The child keeps writing
        to the same file: it was opened for appending, so its next line goes to the new end
        (lines written between the copy and the truncation are lost). When the copy fails (a
        full disk), the log is emptied all the same, and that is said. Returns the names."""
        limit = self.MAX_LOG_BYTES if max_bytes is None else max_bytes
        rotated = []
        for child in self.children:
            path = self.log_path(child.spec.name)
            old = path.with_name(path.name + ".1")
            tmp = path.with_name(f".{path.name}.1.tmp")
            try:
                if path.stat().st_size <= limit:
                    continue
            except OSError:
                continue  # removed by hand: the child writes on to the unlinked file
            try:
                shutil.copyfile(path, tmp)
                os.replace(tmp, old)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                log.warning("cannot keep %s as %s (%s); emptying it all the same", path, old, e)
            try:
                os.truncate(path, 0)
            except OSError as e:
                log.warning("cannot empty %s: %s", path, e)
                continue
            child.log_offset = 0
            rotated.append(child.spec.name)
        return rotated

    def _log_size(self, name: str) -> int:
        try:
            return self.log_path(name).stat().st_size
        except OSError:
            return 0

    def launch(self, spec: ChildSpec) -> _Child:
        """Start ``spec`` without waiting for it (its ``ready`` check is the caller's)."""
        offset = self._log_size(spec.name)
        proc = self._spawn(spec)
        child = _Child(spec, proc, started=time.monotonic(), log_offset=offset)
        self.children.append(child)
        log.info("started %s (pid %d)", spec.name, proc.pid)
        return child

    def start(self, spec: ChildSpec) -> None:
        """Start ``spec`` and wait until it is ready (or raise, naming its log file)."""
        child = self.launch(spec)
        proc = child.proc
        if spec.ready is None:
            return
        deadline = time.monotonic() + spec.ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SupervisorError(self.failure(child, "while starting"))
            if spec.ready():
                log.info("%s is ready", spec.name)
                return
            time.sleep(0.05)
        raise SupervisorError(
            self.failure(child, f"and was not ready within {spec.ready_timeout:.0f}s")
        )

    def poll(self, now: float | None = None) -> list[str]:
        """Restart children that exited (with backoff); return the names restarted.

        Raises SupervisorError (naming the child, with its last log lines) when a child exits
        again after MAX_RESTARTS restarts in a row: a crash loop is not left to run on silently
        with a piece of the mesh missing.
        """
        if self._stopping:
            return []
        now = time.monotonic() if now is None else now
        if now - self._logs_checked >= self.LOG_CHECK_EVERY:
            self._logs_checked = now
            self.rotate_logs()
        restarted = []
        for child in self.children:
            if child.proc.poll() is None or not child.spec.restart:
                continue
            if child.next_restart == 0.0:
                if now - child.started >= self.STABLE_AFTER:
                    child.restarts = 0  # it had been running well: not a crash loop
                if child.restarts >= self.MAX_RESTARTS:
                    raise SupervisorError(
                        self.failure(
                            child, f"after {child.restarts} restarts in a row; giving up on it"
                        )
                    )
                delay = min(10.0, 0.5 * 2**child.restarts)
                child.next_restart = now + delay
                log.warning(
                    "%s %s; restarting in %.1fs (log: %s)",
                    child.spec.name,
                    _status(child.proc.returncode),
                    delay,
                    self.log_path(child.spec.name),
                )
                continue
            if now >= child.next_restart:
                child.log_offset = self._log_size(child.spec.name)
                child.proc = self._spawn(child.spec)
                child.started = now
                child.restarts += 1
                child.next_restart = 0.0
                restarted.append(child.spec.name)
        return restarted

    def child(self, name: str) -> _Child | None:
        return next((c for c in self.children if c.spec.name == name), None)

    def remove(self, names: Collection[str], timeout: float = 5.0) -> None:
        """Stop the children named (as :meth:`stop` does) and supervise them no more."""
        leaving = [c for c in self.children if c.spec.name in names]
        self.children = [c for c in self.children if c.spec.name not in names]
        self._terminate(leaving, timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM every child, round by round (``ChildSpec.stop_order``; in reverse start
        order within a round), and SIGKILL what is left of a round after its timeout."""
        self._stopping = True
        self._terminate(self.children, timeout)

    def _terminate(self, children: list[_Child], timeout: float) -> None:
        for order in sorted({c.spec.stop_order for c in children}):
            round_ = [c for c in reversed(children) if c.spec.stop_order == order]
            for child in round_:
                if child.proc.poll() is None:
                    child.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            for child in round_:
                allowed = max(timeout, child.spec.stop_timeout or 0.0)
                remaining = max(0.0, started + allowed - time.monotonic())
                try:
                    child.proc.wait(remaining)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0fs; killing it", child.spec.name, allowed)
                    child.proc.kill()
                    child.proc.wait()

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def python_module(module: str, *args: str) -> tuple[str, ...]:
    """argv running ``python -m module args`` with this interpreter."""
    return (sys.executable, "-m", module, *args)


def trustmesh_argv(*args: str) -> tuple[str, ...]:
    return python_module("trustmesh", *args)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports on ``host`` (bound together, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class StopSignals:
    """SIGINT and SIGTERM for the whole life of ``trustmesh up`` (a context manager).

    During start-up (``interrupting``) the first signal raises KeyboardInterrupt, so that a
    blocking start is abandoned; after it, signals are only recorded, for the run loop to end
    on, and so that a second Ctrl-C cannot cut the orderly stop short. One handler covers
    every phase: swapping handlers between phases left moments where SIGTERM had its default
    action and killed ``up`` without its stop and summary.
    """

    def __init__(self) -> None:
        self.received: list[int] = []
        self.interrupting = True
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if self.interrupting:
            self.interrupting = False  # once: what follows is the stop
            raise KeyboardInterrupt

    def __enter__(self) -> StopSignals:
        self._previous = {
            s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)
        }
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


def wait_for_signal(
    stop: Callable[[], bool], supervisor: Supervisor, signals: StopSignals, tick: float = 0.2
) -> None:
    """Block until ``signals`` got SIGINT/SIGTERM or ``stop()`` says so, polling children."""
    signals.interrupting = False
    while not signals.received and not stop():
        supervisor.poll()
        time.sleep(tick)
