"""One run per workdir: `WorkdirLock`, held by a training run from start to exit.

The lock is `<workdir>/run.lock`, locked with `flock` and holding JSON about its holder (host, pid, start
time, command). The kernel drops a `flock` when its process dies, so a run killed with SIGKILL leaves a file
that nobody holds: the next run takes it over and says whose it was. A held lock makes a second run fail at
once with the holder named. Invariant: while a run holds the lock, `run.lock` names it and no other process
can lock the file; the file is removed on every exit the interpreter sees.

Guarantees by filesystem: local filesystems and NFS (Linux turns `flock` on NFS into byte-range locks that
the server arbitrates; a crashed client's lock is freed when the server's lease expires) detect runs on
any host. A filesystem without locks (`flock` fails with ENOLCK/ENOSYS/EOPNOTSUPP, e.g. Lustre mounted
without `-o flock`) falls back to the file's content: a holder on this host is checked by pid, and a lock
written on another host is refused until it is deleted by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import BinaryIO

LOCK_NAME = "run.lock"
# EX_TEMPFAIL (sysexits.h): "temporary failure; the user is invited to retry" -- run the same command again.
PREEMPTED_EXIT_STATUS = 75
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)


class StartupSignals:
    """SIGTERM/SIGINT received before training installs its own handlers (`checkpointing.PreemptionWatcher`,
    or JAX's notifier with several processes): remembered, so that start-up stops at its next check with
    the preempted status instead of dying with 143 or losing the signal."""

    received: str | None = None

    @classmethod
    def install(cls) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        cls.received = signal.Signals(signum).name


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names it."""


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (/proc), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # Exists, owned by someone else.
        pass
    return start is None or _process_start(pid) in (None, start)


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock."""

    host: str
    pid: int
    started: str
    command: str
    process_start: str | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            command=" ".join([os.path.basename(sys.executable), *getattr(sys, "orig_argv", sys.argv)[1:]]),
            process_start=_process_start(os.getpid()),
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            fields = json.loads(text)
            return cls(**{f.name: fields.get(f.name) for f in dataclasses.fields(cls)})
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}: {self.command}"


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode(errors="replace")


class WorkdirLock:
    """Context manager: holds `<workdir>/run.lock` for one run (see the module docstring)."""

    def __init__(self, workdir: str, log=print):
        self.path = os.path.join(workdir, LOCK_NAME)
        self.log = log
        self._fd: int | None = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _refuse(self, holder: Holder | None, why: str = "") -> WorkdirLockedError:
        who = holder.describe() if holder else "a run whose details are not readable yet"
        return WorkdirLockedError(
            f"workdir {os.path.dirname(self.path)} is in use by another run ({who}){why}; wait for it to "
            "finish, stop it, or use another --workdir"
        )

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirLockedError naming its holder."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = Holder.parse(_read(fd))
                os.close(fd)
                raise self._refuse(holder) from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                self._check_without_locks(fd)
            try:  # The holder we raced with may have removed the file after we opened it: start again.
                same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same_file = False
            if same_file:
                break
            os.close(fd)
        previous = Holder.parse(_read(fd))
        if previous is not None:
            self.log(
                f"taking over {self.path}: the run that held it ended without releasing it "
                f"({previous.describe()})"
            )
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dataclasses.asdict(Holder.this_process())).encode(), 0)
            os.fsync(fd)
        except OSError:  # A full or read-only disk: leave nothing behind.
            self.release()
            raise

    def _check_without_locks(self, fd: int) -> None:
        """On a filesystem without locks: refuses unless the recorded holder is known to be dead."""
        holder = Holder.parse(_read(fd))
        if holder is None:
            return
        if holder.host != socket.gethostname():
            os.close(fd)
            raise self._refuse(
                holder,
                f" (this filesystem does not support locks, so whether that run is alive cannot be checked "
                f"from here: if it is not, delete {self.path})",
            )
        if holder.pid != os.getpid() and _alive(holder.pid, holder.process_start):
            os.close(fd)
            raise self._refuse(holder)

    def release(self) -> None:
        """Removes the file, then unlocks it (in this order, so that no waiter locks a removed file)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


class Closing:
    """Context-manager mixin for an object with `close()`: closed on exit; when the block already failed, a
    `close()` that fails too (a full disk) does not replace that first error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:
            pass


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> str:
    """Calls `write` on a new file that replaces `path` only once complete; returns `path`.

    Readers see the old file or the whole new one; a failed write (a full disk) leaves no file behind
    and raises the OSError with `path` as its filename.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the user's group.
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# Errors of the machine rather than of the program: reported as one line, never as a traceback.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free space there or use another --workdir",
    errno.EDQUOT: "the disk quota is exceeded: free space or use another --workdir",
    errno.EACCES: "make it writable for this user or use another --workdir",
    errno.EPERM: "make it writable for this user or use another --workdir",
    errno.EROFS: "the filesystem is read-only: use another --workdir",
}


def environment_error(e: BaseException) -> str | None:
    """One line for a full, read-only or forbidden filesystem (`e` or its cause); None for other errors."""
    found = []  # The chain from the last error raised to the first.
    while e is not None:
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            found.append(e)
        e = e.__cause__ or e.__context__
    named = [e for e in found if e.filename] or found
    if not named:
        return None
    first = named[-1]  # The first failure, not a later one it caused while the run was closing.
    where = f" {first.filename}" if first.filename else ""
    return f"cannot write{where}: {first.strerror}; {ENVIRONMENT_ERRNOS[first.errno]}"


def recorded_holder(workdir: str) -> Holder | None:
    """The holder recorded in `workdir`'s lock file, if any (it may be stale)."""
    try:
        with open(os.path.join(workdir, LOCK_NAME)) as f:
            return Holder.parse(f.read())
    except OSError:
        return None


@contextlib.contextmanager
def run_lock(workdir: str, log=print):
    """The workdir's lock for one (possibly multi-process) run: process 0 holds it.

    With several processes, all learn from process 0 whether it got the lock, so that every process of a
    second job on a held workdir stops at once with the same reason.
    """
    import jax

    lock, error = None, None
    if jax.process_index() == 0:
        lock = WorkdirLock(workdir, log)
        try:
            lock.acquire()
        except Exception as e:  # Told to the other processes before it is raised here.
            error = e
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        locked = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not locked and error is None:
            holder = recorded_holder(workdir)
            who = f" (held by {holder.describe()})" if holder else ""
            error = WorkdirLockedError(
                f"process 0 could not lock workdir {workdir}{who}; see process 0's message"
            )
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
