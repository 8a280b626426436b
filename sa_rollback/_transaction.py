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
2. Rollback of L undoes L's writes by rolling back to its undo point, unless
   another transaction wrote after L's first write. Then one transaction cannot
   reproduce production, and :class:`InterleavedRollbackError` is raised.
3. A rollback of L without writes does nothing, unless L's statement failed and
   PostgreSQL aborted the transaction; then it rolls back to L's undo point.
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
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Optional

from ._drivers import IDLE, INERROR, DatabaseKey, Driver
from .errors import (
    InterleavedRollbackError,
    SaRollbackError,
    StaleConnectionError,
    TransactionEscapeError,
)

if TYPE_CHECKING:
    from ._scope import RollbackScope

# (seq of the latest write, its transaction, seq of the latest write by another one, that write's sql)
_Marks = tuple[int, int, int, str, str]


def _fresh(seq: int) -> _Marks:
    return (seq, 0, seq, "", "")


class Savepoint:
    """One savepoint on the physical connection, or the start of its transaction."""

    __slots__ = ("is_base", "marks", "name", "owner", "seq", "undo", "user_live")

    def __init__(self, name: Optional[str], seq: int, marks: _Marks, owner: Optional[Logical]):
        #: None stands for the start of the physical transaction itself
        self.name = name
        self.seq = seq
        self.marks = marks
        self.owner = owner
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
        self.broken = False

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    # -- frames ---------------------------------------------------------------

    def current_frame(self, scope: Optional[RollbackScope]) -> Frame:
        frames = self.frames
        if frames and frames[-1].scope is scope:
            return frames[-1]
        if scope is None:
            raise StaleConnectionError(
                f"A connection to {self.key.describe()} was checked out inside a rollback scope "
                "that has ended, and is used after it. Check out a new connection (or open a "
                "new Session) inside the current test instead of keeping one across tests."
            )
        return self._open_frame(scope)

    def _open_frame(self, scope: RollbackScope) -> Frame:
        if self.frames:
            base = self.push_savepoint(None)
        else:
            if self.driver.status(self.conn) != IDLE:
                # Left over from a scope whose rollback failed half way.
                self.conn.rollback()
            base = Savepoint(None, self.seq, _fresh(self.seq), None)
        # Rolling back to a frame's base restores the frame's empty history.
        base.marks = _fresh(self.seq)
        base.is_base = True
        frame = Frame(scope, base)
        self.frames.append(frame)
        scope._touched(self)
        return frame

    def close_frame(self, scope: RollbackScope) -> None:
        """Undo everything the scope's frame did. Called when the scope exits."""
        with self.lock:
            if not self.frames or self.frames[-1].scope is not scope:
                return
            frame = self.frames.pop()
            try:
                base = frame.base
                if base.name is None:
                    self.conn.rollback()
                    self.stack.clear()
                else:
                    self.driver.execute(self.conn, f"ROLLBACK TO SAVEPOINT {base.name}; RELEASE SAVEPOINT {base.name}")
                    del self.stack[self.stack.index(base) :]
                self.aborted_by = None
            except Exception:
                self.broken = True
                raise
            finally:
                for logical in frame.logicals:
                    logical._frame_closed(frame)

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
        self.driver.execute(self.conn, sql)
        del stack[cut:]
        marks = self.frames[-1].marks() if self.frames else _fresh(self.seq)
        sp = Savepoint(name, self.seq, marks, owner)
        stack.append(sp)
        return sp

    def rollback_to(self, target: Savepoint, actor: Logical, force: bool = False) -> None:
        """Roll the physical transaction back to ``target`` on behalf of ``actor``.

        Savepoints above the target disappear. Other connections' undo points
        among them are dropped (they held no writes there, or the caller would
        have refused). Other connections' own savepoints make it refuse, unless
        ``force`` says the transaction must be made usable whatever it costs.
        """
        stack = self.stack
        start = 0 if target.name is None else stack.index(target) + 1
        above = stack[start:]
        if not force:
            for sp in above:
                if sp.user_live and sp.owner is not actor and sp.owner is not None:
                    raise InterleavedRollbackError(
                        f"{actor.describe()} rolls back to a point before savepoint of "
                        f"{sp.owner.describe()}, which is still open. Production would keep that "
                        "savepoint; one shared transaction cannot. Release or roll back the nested "
                        "transaction (begin_nested()) before the outer rollback."
                    )
        if target.name is None:
            self.conn.rollback()
        else:
            self.driver.execute(self.conn, f"ROLLBACK TO SAVEPOINT {target.name}")
        del stack[start:]
        for sp in above:
            owner = sp.owner
            if owner is not None and owner is not actor:
                owner._savepoint_lost(sp)
        if self.frames:
            self.frames[-1].restore(target.marks)
        self.aborted_by = None

    def recover(self) -> None:
        """Make the transaction usable again after another connection's statement failed.

        In production the failure aborts only that connection's transaction.
        Here it aborts the shared one, so its undo is applied now, on its
        behalf, and the connection itself keeps failing until it rolls back.
        """
        owner = self.aborted_by
        assert owner is not None
        error = owner._undo_txn(force=True)
        owner.doomed = error or True

    def escaped(self, sql: str, actor: Logical) -> TransactionEscapeError:
        """The transaction ended behind our back: resynchronize and describe the damage."""
        try:
            # psycopg2 still believes it is in a transaction and would run the
            # next statements in autocommit mode; a rollback resets that.
            self.conn.rollback()
        except Exception:
            self.broken = True
        frames = self.frames
        self.frames = []
        self.stack.clear()
        self.aborted_by = None
        for frame in frames:
            for logical in frame.logicals:
                logical._frame_closed(frame)
        return TransactionEscapeError(
            f"The statement {sql!r} on {actor.describe()} ended the test's transaction on "
            f"{self.key.describe()}. Anything written before it in this test was committed for "
            "real and is NOT rolled back; clean it up by hand. Use session.commit() or "
            "connection.commit() instead of textual COMMIT/ROLLBACK in multi-statement strings."
        )

    def close(self) -> None:
        """Close the real connection (at the end of the run)."""
        try:
            self._record.close()
        except Exception:
            pass


class Logical:
    """State of one logical connection: its transaction, undo point and savepoints.

    :class:`sa_rollback._proxy.LogicalConnection` adds the DBAPI surface.
    """

    __slots__ = (
        "__weakref__",
        "_autocommit",
        "_ended",
        "_explicit_block",
        "_first_write",
        "_frame",
        "_number",
        "_outer_writes",
        "_phys",
        "_stale",
        "_txn",
        "_undo",
        "_user_sps",
        "doomed",
    )

    def __init__(self, phys: Physical, number: int, autocommit: bool):
        self._phys = phys
        self._frame: Optional[Frame] = None
        self._txn: Optional[int] = None
        self._undo: Optional[Savepoint] = None
        self._first_write: Optional[int] = None
        self._user_sps: dict[str, list[Savepoint]] = {}
        #: False, True (aborted and undone on our behalf), or the error our rollback must raise
        self.doomed: Any = False
        self._stale = False
        self._ended = False
        self._outer_writes = False
        self._autocommit = autocommit
        self._explicit_block = False
        self._number = number

    def describe(self) -> str:
        return f"logical connection #{self._number} to {self._phys.key.dbname}"

    # -- statements -----------------------------------------------------------

    def _prepare(self, scope: Optional[RollbackScope]) -> Frame:
        """Bring this connection into the current frame and into a transaction."""
        if self._ended:
            raise self._closed_error()
        if self._stale:
            raise StaleConnectionError(
                f"{self.describe()} still had an open transaction when its rollback scope ended, "
                "so that transaction is gone. Roll it back (session.rollback()) or, better, close "
                "sessions and connections at the end of each test (session.close(), "
                "scoped_session.remove())."
            )
        phys = self._phys
        frame = phys.current_frame(scope)
        if phys.aborted_by is not None and phys.aborted_by is not self:
            phys.recover()
        if self.doomed:
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
        txn = self._txn
        assert txn is not None
        need = frame.last_foreign(txn)
        undo = self._undo
        if undo is not None and undo.seq >= need:
            return
        if need <= frame.base.seq:
            new = frame.base
        else:
            new = self._phys.push_savepoint(self)
            new.undo = True
        if undo is not None:
            undo.undo = False
        self._undo = new

    def _move_to(self, frame: Frame) -> None:
        if self._txn is not None and (self._first_write is not None or self._user_sps):
            self._outer_writes = True
        self._undo = None
        self._first_write = None
        self._user_sps = {}
        self._frame = frame
        frame.logicals.add(self)

    def _wrote(self, frame: Frame, sql: str) -> None:
        phys = self._phys
        phys.seq += 1
        assert self._txn is not None
        frame.record_write(self._txn, phys.seq, sql)
        if self._first_write is None:
            self._first_write = phys.seq

    def _failed(self) -> None:
        phys = self._phys
        if phys.driver.closed(phys.conn):
            phys.broken = True
        elif phys.driver.status(phys.conn) == INERROR:
            phys.aborted_by = self

    # -- transaction ends -----------------------------------------------------

    def _end_txn(self) -> None:
        undo = self._undo
        if undo is not None:
            undo.undo = False
        for sps in self._user_sps.values():
            for sp in sps:
                sp.user_live = False
        self._txn = None
        self._undo = None
        self._first_write = None
        self._user_sps = {}
        self._outer_writes = False
        self._explicit_block = False

    def _undo_txn(self, force: bool = False) -> Optional[SaRollbackError]:
        """Undo the open transaction as far as one shared transaction allows.

        Returns the error to raise when it could not be undone completely.
        """
        phys = self._phys
        frame = self._frame
        txn = self._txn
        if frame is None or txn is None:
            self._end_txn()
            return None
        aborted = phys.aborted_by is self
        error: Optional[SaRollbackError] = None
        undo = self._undo
        first = self._first_write
        if undo is None and aborted:
            # Only a failure of our own SAVEPOINT gets here; the frame base is
            # the one point known to be valid.
            undo = frame.base
        if first is not None and frame.last_foreign(txn) > first:
            error = InterleavedRollbackError(
                f"{self.describe()} rolls back, but after its first write another transaction wrote "
                f"too ({frame.foreign_sql(txn)[:200]!r}). Production would undo only this "
                "connection's work; one shared transaction would also undo the other's. Nothing "
                "was undone. Commit or roll back the first unit of work before another one writes, "
                "or mark the test to run with real commits."
            )
            if aborted and undo is not None:
                phys.rollback_to(undo, self, force=True)
        elif (first is not None or aborted) and undo is not None:
            try:
                phys.rollback_to(undo, self, force=force or aborted)
            except InterleavedRollbackError as exc:
                error = exc
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
        with self._phys.lock:
            if self._ended:
                raise self._closed_error()
            if self._stale:
                self._stale = False
                raise StaleConnectionError(
                    f"{self.describe()} commits a transaction that was rolled back when the previous "
                    "rollback scope ended. Close sessions at the end of each test."
                )
            if self.doomed is not False or self._phys.aborted_by is self:
                # PostgreSQL turns COMMIT of an aborted transaction into ROLLBACK.
                self._rollback()
                return
            self._end_txn()

    def _rollback(self) -> None:
        with self._phys.lock:
            if self._ended:
                return
            self._stale = False
            doomed = self.doomed
            if doomed is not False:
                self.doomed = False
                self._end_txn()
                if isinstance(doomed, SaRollbackError):
                    raise doomed
                return
            error = self._undo_txn()
            if error is not None:
                raise error

    # -- user savepoints ------------------------------------------------------

    def _user_savepoint(self, frame: Frame, name: str) -> None:
        txn = self._txn
        assert txn is not None
        sp = self._phys.push_savepoint(self)
        sp.user_live = True
        undo = self._undo
        if undo is None or undo.seq < frame.last_foreign(txn):
            if undo is not None:
                undo.undo = False
            sp.undo = True
            self._undo = sp
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
        txn = self._txn
        assert txn is not None
        if frame.last_foreign(txn) > sp.seq:
            raise InterleavedRollbackError(
                f"{self.describe()} rolls back to savepoint {name!r}, but another transaction wrote "
                f"after it ({frame.foreign_sql(txn)[:200]!r}). Production would keep that write; "
                "one shared transaction cannot. Nothing was undone."
            )
        self._forget_user_savepoints_after(sp)
        undo = self._undo
        self._phys.rollback_to(sp, self, force=self._phys.aborted_by is self)
        first = self._first_write
        if first is not None and first > sp.seq:
            self._first_write = None
        if undo is not None and undo not in self._phys.stack and undo is not frame.base:
            sp.undo = True
            self._undo = sp
        return True

    # -- notifications from the physical side --------------------------------

    def _savepoint_lost(self, sp: Savepoint) -> None:
        if self._undo is sp:
            self._undo = None
        for key in list(self._user_sps):
            kept = [s for s in self._user_sps[key] if s is not sp]
            if kept:
                self._user_sps[key] = kept
            else:
                del self._user_sps[key]

    def _frame_closed(self, frame: Frame) -> None:
        if self._frame is not frame:
            return
        if self._txn is not None and (
            self._first_write is not None or self._user_sps or self._outer_writes or self.doomed is not False
        ):
            self._stale = True
        self._frame = None
        self._txn = None
        self._undo = None
        self._first_write = None
        self._user_sps = {}
        self._outer_writes = False
        self._explicit_block = False
        self.doomed = False

    def _returned(self) -> Optional[SaRollbackError]:
        """The pool takes the connection back: end it like a rollback would."""
        with self._phys.lock:
            if self._ended:
                return None
            error: Optional[SaRollbackError] = None
            if self._stale or self.doomed is not False:
                doomed = self.doomed
                self._stale = False
                self.doomed = False
                self._end_txn()
                if isinstance(doomed, SaRollbackError):
                    error = doomed
            else:
                error = self._undo_txn()
            self._ended = True
            if self._frame is not None:
                self._frame.logicals.discard(self)
            return error

    def _closed_error(self) -> Exception:
        return StaleConnectionError(f"{self.describe()} is closed; it was returned to the pool.")
