"""``StoreLock``: one job at a time on a feature store."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from .._io import is_url, local_path, write_text_atomic
from ..exceptions import StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: local stores get the best-effort lease
    fcntl = None

__all__ = ["StoreLock"]

logger = logging.getLogger("swimdist.store")

#: How long a refused contender waits for the winner's record, to name it.
_OWNER_WAIT = 2.0


class StoreLock:
    """An exclusive lock on a feature store, held by one job at a time.

    Local paths: the lock is a kernel lock (``flock``) on ``<store>.lock.flock``, held
    open for the lock's lifetime. Exactly one of any number of contenders gets it, and the
    kernel releases it when its holder exits or dies, so a dead job never blocks the store.
    Beside it, ``<store>.lock`` is a small JSON record of the owner (pid, host, token and
    an expiry that a background thread renews), which names the owner in a refusal. A
    record of another host that has not expired also holds the store (a job on another
    machine of a shared filesystem, where kernel locks may not reach).

    fsspec URLs: a best-effort lease only (object stores have no compare-and-swap): the
    JSON record alone, renewed by its owner; a lapsed record (``ttl`` seconds without
    renewal) or one of a dead process on this host is taken over, and two jobs that start
    at the same moment may both get it.

    Parameters
    ----------
    url : str
        The store (local path or fsspec URL); the lock files go beside it.
    ttl : float
        Seconds the JSON record stays valid without renewal.

    Examples
    --------
    >>> with StoreLock("/data/features"):  # doctest: +SKIP
    ...     ...
    """

    def __init__(self, url: str, *, ttl: float = 60.0):
        self.url = str(url).rstrip("/")
        self.path = self.url + ".lock"
        self.ttl = ttl
        self.token = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._stop: threading.Event | None = None
        self._renewer: threading.Thread | None = None
        self._fd: int | None = None
        self._kernel = fcntl is not None and not is_url(self.url)

    # ----------------------------------------------------------------- the JSON record
    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.path if is_url(self.path) else local_path(self.path))

    def _read(self):
        fs, path = self._fs()
        try:
            with fs.open(path, "r") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}

    def _write(self) -> None:
        rec = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(),
               "expires": time.time() + self.ttl}
        write_text_atomic(self.path, json.dumps(rec))

    @staticmethod
    def _pid_alive(rec) -> bool:
        try:
            os.kill(int(rec.get("pid", -1)), 0)
        except PermissionError:
            return True  # exists, owned by another user
        except (OSError, ValueError, TypeError, OverflowError):
            return False
        return True

    def _held_by_other(self, rec) -> str | None:
        """The owner named by record ``rec`` if it still holds the store, else None."""
        if not isinstance(rec, dict) or not rec or rec.get("token") == self.token:
            return None
        if rec.get("host") == socket.gethostname():
            if self._kernel:
                return None  # this host's jobs hold the kernel lock, which is ours now
            if not self._pid_alive(rec):
                return None  # the owner process is gone: a stale lease
        expires = rec.get("expires", 0)
        if isinstance(expires, int | float) and expires > time.time():
            return f"pid {rec.get('pid')} on {rec.get('host')}"
        return None

    def _refuse(self, owner: str) -> StoreError:
        return StoreError(f"Feature store {self.url!r} is in use by another job ({owner}); "
                          "wait for it or use another store.")

    # ----------------------------------------------------------------- the kernel lock
    @property
    def _flock_path(self) -> str:
        return local_path(self.path) + ".flock"

    def _lock_kernel(self) -> bool:
        """Take the kernel lock; False if another process holds it."""
        path = self._flock_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            # The previous holder unlinks the file on release: if it did so between our open
            # and our flock, we locked a file nobody else will see; start over.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def _unlock_kernel(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:  # unlink while still holding it (see _lock_kernel), then let go
            if os.path.samestat(os.fstat(fd), os.stat(self._flock_path)):
                os.unlink(self._flock_path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def _current_owner(self) -> str:
        """The owner named by the record; waits briefly for a winner that has the kernel lock
        but has not written its record yet."""
        deadline = time.monotonic() + _OWNER_WAIT
        while True:
            rec = self._read()
            fresh = isinstance(rec, dict) and rec.get("pid") is not None and (
                rec.get("host") != socket.gethostname() or self._pid_alive(rec))
            if fresh or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        if not fresh:
            return "owner not recorded yet"
        return f"pid {rec.get('pid')} on {rec.get('host')}"

    # ----------------------------------------------------------------- public
    def acquire(self) -> StoreLock:
        """Take the lock.

        Returns
        -------
        StoreLock
            ``self``.

        Raises
        ------
        StoreError
            Another job holds the store; the message names it (pid and host).
        """
        if self._kernel:
            if not self._lock_kernel():
                raise self._refuse(self._current_owner())
            owner = self._held_by_other(self._read())
            if owner:
                self._unlock_kernel()
                raise self._refuse(owner)
        else:
            owner = self._held_by_other(self._read())
            if owner:
                raise self._refuse(owner)
        try:
            self._write()
        except BaseException:
            self._unlock_kernel()
            raise
        self._stop = threading.Event()

        def renew(stop=self._stop):
            while not stop.wait(self.ttl / 3):
                try:
                    self._write()
                except Exception:  # noqa: BLE001 - renewal is best effort
                    logger.warning("could not renew lock %s", self.path)

        self._renewer = threading.Thread(target=renew, daemon=True, name="swimdist-store-lock")
        self._renewer.start()
        return self

    def release(self) -> None:
        """Let go of the lock (removes the record if it is still this lock's)."""
        if self._stop is not None:
            self._stop.set()
            if self._renewer is not None and self._renewer is not threading.current_thread():
                self._renewer.join(timeout=max(self.ttl, 1.0))
            self._stop = self._renewer = None
        try:
            rec = self._read()
            if rec and rec.get("token") == self.token:
                fs, path = self._fs()
                try:
                    fs.rm(path)
                except FileNotFoundError:
                    pass
        finally:
            self._unlock_kernel()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
