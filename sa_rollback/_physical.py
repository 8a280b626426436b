"""The real connection of one database, shared by every logical connection on it.

It holds the outer transaction and the stack of savepoints on it. Each rollback
scope that touches the database gets a *frame* on it: the whole transaction for
the outermost scope, a savepoint for a nested one. When a scope ends, its frame
is rolled back; if it wrote, ``SET CONSTRAINTS ALL IMMEDIATE`` runs first, in
the same round trip, so that a deferred constraint fails the scope as it would
fail the COMMIT. A connection that died fails the statements and scopes that
used it, and is replaced once they have ended.

Undo points and abort recovery are :mod:`._logical`'s business; this module
runs what it is asked to and keeps the stack in step. It reaches the scopes
through :class:`ScopeSource` (the process-wide state, never imported here).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Protocol

from . import _sequences as sequences
from ._drivers import IDLE, INERROR, DatabaseKey, Driver
from ._history import Frame, Savepoint, SavepointStack, ScopeLike, fresh
from ._lock import SharedLock
from ._rollback import rollback_frame
from ._stats import STATS
from .errors import (
    ConfigurationError,
    ConnectionLostError,
    DeferredConstraintError,
    LockTimeoutError,
    SaRollbackError,
    StaleConnectionError,
    TransactionEscapeError,
    UnsupportedOperationError,
    caller_location,
)

#: how long close_frame waits for a statement it cancelled to give the connection back
_CANCEL_GRACE = 5.0


class ScopeSource(Protocol):
    """Where a physical connection learns which scope is open, and reports what it cannot raise."""

    @property
    def top(self) -> Optional[ScopeLike]: ...

    @property
    def lock_timeout(self) -> float: ...

    def report(self, error: Optional[SaRollbackError]) -> None: ...


class Owner(Protocol):
    """What the physical side needs of a logical connection: the notifications it sends."""

    def describe(self) -> str: ...

    def failed(self) -> None: ...

    def clear_abort(self) -> None: ...

    def recover(self) -> None: ...

    def savepoint_lost(self, sp: Savepoint) -> None: ...

    def frame_closed(self, frame: Frame) -> None: ...


class Physical:
    """The real connection of one database, shared by every logical connection on it."""

    def __init__(self, key: DatabaseKey, driver: Driver, conn: Any, record: Any, scopes: ScopeSource) -> None:
        self.key = key
        self.slot: Any = key  # where the state keeps it: key, or (key, event loop) for async drivers
        self.driver = driver
        self.conn = conn
        self._record = record
        self.scopes = scopes
        self.lock = SharedLock(f"the connection to {key.describe()}", scopes.report, driver.new_lock())
        self.stack = SavepointStack()
        self.frames: list[Frame] = []
        #: number of the latest write
        self.seq = 0
        self._ids = 0
        #: the logical connection whose failed statement aborted the transaction
        self.aborted_by: Optional[Owner] = None
        #: the connection died, or its state is unknown: never use it again
        self.broken = False
        self.lost: Optional[BaseException] = None
        #: open cursor.stream() / cursor.copy() blocks, which keep the driver busy
        self.streaming = 0
        #: some open frame ran DDL (``Frame.schema``): read at every frame's close, which is why it is kept
        self.schema_changed = False
        STATS.opened(self, key.dbname)

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    @property
    def backend_pid(self) -> int:
        """The server process of this connection (``pg_terminate_backend`` takes it)."""
        return self.driver.backend_pid(self.conn)

    # -- the lock -------------------------------------------------------------

    def timeout(self) -> float:
        """The innermost open scope's lock timeout, or the default."""
        top = self.scopes.top
        return self.scopes.lock_timeout if top is None else top.lock_timeout

    def acquire(self, waiting_for: str = "to run a statement") -> None:
        """Take the lock, or raise :class:`LockTimeoutError` after the scope's lock timeout."""
        self.lock.acquire(self.timeout(), waiting_for)

    def release(self) -> None:
        self.lock.release()

    @contextmanager
    def held(self, logical: Owner) -> Iterator[None]:
        """Hold the connection for a block that keeps the driver busy between calls."""
        self.acquire("for a cursor.stream() or copy() block")
        self.streaming += 1
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException:
            logical.failed()
            raise
        finally:
            self.streaming -= 1
            self.lock.release()

    def busy_error(self, actor: Owner) -> UnsupportedOperationError:
        return UnsupportedOperationError.busy(actor.describe(), caller_location())

    # -- health ---------------------------------------------------------------

    def mark_lost(self, exc: Optional[BaseException]) -> None:
        self.broken = True
        if self.lost is None:
            self.lost = exc

    def alive(self) -> bool:
        if self.broken:
            return False
        try:
            if not self.driver.closed(self.conn):
                return True
        except Exception:
            pass
        self.mark_lost(None)
        return False

    def usable(self) -> bool:
        """May a checkout join this connection? Between scopes, also check that the server kept it."""
        if self.frames:
            # Scopes depend on it. If it died, their statements must fail
            # rather than go on in a new transaction without what they wrote.
            return True
        if self.broken:
            return False
        if not self.lock.try_acquire():
            return True  # another thread is opening a scope on it
        try:
            if self.driver.dead(self.conn):
                self.mark_lost(None)
                return False
            return True
        finally:
            self.lock.release()

    def lost_error(self) -> ConnectionLostError:
        return ConnectionLostError.of(self.key.describe(), self.lost)

    def _check_driver_free(self) -> None:
        # Only the thread inside a stream()/copy() block gets here while it is
        # open (it holds the lock), and psycopg would wait for it forever.
        if self.streaming:
            raise UnsupportedOperationError(
                f"The connection to {self.key.describe()} is inside a cursor.stream() or copy() block of "
                "this thread; finish it before committing, rolling back or taking savepoints on another "
                "connection."
            )

    def execute(self, sql: str) -> None:
        """Run control statements of sa_rollback's own (no results) in one round trip."""
        self._check_driver_free()
        self.driver.execute(self.conn, sql)

    def fetch(self, sql: str) -> list[tuple[Any, ...]]:
        """Like :meth:`execute`; the rows of the last statement."""
        self._check_driver_free()
        return self.driver.fetch(self.conn, sql)

    def _rollback_all(self) -> None:
        self._check_driver_free()
        self.driver.restart(self.conn)

    # -- frames ---------------------------------------------------------------

    def current_frame(self, scope: Optional[ScopeLike]) -> Frame:
        frames = self.frames
        if frames and frames[-1].scope is scope:
            return frames[-1]
        if scope is None:
            raise StaleConnectionError.used_after_scope(self.key.describe(), caller_location())
        if frames and not frames[-1].scope.is_open:
            self._drop_stale_frames()
            if frames and frames[-1].scope is scope:
                return frames[-1]
        return self._open_frame(scope)

    def _drop_stale_frames(self) -> None:
        """Roll back frames of scopes that ended without closing them (an interrupted teardown)."""
        frames = self.frames
        k = len(frames)
        while k and not frames[k - 1].scope.is_open:
            k -= 1
        dropped = frames[k:]
        del frames[k:]
        self._rollback_frame(dropped[0], check=False)
        self.aborted_by = None
        self._close_frames(dropped)

    @staticmethod
    def _close_frames(dropped: list[Frame]) -> None:
        for frame in reversed(dropped):
            for logical in list(frame.logicals):
                logical.frame_closed(frame)

    def _open_frame(self, scope: ScopeLike) -> Frame:
        reset = scope.reset_sequences and scope.may_reset_sequences(self.key.dbname)
        if scope.reset_sequences and not reset and scope.refuse_other_sequences:
            raise ConfigurationError(
                f"{scope.label}: reset_sequences is on, but {self.key.describe()} is not a database "
                "sa_rollback created for this run. Putting its sequences back could hand out again "
                "values that another process already holds, so sa_rollback does not touch them. Run "
                "the tests on a clone (--sa-schema, for example 'existing'), or turn reset_sequences "
                "off for this test."
            )
        if reset and self.driver.per_loop:
            raise ConfigurationError(
                f"{scope.label}: reset_sequences is on, but {self.key.describe()} is reached through "
                "asyncpg, whose sequences sa_rollback cannot put back yet. Use psycopg's async engine "
                "(postgresql+psycopg://) for this test, or turn reset_sequences off for it."
            )
        nested = bool(self.frames)
        if nested:
            base = self.push_savepoint(None)
        else:
            if self.driver.status(self.conn) != IDLE:
                # Left over from a scope whose rollback failed half way.
                self.driver.rollback(self.conn)
            base = Savepoint(None, self.seq, fresh(self.seq))
        # Rolling back to a frame's base restores the frame's empty history.
        base.marks = fresh(self.seq)
        base.is_base = True
        frame = Frame(scope, base)
        if reset:
            self._check_driver_free()
            frame.reset_sql, frame.reset_fp = sequences.reference(
                self.driver.name, self.conn, self.key.db, self.key.user, not nested
            )
        else:
            sequences.forget(self.key.db)
            if not nested:
                self.driver.begin_outer(self.conn)
        self.frames.append(frame)
        scope.touched(self)
        return frame

    def _frame_index(self, scope: ScopeLike) -> Optional[int]:
        return next((i for i, f in enumerate(self.frames) if f.scope is scope), None)

    def close_frame(self, scope: ScopeLike) -> None:
        """Undo everything the scope's frame did. Called when the scope exits.

        Raises :class:`DeferredConstraintError` when the frame's writes violate
        a deferred constraint (and still rolls back), :class:`ConnectionLostError`
        when the connection died, and :class:`LockTimeoutError` when another
        thread kept the connection busy past the scope's ``lock_timeout``; then
        its statement is cancelled, or, if that does not free the connection,
        the connection is given up.
        """
        late: Optional[LockTimeoutError] = None
        lock = self.lock
        wait = lock.wait_for(scope.lock_timeout)
        if not lock.raw.acquire(True, wait):
            late = lock.timeout_error(wait, f"to roll back {scope.label!r}", report=False)
            try:
                self.driver.cancel(self.conn)
            except Exception:
                pass
            if not lock.raw.acquire(True, _CANCEL_GRACE):
                # Nothing frees it: give it up. The stuck thread keeps the
                # connection object; the next scope gets a new one.
                self.mark_lost(late)
                self._forget_frames(scope)
                raise late
        lock.stuck = None
        try:
            index = self._frame_index(scope)
            if index is None:
                return
            dropped = self.frames[index:]
            try:
                if not self.alive():
                    raise self.lost_error()
                try:
                    check = scope.check_deferred
                    if self.aborted_by is not None:
                        # A failed statement must not hide the others' violations.
                        self.aborted_by.clear_abort()
                    if self.driver.status(self.conn) == INERROR:
                        check = False
                    self._rollback_frame(dropped[0], check=check and dropped[0].wrote)
                except DeferredConstraintError:
                    raise
                except BaseException as exc:
                    if self.alive():
                        # Unknown state: safer to start over on a new connection.
                        self.mark_lost(exc)
                        raise
                    raise self.lost_error() from exc
            finally:
                del self.frames[index:]
                if self.broken:
                    self.stack.clear()
                elif self.schema_changed and any(frame.schema for frame in dropped):
                    # What the driver prepared since may refer to the schema the rollback undid.
                    self.schema_changed = any(frame.schema for frame in self.frames)
                    self.driver.schema_undone(self.conn)
                self.aborted_by = None
                self._close_frames(dropped)
        finally:
            lock.release()
        if late is not None:
            raise late

    def _forget_frames(self, scope: ScopeLike) -> None:
        index = self._frame_index(scope)
        if index is None:
            return
        dropped = self.frames[index:]
        del self.frames[index:]
        self._close_frames(dropped)

    def _rollback_frame(self, frame: Frame, check: bool) -> None:
        """Roll back to the frame's base, in one round trip (see :mod:`._rollback`)."""
        rollback_frame(self, frame, check)

    # -- savepoints -----------------------------------------------------------

    def push_savepoint(
        self, owner: Optional[Owner], txn: Optional[int] = None, before: Optional[int] = None
    ) -> Savepoint:
        """Take a new savepoint, releasing the releasable ones on top in the same round trip.

        ``txn`` and ``before``: the owner's transaction and its latest write before this point.
        """
        stack = self.stack
        floor = 0
        if self.frames:
            base = self.frames[-1].base
            if not base.is_start:
                floor = base.index + 1
        cut = len(stack)
        while cut > floor and stack[cut - 1].releasable:
            cut -= 1
        name = f"sar_{self.next_id()}"
        if cut < len(stack):
            sql = f"RELEASE SAVEPOINT {stack[cut].name}; SAVEPOINT {name}"
        else:
            sql = f"SAVEPOINT {name}"
        self.execute(sql)
        STATS.savepoints += 1
        stack.cut(cut)
        marks = self.frames[-1].marks() if self.frames else fresh(self.seq)
        sp = Savepoint(name, self.seq, marks, owner, txn, before)
        stack.push(sp)
        return sp

    def top_point(self) -> Savepoint:
        """The newest valid point of the current frame: the top savepoint, or the frame's base."""
        return self.stack[-1] if self.stack else self.frames[-1].base

    def rollback_to(self, target: Savepoint, actor: Owner) -> None:
        """Roll the physical transaction back to ``target`` on behalf of ``actor``.

        Savepoints above the target disappear. The callers make sure that no
        other transaction wrote above it, so other connections' open
        savepoints there hold nothing: they are taken again, in the same round
        trip, standing for the state at ``target``. Other connections' undo
        points there are dropped; they take new ones when they next run.
        """
        stack = self.stack
        start = stack.above(target)
        above = list(stack.items[start:])
        kept = [sp for sp in above if sp.user_live and sp.owner is not None and sp.owner is not actor]
        retake = "; ".join(f"SAVEPOINT {sp.name}" for sp in kept)
        if target.is_start:
            self._rollback_all()
            if retake:
                self.execute(retake)
        else:
            self.execute(f"ROLLBACK TO SAVEPOINT {target.name}" + (f"; {retake}" if retake else ""))
        stack.cut(start)
        for sp in kept:
            # Taken again, they stand for the state at the target. One may
            # also be its owner's undo point: it stays pinned.
            sp.seq = target.seq
            sp.marks = target.marks
            stack.push(sp)
        for sp in above:
            owner = sp.owner
            if owner is not None and not any(sp is k for k in kept):
                owner.savepoint_lost(sp)
        if self.frames:
            self.frames[-1].restore(target.marks)
        self.aborted_by = None

    def escaped(self, sql: str, actor: Owner) -> TransactionEscapeError:
        """The transaction ended behind our back: resynchronize and describe the damage."""
        try:
            # psycopg2 still believes it is in a transaction and would run the
            # next statements in autocommit mode; a rollback resets that.
            self.driver.rollback(self.conn)
        except Exception as exc:
            self.mark_lost(exc)
        frames = self.frames
        self.frames = []
        self.stack.clear()
        self.aborted_by = None
        for frame in frames:
            for logical in list(frame.logicals):
                logical.frame_closed(frame)
        return TransactionEscapeError(
            f"The statement {sql[:200]!r} on {actor.describe()} ended the test's transaction on "
            f"{self.key.describe()} ({caller_location()}). Anything written before it in this test was "
            "committed for real and is NOT rolled back; clean it up by hand. Use session.commit() or "
            "connection.commit() instead of textual COMMIT/ROLLBACK in multi-statement strings."
        )

    def close(self) -> None:
        """Close the real connection (end of the run, or when it died)."""
        STATS.closed(self)
        try:
            self._record.close()
        except Exception:
            pass
