"""The lock of a shared physical connection: one statement at a time, a bounded wait, a clear error.

Threads of a test share one physical connection per database. Its lock is held
for each statement, and for the whole life of a psycopg ``cursor.stream()`` or
``cursor.copy()`` block, which hold the driver's own lock that long. Waiting
for it is bounded; the error names the thread that holds it and shows where
both were. A holder found stuck once is not waited for again in full: the
other threads give up after a short grace.

The statement path takes ``raw`` directly (a C call); everything else goes
through the methods.
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from typing import Any, Callable, Optional

from .errors import LockTimeoutError

#: how long to wait for a holder already found stuck (it may just be finishing)
STUCK_GRACE = 0.05
_OWNER = re.compile(r"owner=(\d+)")


def _stack_of(ident: Optional[int], limit: int = 12) -> str:
    frame = sys._current_frames().get(ident) if ident is not None else None  # noqa: SLF001  (stdlib)
    if frame is None:
        return "    (its stack is not available)\n"
    return "".join(traceback.format_stack(frame)[-limit:])


def _thread_name(ident: Optional[int]) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return f"thread {ident}" if ident is not None else "another thread"


class SharedLock:
    """A re-entrant lock that knows who held it too long."""

    __slots__ = ("describe", "raw", "report", "stuck")

    def __init__(self, describe: str, report: Callable[[LockTimeoutError], None], raw: Any = None) -> None:
        #: a threading.RLock, or a task-aware lock for async connections (``_aio.TaskLock``)
        self.raw = threading.RLock() if raw is None else raw
        #: what the lock guards, for messages ("the connection to db on host:port ...")
        self.describe = describe
        #: where an error goes that a worker thread would leave unnoticed
        self.report = report
        #: the thread found holding the lock too long, until someone gets it again
        self.stuck: Optional[int] = None

    def wait_for(self, timeout: float) -> float:
        """How long to wait: not again in full for a holder already found stuck."""
        return timeout if self.stuck is None else min(timeout, STUCK_GRACE)

    def acquire(self, timeout: float, waiting_for: str) -> None:
        """Take the lock, or raise :class:`LockTimeoutError` after ``timeout`` seconds."""
        wait = self.wait_for(timeout)
        if not self.raw.acquire(True, wait):
            raise self.timeout_error(wait, waiting_for)
        self.stuck = None

    def try_acquire(self) -> bool:
        return self.raw.acquire(False)

    def release(self) -> None:
        self.raw.release()

    def timeout_error(self, timeout: float, waiting_for: str, report: bool = True) -> LockTimeoutError:
        holder_of = getattr(self.raw, "holder", None)
        if holder_of is not None:
            return self._task_timeout_error(timeout, waiting_for, holder_of(), report)
        me = threading.current_thread()
        here = "".join(traceback.format_stack(sys._getframe(1))[-12:])  # noqa: SLF001  (stdlib)
        # The RLock knows its owner but only says so in its repr.
        found = _OWNER.search(repr(self.raw))
        owner = int(found.group(1)) if found and found.group(1) != "0" else None
        holder = _thread_name(owner)
        again = self.stuck is not None and self.stuck == owner
        self.stuck = owner if owner is not None else -1
        waited = (
            f"did not wait again, since thread {holder!r} was already found stuck" if again else f"waited {timeout:g} s"
        )
        error = LockTimeoutError(
            f"Thread {me.name!r} {waited} for {self.describe} "
            f"{waiting_for}, and thread {holder!r} held it all that time. Every connection of a test "
            "shares one physical connection per database, which runs one statement at a time; the "
            f"statement of {holder!r} (or its open cursor.stream()/copy() block) did not end, most likely "
            "because it waits for something only another thread of the test can do: a lock held by a "
            "connection outside the test's transaction, a join, a queue. Let that thread finish before "
            "waiting for it, or raise RollbackScope(lock_timeout=...) if its statement is merely slow.\n\n"
            f"Thread {holder!r} was here:\n{_stack_of(owner)}\n"
            f"Thread {me.name!r} waited here:\n{here}"
        )
        if report and not again:
            self.report(error)
        return error

    def _task_timeout_error(self, timeout: float, waiting_for: str, holder: str, report: bool) -> LockTimeoutError:
        error = LockTimeoutError(
            f"Waited {timeout:g} s for {self.describe} {waiting_for}; it is held by {holder}. The tasks of "
            "a test share one connection per database and event loop, which runs one statement at a "
            "time; the holder's statement did not end, most likely because it waits for something only "
            "another task can do (a lock held outside the test's transaction, an event, a queue). Let "
            "that task finish first, or raise the lock timeout (--sa-lock-timeout) if it is merely slow."
        )
        if report:
            self.report(error)
        return error
