"""A frame's rollback: one round trip that also checks deferred constraints, puts sequences back, and
lists outside connections.

Split from :mod:`._physical`, which calls :func:`rollback_frame` when a scope
ends. Everything the rollback of a frame needs goes into that one string:

* ``SET CONSTRAINTS ALL IMMEDIATE`` first, when the frame wrote and the check is on;
* the sequences' restore statement (:mod:`._sequences`), before a top-level
  ``ROLLBACK`` (or after it in an aborted transaction), after ``ROLLBACK TO
  SAVEPOINT`` in a nested frame;
* the outside-connection count (:mod:`._outside`) last, where psycopg2, which
  keeps only the last result of a multi-statement string, returns it. Only
  when it shows more backends than our own is a second round trip sent, to
  list them.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from . import _sequences as sequences
from ._drivers import IDLE, INERROR, DatabaseKey, Driver
from ._history import Frame, SavepointStack
from ._outside import OUTSIDE
from .errors import DeferredConstraintError


class Rollable(Protocol):
    """What :func:`rollback_frame` needs of the physical connection (``_physical.Physical``)."""

    key: DatabaseKey
    driver: Driver
    conn: Any
    stack: SavepointStack

    def alive(self) -> bool: ...

    def execute(self, sql: str) -> None: ...

    def fetch(self, sql: str) -> list[tuple[Any, ...]]: ...


def rollback_frame(phys: Rollable, frame: Frame, check: bool) -> None:
    """Roll back to the frame's base, checking deferred constraints first when asked."""
    base = frame.base
    # Drivers that cannot return the rows of a multi-statement string (the async ones) are not checked.
    probe = OUTSIDE.probe(phys.key.dbname, in_transaction=not base.is_start) if phys.driver.can_fetch else ""
    if base.is_start and frame.reset_sql:
        _rollback_outer_restoring(phys, frame, check, probe)
        return
    if base.is_start:
        try:
            rows = phys.driver.rollback_outer(phys.conn, check, probe)
        except Exception as exc:
            phys.stack.clear()
            if check and phys.alive():
                raise deferred_error(phys, frame, exc) from exc
            raise
        phys.stack.clear()
        _report_outside(phys, frame, rows, top=True)
        return
    undo = phys.driver.undo_savepoint(phys.conn, base.name)
    if frame.reset_sql:
        undo = f"{undo}; {frame.reset_sql}"
    sql = f"SET CONSTRAINTS ALL IMMEDIATE; {undo}" if check else undo
    try:
        rows = _run(phys, sql, probe)
    except Exception as exc:
        if not (check and phys.alive()):
            raise
        phys.execute(undo)
        phys.stack.cut(base.index)
        raise deferred_error(phys, frame, exc) from exc
    phys.stack.cut(base.index)
    sequences.restored(phys.key.db, phys.key.user, frame)
    _report_outside(phys, frame, rows, top=False)


def _rollback_outer_restoring(phys: Rollable, frame: Frame, check: bool, probe: str) -> None:
    """Put the sequences back and roll back the outer transaction, in one round trip.

    ``setval`` is not transactional: run inside the transaction, it
    survives the ROLLBACK, and it costs no commit (after the ROLLBACK, its
    implicit transaction would commit and wait for the WAL flush, several
    milliseconds). An aborted transaction cannot run it: then it runs
    after the ROLLBACK, outside any transaction, and psycopg2, which still
    believes one is open, is handled by :meth:`Driver.begin_outer`.
    """
    after = f"ROLLBACK; {frame.reset_sql}"
    # The same as Driver.rollback_outer does for psycopg 3's prepared statements.
    forget = phys.driver.forget_prepared(phys.conn)
    prepare = execute = ""
    aborted = phys.driver.status(phys.conn) == INERROR
    if aborted:
        undo = after
    else:
        prepare, execute = sequences.restore_call(phys.conn, frame.reset_sql, deallocated=bool(forget))
        undo = f"{execute or frame.reset_sql}; ROLLBACK"
    sql = forget + prepare + (f"SET CONSTRAINTS ALL IMMEDIATE; {undo}" if check else undo)
    try:
        rows = _run(phys, sql, probe)
    except Exception as exc:
        phys.stack.clear()
        if phys.driver.closed(phys.conn):
            raise
        phys.driver.rollback(phys.conn)
        if not (sequences.lost(phys.conn, "restore", exc) or sequences.dropped(exc)):
            phys.execute(after)
            if check:
                raise deferred_error(phys, frame, exc) from exc
            raise
        # Only the prepared statement was missing, or the test dropped a sequence, which the
        # ROLLBACK brings back: the transaction is rolled back, put them back now.
        rows = _run(phys, after, probe)
    else:
        phys.stack.clear()
        if execute:
            sequences.executed(phys.conn, reused=not prepare)
    sequences.restored(phys.key.db, phys.key.user, frame)
    _report_outside(phys, frame, rows, top=True)


def _run(phys: Rollable, sql: str, probe: str) -> list[tuple[Any, ...]]:
    """Run the rollback, and the probe after it when there is one; the probe's rows."""
    if probe:
        return phys.fetch(f"{sql}; {probe}")
    phys.execute(sql)
    return []


#: seconds between listings of a backend that is not ours: a connection closed just before the end of
#: the test leaves the list only when its server process has exited, a moment after the client closed it
_SETTLE = (0.01, 0.03, 0.1)


def _report_outside(phys: Rollable, frame: Frame, rows: list[tuple[Any, ...]], top: bool) -> None:
    """More backends on the database than our own: list them (a second round trip, only then) and report."""
    database = phys.key.dbname
    if not rows or not OUTSIDE.suspicious(database, rows):
        return
    unknown = OUTSIDE.unknown(_listing(phys, top))
    for delay in _SETTLE:
        if not unknown:
            return
        time.sleep(delay)
        still = {row[0] for row in _listing(phys, top)}
        unknown = [row for row in unknown if row[0] in still]
    if unknown:
        # Raised by the scope when it closes, after every database is rolled back.
        frame.scope.report(OUTSIDE.error(frame.scope.label, database, unknown))


def _listing(phys: Rollable, top: bool) -> list[tuple[Any, ...]]:
    rows = phys.fetch(OUTSIDE.listing(in_transaction=not top))
    if top and phys.driver.status(phys.conn) != IDLE:
        phys.driver.rollback(phys.conn)  # psycopg 3 began a transaction for the listing
    return rows


def deferred_error(phys: Rollable, frame: Frame, exc: BaseException) -> DeferredConstraintError:
    constraint = phys.driver.constraint_name(exc)
    named = f"constraint {constraint!r}" if constraint else "a deferred constraint"
    detail = str(exc).strip().replace("\n", " ")
    return DeferredConstraintError(
        f"{frame.scope.label}: {named} on {phys.key.describe()} is violated by what the test wrote "
        f"({detail}). In production the COMMIT would have failed. sa_rollback checks deferred "
        "constraints (SET CONSTRAINTS ALL IMMEDIATE) before rolling back; fix the data, or "
        f"{frame.scope.deferred_hint} to skip the check.",
        constraint,
    )
