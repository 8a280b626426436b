"""A logical connection: one pool checkout's transaction, on savepoints of the shared physical one.

The rules that keep production semantics:

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

The undo points L took during a transaction stay pinned, each with the number
of L's latest write before it, as long as L wrote in between; a point with no
write of its own since the previous one replaces it. That keeps one pinned
savepoint per connection in the usual case, and lets a rollback (or a rollback
to a savepoint) find a point after which only L wrote, whenever one exists.
"""

from __future__ import annotations

import sys
from typing import Optional

from ._drivers import INERROR
from ._history import Frame, Savepoint, ScopeLike
from ._physical import Physical
from ._txn import Txn, Undo, UndoPlan
from .errors import InterleavedRollbackError, SaRollbackError, StaleConnectionError


class Logical:
    """State of one logical connection: its transaction, undo points and savepoints.

    :class:`sa_rollback._proxy.LogicalConnection` adds the DBAPI surface.
    """

    __slots__ = ("__weakref__", "_autocommit", "_ended", "_frame", "_number", "_stale", "_t", "phys")

    def __init__(self, phys: Physical, number: int, autocommit: bool) -> None:
        self.phys = phys
        self._frame: Optional[Frame] = None
        self._t = Txn()
        self._stale = False
        self._ended = False
        self._autocommit = autocommit
        self._number = number

    def describe(self) -> str:
        return f"logical connection #{self._number} to {self.phys.key.dbname}"

    @property
    def stale(self) -> bool:
        """Its transaction was rolled back when its scope ended; commit fails until it rolls back."""
        return self._stale

    @property
    def in_transaction(self) -> bool:
        return self._t.id is not None

    @property
    def doomed(self) -> bool:
        return self._t.doomed

    def holds_work(self) -> bool:
        """Is a transaction open that wrote, or took savepoints, which a rollback would undo?"""
        t = self._t
        return t.id is not None and (t.first_write is not None or bool(t.user_sps) or t.outer_writes)

    # -- statements -----------------------------------------------------------

    def _prepare(self, scope: Optional[ScopeLike], control: bool = False) -> Frame:
        """Bring this connection into the current frame and into a transaction.

        ``control``: the statement ends or rewinds the transaction, which an
        aborted transaction allows.
        """
        if self._ended:
            raise self._closed_error()
        phys = self.phys
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
        aborted_by = phys.aborted_by
        if aborted_by is not None and aborted_by is not self:
            aborted_by.recover()
        t = self._t
        if t.doomed and not control:
            raise phys.driver.in_failed_transaction(
                "current transaction is aborted, commands ignored until end of transaction block "
                f"(sa_rollback: {self.describe()})"
            )
        if self._frame is not frame:
            self._move_to(frame)
            t = self._t
        if t.id is None:
            t.id = phys.next_id()
        return frame

    def _ensure_undo(self, frame: Frame) -> None:
        t = self._t
        recent = t.recent
        need = frame.last_seq if frame.last_txn != t.id else frame.prev_seq
        if recent is not None and recent.seq >= need:
            return
        self._new_point(frame, None, need)

    def _new_point(self, frame: Frame, savepoint: Optional[Savepoint], need: int) -> None:
        """Make a point after the latest foreign write the newest undo point."""
        t = self._t
        if need <= frame.base.seq and savepoint is None:
            new = frame.base
        else:
            new = savepoint if savepoint is not None else self.phys.push_savepoint(self, t.id, t.last_write)
            new.undo = True
        points = t.points
        last = t.last_write
        if points and points[-1][1] == last:
            # Nothing written since the previous point: the new one does its job.
            old = points.pop()[0]
            old.undo = False
        points.append((new, last))
        t.recent = new

    def _move_to(self, frame: Frame) -> None:
        t = self._t
        outer = t.id is not None and (t.first_write is not None or bool(t.user_sps))
        self._t = t.moved(t.outer_writes or outer)
        self._frame = frame
        frame.logicals.add(self)

    def _wrote(self, frame: Frame, sql: str) -> None:
        phys = self.phys
        phys.seq += 1
        t = self._t
        assert t.id is not None
        frame.record_write(t.id, phys.seq, sql)
        t.last_write = phys.seq
        if t.first_write is None:
            t.first_write = phys.seq

    def failed(self) -> None:
        """A statement raised: note a dead connection or an aborted transaction."""
        phys = self.phys
        try:
            phys.driver.note_failure(phys.conn)
            if phys.driver.closed(phys.conn):
                phys.mark_lost(sys.exc_info()[1])
            elif phys.driver.status(phys.conn) == INERROR:
                phys.aborted_by = self
        except Exception as exc:
            phys.mark_lost(exc)

    def _lost_writes_after(self, point: Savepoint) -> None:
        """The transaction was rolled back to ``point``."""
        t = self._t
        first = t.first_write
        if first is not None and first > point.seq:
            t.first_write = None
            t.last_write = None
        elif point.owner is self and point.txn == t.id:
            t.last_write = point.before
        elif t.last_write is not None and t.last_write > point.seq:
            # An upper bound: the caller knows no better.
            t.last_write = point.seq

    def _undo_point(self, frame: Frame, since: Optional[Savepoint]) -> UndoPlan:
        """The point to roll back to, to undo exactly what this transaction wrote since ``since``.

        ``since`` is a savepoint of this connection, or None for the start of
        the transaction.
        """
        t = self._t
        assert t.id is not None
        last = t.last_write
        if last is None or (since is not None and last <= since.seq):
            return Undo.NOTHING
        foreign = frame.last_foreign(t.id)
        if since is not None and foreign <= since.seq:
            return since
        stack = self.phys.stack
        for point, before in t.points:
            if point.seq < foreign:
                continue
            if before is None or (since is not None and before <= since.seq):
                if stack.kept_since(point, since):
                    return point
        return Undo.IMPOSSIBLE

    def _point_after_foreign(self, frame: Frame, since: Optional[Savepoint]) -> Optional[Savepoint]:
        """The oldest of our undo points after the latest foreign write (and after ``since``)."""
        t = self._t
        assert t.id is not None
        foreign = frame.last_foreign(t.id)
        stack = self.phys.stack
        for point, _ in t.points:
            if point.seq >= foreign and stack.kept_since(point, since):
                return point
        return None

    def _innermost_savepoint(self) -> Optional[Savepoint]:
        found: Optional[Savepoint] = None
        for sps in self._t.user_sps.values():
            for sp in sps:
                if sp.user_live and sp.index >= 0 and (found is None or sp.index > found.index):
                    found = sp
        return found

    # -- a failed statement's aborted transaction -----------------------------

    def clear_abort(self) -> None:
        """Make the transaction this connection's failed statement aborted usable again.

        This connection can only go on by rolling back, either all of its
        transaction or to one of its savepoints, all of which are older than
        the failure: what it wrote since its innermost savepoint (or since it
        began, without one) is lost either way. That is undone now, when one
        shared transaction can do it exactly; otherwise only the failed
        statement is, by rolling back to the newest savepoint.
        """
        phys = self.phys
        frame = phys.frames[-1]
        innermost = self._innermost_savepoint()
        plan = self._undo_point(frame, innermost)
        point = plan if isinstance(plan, Savepoint) else None
        if point is None:
            # Another transaction wrote after some of it: undo what came after
            # that write, at least the failed statement.
            point = self._point_after_foreign(frame, innermost) or phys.top_point()
        phys.rollback_to(point, self)
        self._lost_writes_after(point)

    def recover(self) -> None:
        """Another connection needs the transaction that this one's failed statement aborted.

        In production the failure aborts only this connection's transaction.
        Here the shared one is made usable again on its behalf, and this
        connection keeps failing until it rolls back.
        """
        self.clear_abort()
        self._t.doomed = True

    # -- transaction ends -----------------------------------------------------

    def _end_txn(self) -> None:
        t = self._t
        t.unpin()
        for sps in t.user_sps.values():
            for sp in sps:
                sp.user_live = False
        self._t = Txn()

    def _undo_txn(self) -> Optional[SaRollbackError]:
        """Undo the open transaction as far as one shared transaction allows.

        Returns the error to raise when it could not be undone completely.
        """
        phys = self.phys
        frame = self._frame
        t = self._t
        txn = t.id
        if frame is None or txn is None or phys.broken:
            self._end_txn()
            return None
        aborted_by = phys.aborted_by
        if aborted_by is self:
            self.clear_abort()
        elif aborted_by is not None:
            aborted_by.recover()
        error: Optional[SaRollbackError] = None
        plan = self._undo_point(frame, None)
        if plan is Undo.IMPOSSIBLE:
            error = InterleavedRollbackError(
                f"{self.describe()} rolls back, but after its first write another transaction wrote "
                f"too ({frame.foreign_sql(txn)[:200]!r}). Production would undo only this "
                "connection's work; one shared transaction would also undo the other's. Nothing "
                "was undone. Commit or roll back the first unit of work before another one writes, "
                "or mark the test to run with real commits."
            )
        elif isinstance(plan, Savepoint):
            phys.rollback_to(plan, self)
        if t.outer_writes and error is None:
            error = InterleavedRollbackError(
                f"{self.describe()} rolls back a transaction that began before the current rollback "
                "scope (a session kept open across tests, say). What it wrote before the scope "
                "began cannot be undone without undoing the scope itself. Commit or close it "
                "before the scope begins."
            )
        self._end_txn()
        return error

    def _commit(self) -> None:
        if self._t.id is None and not (self._stale or self._t.doomed or self._ended):
            # Nothing to end. Only this connection's own thread sets the
            # transaction, so this needs no lock, and a stuck thread elsewhere
            # does not block it.
            return
        phys = self.phys
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
            if phys.broken and self._t.id is not None:
                self._end_txn()
                raise phys.lost_error()
            if self._t.doomed or phys.aborted_by is self:
                # PostgreSQL turns COMMIT of an aborted transaction into ROLLBACK.
                self._rollback()
                return
            self._end_txn()
        finally:
            phys.release()

    def _rollback(self) -> None:
        if self._t.id is None and not self._stale:
            return
        phys = self.phys
        phys.acquire()
        try:
            if self._ended:
                return
            self._stale = False
            error = self._undo_txn()
            if error is not None:
                raise error
        finally:
            phys.release()

    # -- user savepoints ------------------------------------------------------

    def _user_savepoint(self, frame: Frame, name: str) -> None:
        t = self._t
        assert t.id is not None
        sp = self.phys.push_savepoint(self, t.id, t.last_write)
        sp.user_live = True
        need = frame.last_foreign(t.id)
        recent = t.recent
        if recent is None or recent.seq < need:
            # The savepoint doubles as the undo point the next statement needs.
            self._new_point(frame, sp, need)
        t.user_sps.setdefault(name, []).append(sp)

    def _forget_user_savepoints_after(self, sp: Savepoint) -> None:
        stack = self.phys.stack
        if not stack.holds(sp):
            return
        later = {id(s) for s in stack.items[sp.index + 1 :]}
        user_sps = self._t.user_sps
        for key in list(user_sps):
            kept = [s for s in user_sps[key] if id(s) not in later]
            for s in user_sps[key]:
                if id(s) in later:
                    s.user_live = False
            if kept:
                user_sps[key] = kept
            else:
                del user_sps[key]

    def _user_release(self, name: str) -> bool:
        """Release a user savepoint; False when the name is unknown."""
        user_sps = self._t.user_sps
        sps = user_sps.get(name)
        if not sps:
            return False
        sp = sps[-1]
        # RELEASE also releases every savepoint this connection took after it.
        self._forget_user_savepoints_after(sp)
        sps = user_sps.get(name, [])
        if sps and sps[-1] is sp:
            sps.pop()
            if not sps:
                del user_sps[name]
        sp.user_live = False
        return True

    def _user_rollback_to(self, frame: Frame, name: str) -> bool:
        """Roll back to a user savepoint; False when the name is unknown."""
        t = self._t
        sps = t.user_sps.get(name)
        if not sps:
            return False
        sp = sps[-1]
        phys = self.phys
        if phys.aborted_by is self:
            self.clear_abort()
            # Refused below, the transaction stays aborted, as it is now.
            t.doomed = True
        plan = self._undo_point(frame, sp)
        if plan is Undo.IMPOSSIBLE:
            assert t.id is not None
            raise InterleavedRollbackError(
                f"{self.describe()} rolls back to savepoint {name!r}, but another transaction wrote "
                f"after this connection's writes since the savepoint ({frame.foreign_sql(t.id)[:200]!r}). "
                "Production would keep that write; one shared transaction cannot. Nothing was undone."
            )
        self._forget_user_savepoints_after(sp)
        if isinstance(plan, Savepoint):
            phys.rollback_to(plan, self)
        self._lost_writes_after(sp)
        t.doomed = False
        return True

    # -- notifications from the physical side --------------------------------

    def savepoint_lost(self, sp: Savepoint) -> None:
        t = self._t
        points = t.points
        if any(point is sp for point, _ in points):
            t.points = points = [entry for entry in points if entry[0] is not sp]
            t.recent = points[-1][0] if points else None
        user_sps = t.user_sps
        for key in list(user_sps):
            kept = [s for s in user_sps[key] if s is not sp]
            if kept:
                user_sps[key] = kept
            else:
                del user_sps[key]

    def frame_closed(self, frame: Frame) -> None:
        if self._frame is not frame:
            return
        if self.holds_work() or (self._t.id is not None and self._t.doomed):
            self._stale = True
        self._frame = None
        self._t = Txn()

    def returned(self) -> Optional[SaRollbackError]:
        """The pool takes the connection back: end it like a rollback would."""
        if self._t.id is None and not self._stale:
            self.end()
            return None
        phys = self.phys
        phys.acquire("to end a connection the pool takes back")
        try:
            if self._ended:
                return None
            error: Optional[SaRollbackError] = None
            if self._stale:
                self._stale = False
                self._end_txn()
            else:
                error = self._undo_txn()
            self.end()
            return error
        finally:
            phys.release()

    def end(self) -> None:
        """No one may use this connection any more."""
        self._ended = True
        if self._frame is not None:
            self._frame.logicals.discard(self)

    def _closed_error(self) -> Exception:
        return StaleConnectionError(f"{self.describe()} is closed; it was returned to the pool.")
