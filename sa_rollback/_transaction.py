"""Transaction semantics: many logical connections on one physical transaction.

A :class:`Physical` is one real DBAPI connection per database. While a rollback
scope is active, every pool checkout on that database becomes a
:class:`Logical`, whose commit and rollback act on savepoints of the shared
physical transaction. The rules that keep production semantics:

1. Before a statement runs on logical connection L, L holds an *undo point*
   taken after the latest write of any other transaction (another connection's,
   or L's own already committed one). Usually that is the start of the scope
   itself, which costs nothing; a real ``SAVEPOINT`` is taken only when someone
   else wrote since.
2. Rollback of L (or to a savepoint of L) undoes L's writes by rolling back to
   an undo point taken before them and after every other transaction's write,
   unless another transaction's write came after one of L's. Then one
   transaction cannot reproduce production, and
   :class:`InterleavedRollbackError` is raised; nothing is undone.
3. A rollback of L without writes does nothing. A statement of L that fails
   aborts the shared transaction; the next statement of another connection (or
   L's own rollback) repairs it by rolling back what L wrote since its
   innermost savepoint, which L loses whichever way it goes on. What L wrote
   before another transaction's write stays until L rolls back (rule 2). L's
   statements fail until it rolls back, as in production.
4. Commit of L costs no round trip. Its savepoints become releasable, and are
   released together with the next ``SAVEPOINT`` statement (one round trip), so
   the savepoint stack stays short.
5. User savepoints (``begin_nested()``) are renamed per logical connection, so
   that two sessions' ``sa_savepoint_1`` never collide. ``RELEASE`` is deferred
   the same way as commits.

Writes are numbered by ``Physical.seq``. A savepoint remembers the number of
the latest write before it, and each frame remembers which transaction wrote
last and the latest write of anyone else, which answers "did another
transaction write after X?" in constant time.

When a scope ends, its frame is rolled back; if it wrote, ``SET CONSTRAINTS
ALL IMMEDIATE`` runs first, in the same round trip, so that a deferred
constraint fails the scope as it would fail the COMMIT. A physical connection
that died fails the statements and scopes that used it, and is replaced once
they have ended.

Threads share the physical connection. Its lock is held for each statement,
and for the whole life of a psycopg ``cursor.stream()`` or ``cursor.copy()``
block, which hold the driver's own lock that long. Waiting for it is bounded by
the scope's ``lock_timeout``; the error names the thread that holds it.
"""

from __future__ import annotations

import re
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Optional

from ._drivers import IDLE, INERROR, DatabaseKey, Driver
from .errors import (
    ConnectionLostError,
    DeferredConstraintError,
    InterleavedRollbackError,
    LockTimeoutError,
    SaRollbackError,
    StaleConnectionError,
    TransactionEscapeError,
    UnsupportedOperationError,
    caller_location,
)

if TYPE_CHECKING:
    from ._scope import RollbackScope

# (seq of the latest write, its transaction, seq of the latest write by another one, that write's sql)
_Marks = tuple[int, int, int, str, str]

#: how long close_frame waits for a statement it cancelled to give the connection back
_CANCEL_GRACE = 5.0
#: how long to wait for a holder already found stuck (it may just be finishing)
_STUCK_GRACE = 0.05
_OWNER = re.compile(r"owner=(\d+)")


def _fresh(seq: int) -> _Marks:
    return (seq, 0, seq, "", "")


_state: Any = None


def _default_timeout() -> float:
    global _state
    state = _state
    if state is None:
        # Imported late, once: _state imports this module.
        from ._state import STATE

        state = _state = STATE
    top = state.top
    return float(state.lock_timeout if top is None else top.lock_timeout)


def _stack_of(ident: Optional[int], limit: int = 12) -> str:
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return "    (its stack is not available)\n"
    return "".join(traceback.format_stack(frame)[-limit:])


def _thread_name(ident: Optional[int]) -> str:
    for thread in threading.enumerate():
        if thread.ident == ident:
            return thread.name
    return f"thread {ident}" if ident is not None else "another thread"


class Savepoint:
    """One savepoint on the physical connection, or the start of its transaction."""

    __slots__ = ("before", "is_base", "marks", "name", "owner", "seq", "txn", "undo", "user_live")

    def __init__(self, name: Optional[str], seq: int, marks: _Marks, owner: Optional[Logical]):
        #: None stands for the start of the physical transaction itself
        self.name = name
        self.seq = seq
        self.marks = marks
        self.owner = owner
        #: the owner's transaction, and its latest write before this savepoint
        self.txn = owner._txn if owner is not None else None
        self.before = owner._last_write if owner is not None else None
        #: serves as its owner's undo point
        self.undo = False
        #: a savepoint the application created and has not released yet
        self.user_live = False
        self.is_base = False

    @property
    def releasable(self) -> bool:
        return not (self.undo or self.user_live or self.is_base)


class Frame:
    """What one rollback scope did on one physical connection."""

    __slots__ = ("base", "last_seq", "last_sql", "last_txn", "logicals", "prev_seq", "prev_sql", "scope")

    def __init__(self, scope: RollbackScope, base: Savepoint):
        self.scope = scope
        self.base = base
        self.last_seq = base.seq
        self.last_txn = 0
        self.prev_seq = base.seq
        self.last_sql = ""
        self.prev_sql = ""
        self.logicals: set[Logical] = set()

    def last_foreign(self, txn: int) -> int:
        """Number of the latest write in this frame by a transaction other than ``txn``."""
        return self.last_seq if self.last_txn != txn else self.prev_seq

    def foreign_sql(self, txn: int) -> str:
        return self.last_sql if self.last_txn != txn else self.prev_sql

    def record_write(self, txn: int, seq: int, sql: str) -> None:
        if self.last_txn != txn:
            self.prev_seq = self.last_seq
            self.prev_sql = self.last_sql
            self.last_txn = txn
        self.last_seq = seq
        self.last_sql = sql

    @property
    def wrote(self) -> bool:
        """Does the frame hold writes that are not rolled back?"""
        return self.last_seq > self.base.seq

    def marks(self) -> _Marks:
        return (self.last_seq, self.last_txn, self.prev_seq, self.last_sql, self.prev_sql)

    def restore(self, marks: _Marks) -> None:
        self.last_seq, self.last_txn, self.prev_seq, self.last_sql, self.prev_sql = marks


class Physical:
    """The real connection of one database, shared by every logical connection on it."""

    def __init__(self, key: DatabaseKey, driver: Driver, conn: Any, record: Any):
        self.key = key
        self.driver = driver
        self.conn = conn
        self._record = record
        self.lock = threading.RLock()
        self.stack: list[Savepoint] = []
        self.frames: list[Frame] = []
        self.seq = 0
        self._ids = 0
        self.aborted_by: Optional[Logical] = None
        #: the connection died, or its state is unknown: never use it again
        self.broken = False
        self.lost: Optional[BaseException] = None
        #: open cursor.stream() / cursor.copy() blocks, which keep the driver busy
        self.streaming = 0
        #: the thread found holding the lock too long, until someone gets it again
        self.stuck: Optional[int] = None

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    @property
    def backend_pid(self) -> int:
        """The server process of this connection (``pg_terminate_backend`` takes it)."""
        return self.driver.backend_pid(self.conn)

    # -- the lock -------------------------------------------------------------

    def wait_for(self, timeout: float) -> float:
        """How long to wait: not again for a holder already found stuck."""
        return timeout if self.stuck is None else min(timeout, _STUCK_GRACE)

    def acquire(self, timeout: Optional[float] = None, waiting_for: str = "to run a statement") -> None:
        """Take the lock, or raise :class:`LockTimeoutError` after ``timeout`` seconds."""
        wait = self.wait_for(_default_timeout() if timeout is None else timeout)
        if not self.lock.acquire(True, wait):
            raise self.lock_timeout_error(wait, waiting_for)
        self.stuck = None

    def lock_timeout_error(self, timeout: float, waiting_for: str, report: bool = True) -> LockTimeoutError:
        me = threading.current_thread()
        # The RLock knows its owner but only says so in its repr.
        found = _OWNER.search(repr(self.lock))
        owner = int(found.group(1)) if found and found.group(1) != "0" else None
        holder = _thread_name(owner)
        again = self.stuck is not None and self.stuck == owner
        self.stuck = owner if owner is not None else -1
        waited = (
            f"did not wait again, since thread {holder!r} was already found stuck" if again else f"waited {timeout:g} s"
        )
        error = LockTimeoutError(
            f"Thread {me.name!r} {waited} for the connection to {self.key.describe()} "
            f"{waiting_for}, and thread {holder!r} held it all that time. Every connection of a test "
            "shares one physical connection per database, which runs one statement at a time; the "
            f"statement of {holder!r} (or its open cursor.stream()/copy() block) did not end, most likely "
            "because it waits for something only another thread of the test can do: a lock held by a "
            "connection outside the test's transaction, a join, a queue. Let that thread finish before "
            "waiting for it, or raise RollbackScope(lock_timeout=...) if its statement is merely slow.\n\n"
            f"Thread {holder!r} was here:\n{_stack_of(owner)}\n"
            f"Thread {me.name!r} waited here:\n{''.join(traceback.format_stack(sys._getframe(1))[-12:])}"
        )
        if report and not again:
            # A worker thread's error would go unnoticed; the scope raises it.
            from ._state import STATE

            STATE.report(error)
        return error

    @contextmanager
    def held(self, logical: Logical) -> Iterator[None]:
        """Hold the connection for a block that keeps the driver busy between calls."""
        self.acquire(waiting_for="for a cursor.stream() or copy() block")
        self.streaming += 1
        try:
            yield
        except GeneratorExit:
            raise
        except BaseException:
            logical._failed()
            raise
        finally:
            self.streaming -= 1
            self.lock.release()

    def busy_error(self, actor: Logical) -> UnsupportedOperationError:
        return UnsupportedOperationError(
            f"{actor.describe()} runs a statement while this thread is still inside a cursor.stream() or "
            f"copy() block on the same database ({caller_location()}). In production they would be two "
            "connections; here they share one, which cannot run a statement while the stream or COPY is "
            "open, and psycopg would wait forever. Finish or close the stream first, or fetch its rows "
            "with fetchall() / a server-side cursor."
        )

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
        if not self.lock.acquire(False):
            return True  # another thread is opening a scope on it
        try:
            if self.driver.dead(self.conn):
                self.mark_lost(None)
                return False
            return True
        finally:
            self.lock.release()

    def lost_error(self) -> ConnectionLostError:
        cause = f" ({' '.join(str(self.lost).split())})" if self.lost is not None else ""
        return ConnectionLostError(
            f"The connection to {self.key.describe()} was lost{cause}: its backend was terminated, the "
            "server restarted, or the network failed. The transaction of the test (and of any outer "
            "rollback scope on it) is gone, with everything written in it; nothing was committed. "
            "Once those scopes end, the next one connects again."
        )

    def _check_driver_free(self) -> None:
        # Only the thread inside a stream()/copy() block gets here while it is
        # open (it holds the lock), and psycopg would wait for it forever.
        if self.streaming:
            raise UnsupportedOperationError(
                f"The connection to {self.key.describe()} is inside a cursor.stream() or copy() block of "
                "this thread; finish it before committing, rolling back or taking savepoints on another "
                "connection."
            )

    def _execute(self, sql: str) -> None:
        self._check_driver_free()
        self.driver.execute(self.conn, sql)

    def _rollback_all(self) -> None:
        self._check_driver_free()
        self.conn.rollback()

    # -- frames ---------------------------------------------------------------

    def current_frame(self, scope: Optional[RollbackScope]) -> Frame:
        frames = self.frames
        if frames and frames[-1].scope is scope:
            return frames[-1]
        if scope is None:
            raise StaleConnectionError(
                f"A connection to {self.key.describe()} was checked out inside a rollback scope "
                f"that has ended, and is used after it ({caller_location()}): between tests, by a "
                "wider-scoped fixture's set-up or teardown, or by a thread the test left running. "
                "Its work would not be rolled back, so it is refused. End the transaction of a "
                "session kept across tests before each test ends (session.commit(), "
                "session.rollback(), session.close(), scoped_session.remove()), so that its next "
                "use checks out a new connection; or check out a new connection where it is used."
            )
        if frames and not frames[-1].scope._open:
            self._drop_stale_frames()
            if frames and frames[-1].scope is scope:
                return frames[-1]
        return self._open_frame(scope)

    def _drop_stale_frames(self) -> None:
        """Roll back frames of scopes that ended without closing them (an interrupted teardown)."""
        frames = self.frames
        k = len(frames)
        while k and not frames[k - 1].scope._open:
            k -= 1
        dropped = frames[k:]
        del frames[k:]
        self._rollback_frame(dropped[0], check=False)
        self.aborted_by = None
        for frame in reversed(dropped):
            for logical in list(frame.logicals):
                logical._frame_closed(frame)

    def _open_frame(self, scope: RollbackScope) -> Frame:
        if self.frames:
            base = self.push_savepoint(None)
        else:
            if self.driver.status(self.conn) != IDLE:
                # Left over from a scope whose rollback failed half way.
                self.conn.rollback()
            self.driver.begin_outer(self.conn)
            base = Savepoint(None, self.seq, _fresh(self.seq), None)
        # Rolling back to a frame's base restores the frame's empty history.
        base.marks = _fresh(self.seq)
        base.is_base = True
        frame = Frame(scope, base)
        self.frames.append(frame)
        scope._touched(self)
        return frame

    def close_frame(self, scope: RollbackScope) -> None:
        """Undo everything the scope's frame did. Called when the scope exits.

        Raises :class:`DeferredConstraintError` when the frame's writes violate
        a deferred constraint (and still rolls back), :class:`ConnectionLostError`
        when the connection died, and :class:`LockTimeoutError` when another
        thread kept the connection busy past the scope's ``lock_timeout``; then
        its statement is cancelled, or, if that does not free the connection,
        the connection is given up.
        """
        late: Optional[LockTimeoutError] = None
        wait = self.wait_for(scope.lock_timeout)
        if not self.lock.acquire(True, wait):
            late = self.lock_timeout_error(wait, f"to roll back {scope.label!r}", report=False)
            try:
                self.driver.cancel(self.conn)
            except Exception:
                pass
            if not self.lock.acquire(True, _CANCEL_GRACE):
                # Nothing frees it: give it up. The stuck thread keeps the
                # connection object; the next scope gets a new one.
                self.mark_lost(late)
                self._forget_frames(scope)
                raise late
        self.stuck = None
        try:
            index = next((i for i, f in enumerate(self.frames) if f.scope is scope), None)
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
                        self.clear_abort()
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
                self.aborted_by = None
                for frame in reversed(dropped):
                    for logical in list(frame.logicals):
                        logical._frame_closed(frame)
        finally:
            self.lock.release()
        if late is not None:
            raise late

    def _forget_frames(self, scope: RollbackScope) -> None:
        index = next((i for i, f in enumerate(self.frames) if f.scope is scope), None)
        if index is None:
            return
        dropped = self.frames[index:]
        del self.frames[index:]
        for frame in reversed(dropped):
            for logical in list(frame.logicals):
                logical._frame_closed(frame)

    def _rollback_frame(self, frame: Frame, check: bool) -> None:
        """Roll back to the frame's base, checking deferred constraints first when asked."""
        base = frame.base
        if base.name is None:
            try:
                self.driver.rollback_outer(self.conn, check)
            except Exception as exc:
                self.stack.clear()
                if check and self.alive():
                    raise self._deferred_error(frame, exc) from exc
                raise
            self.stack.clear()
            return
        undo = f"ROLLBACK TO SAVEPOINT {base.name}; RELEASE SAVEPOINT {base.name}"
        try:
            self._execute(f"SET CONSTRAINTS ALL IMMEDIATE; {undo}" if check else undo)
        except Exception as exc:
            if not (check and self.alive()):
                raise
            self._execute(undo)
            del self.stack[self.stack.index(base) :]
            raise self._deferred_error(frame, exc) from exc
        del self.stack[self.stack.index(base) :]

    def _deferred_error(self, frame: Frame, exc: BaseException) -> DeferredConstraintError:
        constraint = self.driver.constraint_name(exc)
        named = f"constraint {constraint!r}" if constraint else "a deferred constraint"
        detail = str(exc).strip().replace("\n", " ")
        return DeferredConstraintError(
            f"{frame.scope.label}: {named} on {self.key.describe()} is violated by what the test wrote "
            f"({detail}). In production the COMMIT would have failed. sa_rollback checks deferred "
            "constraints (SET CONSTRAINTS ALL IMMEDIATE) before rolling back; fix the data, or pass "
            "RollbackScope(check_deferred=False) to skip the check.",
            constraint,
        )

    # -- savepoints -----------------------------------------------------------

    def push_savepoint(self, owner: Optional[Logical]) -> Savepoint:
        """Take a new savepoint, releasing the releasable ones on top in the same round trip."""
        stack = self.stack
        floor = 0
        if self.frames:
            base = self.frames[-1].base
            if base.name is not None:
                floor = stack.index(base) + 1
        cut = len(stack)
        while cut > floor and stack[cut - 1].releasable:
            cut -= 1
        name = f"sar_{self.next_id()}"
        if cut < len(stack):
            sql = f"RELEASE SAVEPOINT {stack[cut].name}; SAVEPOINT {name}"
        else:
            sql = f"SAVEPOINT {name}"
        self._execute(sql)
        del stack[cut:]
        marks = self.frames[-1].marks() if self.frames else _fresh(self.seq)
        sp = Savepoint(name, self.seq, marks, owner)
        stack.append(sp)
        return sp

    def top_point(self) -> Savepoint:
        """The newest valid point of the current frame: the top savepoint, or the frame's base."""
        return self.stack[-1] if self.stack else self.frames[-1].base

    def rollback_to(self, target: Savepoint, actor: Logical) -> None:
        """Roll the physical transaction back to ``target`` on behalf of ``actor``.

        Savepoints above the target disappear. The callers make sure that no
        other transaction wrote above it, so other connections' open
        savepoints there hold nothing: they are taken again, in the same round
        trip, standing for the state at ``target``. Other connections' undo
        points there are dropped; they take new ones when they next run.
        """
        stack = self.stack
        start = 0 if target.name is None else stack.index(target) + 1
        above = stack[start:]
        kept = [sp for sp in above if sp.user_live and sp.owner is not None and sp.owner is not actor]
        retake = "; ".join(f"SAVEPOINT {sp.name}" for sp in kept)
        if target.name is None:
            self._rollback_all()
            if retake:
                self._execute(retake)
        else:
            self._execute(f"ROLLBACK TO SAVEPOINT {target.name}" + (f"; {retake}" if retake else ""))
        del stack[start:]
        for sp in kept:
            # Taken again, they stand for the state at the target. One may
            # also be its owner's undo point: it stays pinned.
            sp.seq = target.seq
            sp.marks = target.marks
            stack.append(sp)
        for sp in above:
            owner = sp.owner
            if owner is not None and not any(sp is k for k in kept):
                owner._savepoint_lost(sp)
        if self.frames:
            self.frames[-1].restore(target.marks)
        self.aborted_by = None

    def clear_abort(self) -> None:
        """Make an aborted transaction usable again.

        The aborted connection can only go on by rolling back, either all of
        its transaction or to one of its savepoints, all of which are older
        than the failure: what it wrote since its innermost savepoint (or
        since it began, without one) is lost either way. That is undone now,
        when one shared transaction can do it exactly; otherwise only the
        failed statement is, by rolling back to the newest savepoint.
        """
        owner = self.aborted_by
        assert owner is not None
        frame = self.frames[-1]
        innermost = owner._innermost_savepoint()
        point = owner._undo_point(frame, innermost)
        if not isinstance(point, Savepoint):
            # Another transaction wrote after some of it: undo what came after
            # that write, at least the failed statement.
            point = owner._point_after_foreign(frame, innermost) or self.top_point()
        self.rollback_to(point, owner)
        owner._lost_writes_after(point)

    def recover(self) -> None:
        """Another connection needs the transaction that a failed statement aborted.

        In production the failure aborts only the failing connection's
        transaction. Here the shared one is made usable again on its behalf,
        and that connection keeps failing until it rolls back.
        """
        owner = self.aborted_by
        assert owner is not None
        self.clear_abort()
        owner.doomed = True

    def escaped(self, sql: str, actor: Logical) -> TransactionEscapeError:
        """The transaction ended behind our back: resynchronize and describe the damage."""
        try:
            # psycopg2 still believes it is in a transaction and would run the
            # next statements in autocommit mode; a rollback resets that.
            self.conn.rollback()
        except Exception as exc:
            self.mark_lost(exc)
        frames = self.frames
        self.frames = []
        self.stack.clear()
        self.aborted_by = None
        for frame in frames:
            for logical in list(frame.logicals):
                logical._frame_closed(frame)
        return TransactionEscapeError(
            f"The statement {sql[:200]!r} on {actor.describe()} ended the test's transaction on "
            f"{self.key.describe()} ({caller_location()}). Anything written before it in this test was "
            "committed for real and is NOT rolled back; clean it up by hand. Use session.commit() or "
            "connection.commit() instead of textual COMMIT/ROLLBACK in multi-statement strings."
        )

    def close(self) -> None:
        """Close the real connection (end of the run, or when it died)."""
        try:
            self._record.close()
        except Exception:
            pass


class Logical:
    """State of one logical connection: its transaction, undo points and savepoints.

    :class:`sa_rollback._proxy.LogicalConnection` adds the DBAPI surface.

    Undo points: before each statement the connection holds a point taken
    after the latest write of any other transaction (``_recent``). The points
    it took during the transaction stay pinned, each with the number of the
    connection's latest write before it, as long as the connection wrote in
    between; a point with no write of its own since the previous one replaces
    it. That keeps one pinned savepoint per connection in the usual case, and
    lets a rollback (or a rollback to a savepoint) find a point after which
    only this connection wrote, whenever one exists.
    """

    __slots__ = (
        "__weakref__",
        "_autocommit",
        "_ended",
        "_explicit_block",
        "_first_write",
        "_frame",
        "_last_write",
        "_number",
        "_outer_writes",
        "_phys",
        "_points",
        "_recent",
        "_stale",
        "_txn",
        "_user_sps",
        "doomed",
    )

    def __init__(self, phys: Physical, number: int, autocommit: bool):
        self._phys = phys
        self._frame: Optional[Frame] = None
        self._txn: Optional[int] = None
        #: (undo point, seq of this transaction's latest write before it), oldest first
        self._points: list[tuple[Savepoint, Optional[int]]] = []
        #: the newest undo point
        self._recent: Optional[Savepoint] = None
        self._first_write: Optional[int] = None
        #: an upper bound of the seq of this transaction's latest write
        self._last_write: Optional[int] = None
        self._user_sps: dict[str, list[Savepoint]] = {}
        #: the transaction is aborted (its statement failed and the shared one
        #: was repaired on its behalf): statements fail until it rolls back
        self.doomed = False
        self._stale = False
        self._ended = False
        self._outer_writes = False
        self._autocommit = autocommit
        self._explicit_block = False
        self._number = number

    def describe(self) -> str:
        return f"logical connection #{self._number} to {self._phys.key.dbname}"

    # -- statements -----------------------------------------------------------

    def _prepare(self, scope: Optional[RollbackScope], control: bool = False) -> Frame:
        """Bring this connection into the current frame and into a transaction.

        ``control``: the statement ends or rewinds the transaction, which an
        aborted transaction allows.
        """
        if self._ended:
            raise self._closed_error()
        phys = self._phys
        if phys.broken:
            raise phys.lost_error()
        if self._stale and not control:
            raise StaleConnectionError(
                f"{self.describe()} still had an open transaction when its rollback scope ended, "
                "so that transaction is gone. Roll it back (session.rollback()) or, better, close "
                "sessions and connections at the end of each test (session.close(), "
                "scoped_session.remove())."
            )
        frame = phys.current_frame(scope)
        if phys.aborted_by is not None and phys.aborted_by is not self:
            phys.recover()
        if self.doomed and not control:
            raise phys.driver.in_failed_transaction(
                "current transaction is aborted, commands ignored until end of transaction block "
                f"(sa_rollback: {self.describe()})"
            )
        if self._frame is not frame:
            self._move_to(frame)
        if self._txn is None:
            self._txn = phys.next_id()
        return frame

    def _ensure_undo(self, frame: Frame) -> None:
        recent = self._recent
        need = frame.last_seq if frame.last_txn != self._txn else frame.prev_seq
        if recent is not None and recent.seq >= need:
            return
        self._new_point(frame, None, need)

    def _new_point(self, frame: Frame, savepoint: Optional[Savepoint], need: int) -> None:
        """Make a point after the latest foreign write the newest undo point."""
        if need <= frame.base.seq and savepoint is None:
            new = frame.base
        else:
            new = savepoint if savepoint is not None else self._phys.push_savepoint(self)
            new.undo = True
        points = self._points
        last = self._last_write
        if points and points[-1][1] == last:
            # Nothing written since the previous point: the new one does its job.
            old = points.pop()[0]
            old.undo = False
        points.append((new, last))
        self._recent = new

    def _move_to(self, frame: Frame) -> None:
        if self._txn is not None and (self._first_write is not None or self._user_sps):
            self._outer_writes = True
        self._unpin()
        self._first_write = None
        self._last_write = None
        self._user_sps = {}
        self._frame = frame
        frame.logicals.add(self)

    def _unpin(self) -> None:
        for point, _ in self._points:
            point.undo = False
        self._points = []
        self._recent = None

    def _wrote(self, frame: Frame, sql: str) -> None:
        phys = self._phys
        phys.seq += 1
        assert self._txn is not None
        frame.record_write(self._txn, phys.seq, sql)
        self._last_write = phys.seq
        if self._first_write is None:
            self._first_write = phys.seq

    def _failed(self) -> None:
        """A statement raised: note a dead connection or an aborted transaction."""
        phys = self._phys
        try:
            if phys.driver.closed(phys.conn):
                phys.mark_lost(sys.exc_info()[1])
            elif phys.driver.status(phys.conn) == INERROR:
                phys.aborted_by = self
        except Exception as exc:
            phys.mark_lost(exc)

    def _lost_writes_after(self, point: Savepoint) -> None:
        """The transaction was rolled back to ``point``."""
        first = self._first_write
        if first is not None and first > point.seq:
            self._first_write = None
            self._last_write = None
        elif point.owner is self and point.txn == self._txn:
            self._last_write = point.before
        elif self._last_write is not None and self._last_write > point.seq:
            # An upper bound: the caller knows no better.
            self._last_write = point.seq

    def _position(self, sp: Savepoint) -> int:
        """Where ``sp`` is on the stack: -1 for the start of the transaction, -2 if it is gone."""
        if sp.name is None:
            return -1
        try:
            return self._phys.stack.index(sp)
        except ValueError:
            return -2

    def _undo_point(self, frame: Frame, since: Optional[Savepoint]) -> Optional[Savepoint | bool]:
        """The point to roll back to, to undo exactly what this transaction wrote since ``since``.

        ``since`` is a savepoint of this connection, or None for the start of
        the transaction. None: nothing to undo. False: impossible, because
        another transaction's write came after one of ours.
        """
        txn = self._txn
        assert txn is not None
        last = self._last_write
        if last is None or (since is not None and last <= since.seq):
            return None
        foreign = frame.last_foreign(txn)
        if since is not None and foreign <= since.seq:
            return since
        floor = -1 if since is None else self._position(since)
        for point, before in self._points:
            if point.seq < foreign:
                continue
            if before is None or (since is not None and before <= since.seq):
                if self._position(point) >= max(floor, -1):
                    return point
        return False

    def _point_after_foreign(self, frame: Frame, since: Optional[Savepoint]) -> Optional[Savepoint]:
        """The oldest of our undo points after the latest foreign write (and after ``since``)."""
        txn = self._txn
        assert txn is not None
        foreign = frame.last_foreign(txn)
        floor = -1 if since is None else self._position(since)
        for point, _ in self._points:
            if point.seq >= foreign and self._position(point) >= max(floor, -1):
                return point
        return None

    def _innermost_savepoint(self) -> Optional[Savepoint]:
        stack = self._phys.stack
        found: Optional[Savepoint] = None
        index = -1
        for sps in self._user_sps.values():
            for sp in sps:
                if sp.user_live:
                    position = stack.index(sp)
                    if position > index:
                        found, index = sp, position
        return found

    # -- transaction ends -----------------------------------------------------

    def _end_txn(self) -> None:
        self._unpin()
        for sps in self._user_sps.values():
            for sp in sps:
                sp.user_live = False
        self._txn = None
        self._first_write = None
        self._last_write = None
        self._user_sps = {}
        self._outer_writes = False
        self._explicit_block = False
        self.doomed = False

    def _undo_txn(self) -> Optional[SaRollbackError]:
        """Undo the open transaction as far as one shared transaction allows.

        Returns the error to raise when it could not be undone completely.
        """
        phys = self._phys
        frame = self._frame
        txn = self._txn
        if frame is None or txn is None or phys.broken:
            self._end_txn()
            return None
        if phys.aborted_by is not None:
            if phys.aborted_by is self:
                phys.clear_abort()
            else:
                phys.recover()
        error: Optional[SaRollbackError] = None
        point = self._undo_point(frame, None)
        if point is False:
            error = InterleavedRollbackError(
                f"{self.describe()} rolls back, but after its first write another transaction wrote "
                f"too ({frame.foreign_sql(txn)[:200]!r}). Production would undo only this "
                "connection's work; one shared transaction would also undo the other's. Nothing "
                "was undone. Commit or roll back the first unit of work before another one writes, "
                "or mark the test to run with real commits."
            )
        elif isinstance(point, Savepoint):
            phys.rollback_to(point, self)
        if self._outer_writes and error is None:
            error = InterleavedRollbackError(
                f"{self.describe()} rolls back a transaction that began before the current rollback "
                "scope (a session kept open across tests, say). What it wrote before the scope "
                "began cannot be undone without undoing the scope itself. Commit or close it "
                "before the scope begins."
            )
        self._end_txn()
        return error

    def _commit(self) -> None:
        if self._txn is None and not (self._stale or self.doomed or self._ended):
            # Nothing to end. Only this connection's own thread sets _txn, so
            # this needs no lock, and a stuck thread elsewhere does not block it.
            return
        phys = self._phys
        phys.acquire()
        try:
            if self._ended:
                raise self._closed_error()
            if self._stale:
                self._stale = False
                raise StaleConnectionError(
                    f"{self.describe()} commits a transaction that was rolled back when the previous "
                    "rollback scope ended. Close sessions at the end of each test."
                )
            if phys.broken and self._txn is not None:
                self._end_txn()
                raise phys.lost_error()
            if self.doomed or phys.aborted_by is self:
                # PostgreSQL turns COMMIT of an aborted transaction into ROLLBACK.
                self._rollback()
                return
            self._end_txn()
        finally:
            phys.lock.release()

    def _rollback(self) -> None:
        if self._txn is None and not self._stale:
            return
        phys = self._phys
        phys.acquire()
        try:
            if self._ended:
                return
            self._stale = False
            error = self._undo_txn()
            if error is not None:
                raise error
        finally:
            phys.lock.release()

    # -- user savepoints ------------------------------------------------------

    def _user_savepoint(self, frame: Frame, name: str) -> None:
        txn = self._txn
        assert txn is not None
        sp = self._phys.push_savepoint(self)
        sp.user_live = True
        need = frame.last_foreign(txn)
        recent = self._recent
        if recent is None or recent.seq < need:
            # The savepoint doubles as the undo point the next statement needs.
            self._new_point(frame, sp, need)
        self._user_sps.setdefault(name, []).append(sp)

    def _forget_user_savepoints_after(self, sp: Savepoint) -> None:
        stack = self._phys.stack
        try:
            position = stack.index(sp)
        except ValueError:
            return
        later = {id(s) for s in stack[position + 1 :]}
        for key in list(self._user_sps):
            kept = [s for s in self._user_sps[key] if id(s) not in later]
            for s in self._user_sps[key]:
                if id(s) in later:
                    s.user_live = False
            if kept:
                self._user_sps[key] = kept
            else:
                del self._user_sps[key]

    def _user_release(self, name: str) -> bool:
        """Release a user savepoint; False when the name is unknown."""
        sps = self._user_sps.get(name)
        if not sps:
            return False
        sp = sps[-1]
        # RELEASE also releases every savepoint this connection took after it.
        self._forget_user_savepoints_after(sp)
        sps = self._user_sps.get(name, [])
        if sps and sps[-1] is sp:
            sps.pop()
            if not sps:
                del self._user_sps[name]
        sp.user_live = False
        return True

    def _user_rollback_to(self, frame: Frame, name: str) -> bool:
        """Roll back to a user savepoint; False when the name is unknown."""
        sps = self._user_sps.get(name)
        if not sps:
            return False
        sp = sps[-1]
        phys = self._phys
        if phys.aborted_by is self:
            phys.clear_abort()
            # Refused below, the transaction stays aborted, as it is now.
            self.doomed = True
        point = self._undo_point(frame, sp)
        if point is False:
            txn = self._txn
            assert txn is not None
            raise InterleavedRollbackError(
                f"{self.describe()} rolls back to savepoint {name!r}, but another transaction wrote "
                f"after this connection's writes since the savepoint ({frame.foreign_sql(txn)[:200]!r}). "
                "Production would keep that write; one shared transaction cannot. Nothing was undone."
            )
        self._forget_user_savepoints_after(sp)
        if isinstance(point, Savepoint):
            phys.rollback_to(point, self)
        self._lost_writes_after(sp)
        self.doomed = False
        return True

    # -- notifications from the physical side --------------------------------

    def _savepoint_lost(self, sp: Savepoint) -> None:
        points = self._points
        if any(point is sp for point, _ in points):
            self._points = points = [entry for entry in points if entry[0] is not sp]
            self._recent = points[-1][0] if points else None
        for key in list(self._user_sps):
            kept = [s for s in self._user_sps[key] if s is not sp]
            if kept:
                self._user_sps[key] = kept
            else:
                del self._user_sps[key]

    def _frame_closed(self, frame: Frame) -> None:
        if self._frame is not frame:
            return
        if self._holds_work() or (self._txn is not None and self.doomed):
            self._stale = True
        self._frame = None
        self._txn = None
        self._points = []
        self._recent = None
        self._first_write = None
        self._last_write = None
        self._user_sps = {}
        self._outer_writes = False
        self._explicit_block = False
        self.doomed = False

    def _returned(self) -> Optional[SaRollbackError]:
        """The pool takes the connection back: end it like a rollback would."""
        if self._txn is None and not self._stale:
            self._end()
            return None
        phys = self._phys
        phys.acquire(waiting_for="to end a connection the pool takes back")
        try:
            if self._ended:
                return None
            error: Optional[SaRollbackError] = None
            if self._stale:
                self._stale = False
                self._end_txn()
            else:
                error = self._undo_txn()
            self._end()
            return error
        finally:
            phys.lock.release()

    def _holds_work(self) -> bool:
        """Is a transaction open that wrote, or took savepoints, which a rollback would undo?"""
        return self._txn is not None and (self._first_write is not None or bool(self._user_sps) or self._outer_writes)

    def _end(self) -> None:
        """No one may use this connection any more."""
        self._ended = True
        if self._frame is not None:
            self._frame.logicals.discard(self)

    def _closed_error(self) -> Exception:
        return StaleConnectionError(f"{self.describe()} is closed; it was returned to the pool.")
