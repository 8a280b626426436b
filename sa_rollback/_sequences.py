"""Sequences put back where they stood when a scope's frame opened (``reset_sequences``).

Sequences are not transactional: a rollback leaves ``nextval`` where the test
took it. A frame that resets them needs each sequence's position when it
opened (its *reference*), turned into one statement (:func:`restore_sql`) that
is appended to the frame's rollback, in the same round trip. On the server,
that statement compares each sequence with its reference and calls ``setval``
only on the ones that moved. Planning it costs more than running it, so a
top-level rollback sends it as a prepared statement, prepared once per server
session with the positions as parameters (:func:`restore_call`).

Reading every position costs about a microsecond or more per sequence on the
server, so it is done once per database, not per test: after a frame's
restore, its database's sequences stand exactly at that frame's reference,
and the next frame that opens there takes it as its own (:data:`_known`) with
no read. What could move a sequence unseen makes those positions stale
(:data:`_stale`): a frame that does not reset them (:func:`forget`), a
connection used outside every rollback scope (:func:`untracked`, from the
checkout listener and the release of adopted connections). The next frame
then compares them with the sequences on the server and takes anew only the
ones that moved (:data:`_MOVED`), which costs about half of reading them all.
A change of the set of sequences (DDL on a connection sa_rollback does not
see), which the frame checks in the round trip that begins its transaction
(:data:`FINGERPRINT`), and another role, which may not read the same
sequences, make it read them all.
"""

from __future__ import annotations

import itertools
import secrets
import weakref
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ._history import Frame

from ._stats import STATS

#: each readable sequence of the database: its oid, last value (NULL before its first nextval), start
#: (the privilege check is guarded by the relkind, as in the pg_sequences view: the planner may run
#: it on pg_class rows that are not sequences, and it raises on those). Each sequence's pg_class row
#: is looked up by its oid (OFFSET 0 keeps the lookup a nested loop): a join would scan the whole
#: of pg_class, most of it tables, indexes and the catalogs, 0.03 ms of 0.06 at 5 sequences.
SNAPSHOT = (
    "SELECT c.oid::int8, pg_sequence_last_value(c.oid), s.seqstart"
    " FROM pg_sequence s JOIN LATERAL (SELECT * FROM pg_class c WHERE c.oid = s.seqrelid OFFSET 0) c ON true"
    " WHERE c.relkind = 'S' AND NOT pg_is_other_temp_schema(c.relnamespace)"
    " AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT,USAGE') END"
)

#: the set of sequences, cheaply: created ones get a new, larger oid, dropped ones lower the count
FINGERPRINT = "SELECT count(*)::int8, coalesce(max(seqrelid)::int8, 0) FROM pg_sequence"

#: SNAPSHOT folded into one row of three array literals (oids, positions, starts), with the FINGERPRINT:
#: the client pastes them into the restore statement as they are, without a value-by-value conversion
_SNAPSHOT_AND_FINGERPRINT = SNAPSHOT.replace(
    "SELECT c.oid::int8, pg_sequence_last_value(c.oid), s.seqstart FROM pg_sequence s",
    "SELECT array_agg(c.oid)::text, array_agg(pg_sequence_last_value(c.oid))::text, array_agg(s.seqstart)::text,"
    " (SELECT count(*) FROM pg_sequence)::int8, (SELECT coalesce(max(seqrelid)::int8, 0) FROM pg_sequence)"
    " FROM pg_sequence s",
    1,
)

#: database (host, port, name) -> (restore statement, fingerprint) of the positions that hold there now
#: (and the role they were read as: another may not read the same sequences)
_known: dict[tuple[Any, ...], tuple[str, tuple[int, ...], str]] = {}
#: the same, for positions that may have moved since (see :func:`reference`)
_stale: dict[tuple[Any, ...], tuple[str, tuple[int, ...], str]] = {}


def untracked() -> None:
    """A connection works outside every scope: it may move sequences; every known position may be stale."""
    if _known:
        _stale.update(_known)
        _known.clear()


def forget(db: tuple[Any, ...]) -> None:
    """A frame that does not put sequences back opens on ``db``: its known positions may go stale."""
    known = _known.pop(db, None)
    if known is not None:
        _stale[db] = known


def restored(db: tuple[Any, ...], role: str, frame: Frame) -> None:
    """``frame`` (on ``db`` as ``role``) was rolled back: if it puts sequences back, ``db``'s stand at its reference."""
    if frame.reset_sql:
        _known[db] = (frame.reset_sql, frame.reset_fp, role)
        _stale.pop(db, None)


#: guards a condition on the join with pg_sequence: one on ``b`` alone runs before the join, also on
#: a sequence dropped since (the set of sequences changed), and raises "could not open relation"
_EXISTING = " CASE WHEN s.seqrelid IS NOT NULL THEN "

#: what the restore raises on a sequence the test dropped (in a cast of a value, not a constant, which the
#: planner would fold, and raise, when it prepares the statement)
DROPPED = "sa_rollback: a sequence dropped by the test"

#: the restore statement, for three arrays: oids, their positions (NULL: not called yet), their starts.
#: A sequence the test dropped cannot be put back before the ROLLBACK that brings it back, at its
#: moved position: the statement raises DROPPED, and the rollback sends it again after (see _rollback)
_RESTORE_BODY = (
    "SELECT count(setval(b.o, coalesce(b.v, b.st), b.v IS NOT NULL))"
    " FROM unnest({}) AS b(o, v, st) LEFT JOIN pg_sequence s ON s.seqrelid = b.o"
    f" WHERE CASE WHEN s.seqrelid IS NULL THEN (b.o::text || ': {DROPPED}')::int > 0"
    " ELSE pg_sequence_last_value(b.o) IS DISTINCT FROM b.v END"
)
_HEAD, _TAIL = _RESTORE_BODY.split("{}")


def restore_sql(oids: str, lasts: str, starts: str) -> str:
    """The statement that puts back every sequence of three array literals (from the snapshot) that moved.

    A sequence that had not handed out a value yet goes back to its start, not
    yet called. Arrays, not a ``VALUES`` list, which the server takes about
    half a millisecond to parse and plan at 100 rows.
    :func:`restore_call` sends the same statement prepared, where it can.
    """
    return f"{_HEAD}'{oids}'::oid[], '{lasts}'::int8[], '{starts}'::int8[]{_TAIL}"


class _Session:
    """What a physical connection's server session holds of ours: prepared statements."""

    __slots__ = ("failures", "names")

    def __init__(self) -> None:
        #: statement (restore, FINGERPRINT, snapshot) -> the name it is prepared under, and psycopg 3's
        #: count of its own prepared statements then (see _psycopg_prepared_idx)
        self.names: dict[str, tuple[str, Optional[int]]] = {}
        #: prepared statements found missing in a row: past _MAX_FAILURES, the plain statements are sent
        self.failures = 0


_sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
_counter = itertools.count(1)
#: a run's prepared statements never share a name with anything else the session prepared
_TOKEN = secrets.token_hex(4)
#: a connection that loses its prepared statements this many times in a row (a transaction-pooling
#: PgBouncer hands out another server session each time) gets the plain statements from then on
_MAX_FAILURES = 3


def _psycopg_prepared_idx(conn: Any) -> Optional[int]:
    """psycopg 3's count of prepared statements, or None where it is not what is known.

    psycopg deallocates all prepared statements (``DEALLOCATE ALL``, ours too)
    only when it holds some of its own. Ours are used only while it holds
    none, and trusted while this count stands still: it advances with each
    statement psycopg prepares.
    """
    manager = getattr(conn, "_prepared", None)
    idx = getattr(manager, "_prepared_idx", None)
    pending = getattr(manager, "_to_flush", None)
    held = getattr(manager, "_names", None)
    if not isinstance(idx, int) or pending is None or pending or held is None or held:
        return None  # a DEALLOCATE psycopg sends after ours, or may send later, unseen
    return idx


def plain_only(conn: Any) -> None:
    """``conn`` shares its server session with a connection whose prepared statements are not seen: prepare nothing.

    psycopg's async engine: the shared connection is a sync ``Connection``
    over the ``AsyncConnection``'s libpq one, and the async connection's
    ``DEALLOCATE ALL`` would take ours unseen.
    """
    session = _sessions.get(conn)
    if session is None:
        session = _sessions[conn] = _Session()
    session.failures = _MAX_FAILURES


def _prepared(conn: Any, kind: str, body: str, params: str, args: str, deallocated: bool) -> Optional[tuple[str, str]]:
    """(PREPARE, EXECUTE) of ``body`` on ``conn``'s session (PREPARE empty when it is prepared), or None: send it plain.

    ``deallocated``: a ``DEALLOCATE ALL`` precedes them in the same string.
    """
    session = _sessions.get(conn)
    if session is None:
        session = _sessions[conn] = _Session()
    if session.failures >= _MAX_FAILURES:
        return None
    idx: Optional[int] = None
    if hasattr(conn, "pgconn"):  # psycopg 3 (psycopg2 prepares nothing of its own)
        idx = _psycopg_prepared_idx(conn)
        if idx is None:
            return None
    if deallocated:
        session.names.clear()
    held = session.names.get(kind)
    if held is not None and held[1] == idx:
        return "", f"EXECUTE {held[0]}{args}"
    # Any earlier one is gone: deallocated in this string, or by psycopg, or found missing.
    name = f"sa_rollback_{kind}_{_TOKEN}_{next(_counter)}"
    session.names[kind] = (name, idx)
    return f"PREPARE {name}{params} AS {body}; ", f"EXECUTE {name}{args}"


def restore_call(conn: Any, sql: str, deallocated: bool) -> tuple[str, str]:
    """``sql`` (from :func:`restore_sql`) as the top-level rollback sends it on ``conn``: (prepare, execute).

    ("", ""): send ``sql`` itself.

    Planning the statement costs more than running it (0.05 ms at 5
    sequences, 0.07 ms at 100): it is prepared once per server session, with
    the arrays as parameters, and executed from then on. ``deallocated``: a
    ``DEALLOCATE ALL`` precedes it in the same string. The ``PREPARE`` (when
    one is needed) goes first, before anything in the string can fail, so
    that it is known to hold afterwards. A prepared statement that
    disappeared anyway (the application's ``DEALLOCATE ALL``) fails the
    ``EXECUTE``; the rollback then sends the plain statement (:func:`lost`).
    """
    body = _RESTORE_BODY.format("$1, $2, $3")
    args = f"({sql[len(_HEAD) : -len(_TAIL)]})"
    return _prepared(conn, "restore", body, "(oid[], int8[], int8[])", args, deallocated) or ("", "")


def executed(conn: Any, reused: bool) -> None:
    """A round trip that carried a statement of :func:`_prepared` succeeded; ``reused``: without a PREPARE."""
    session = _sessions.get(conn)
    if session is not None and reused:
        session.failures = 0  # a statement prepared by an earlier round trip was still there


def lost(conn: Any, kind: str, exc: BaseException) -> bool:
    """A round trip that carried the ``kind`` statement of :func:`_prepared` failed with ``exc``: was it missing?

    Then the next round trip prepares it anew. Any other failure leaves it as
    it was. The others are left too: they may still be there, and are
    prepared again only once found missing, so that none is left behind.
    """
    session = _sessions.get(conn)
    code = getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)
    if session is None or code != _UNDEFINED_PREPARED:
        return False
    session.names.pop(kind, None)
    session.failures += 1
    return True


def dropped(exc: BaseException) -> bool:
    """Did the restore fail on a sequence the test dropped (:data:`DROPPED`)?"""
    return DROPPED in str(exc)


#: SQLSTATE invalid_sql_statement_name: "prepared statement ... does not exist"
_UNDEFINED_PREPARED = "26000"


#: psycopg2.extensions.STATUS_BEGIN: psycopg2 believes a transaction is open (it sends no BEGIN)
_PSYCOPG2_STATUS_BEGIN = 2


def reference(driver_name: str, conn: Any, db: tuple[Any, ...], role: str, begin: bool) -> tuple[str, tuple[int, ...]]:
    """The restore statement of a frame opening on ``conn``, and the fingerprint it holds for.

    ``begin``: the connection is idle on the server and the outer transaction
    starts here. Where the driver allows, the BEGIN goes in the same round
    trip, in place of the one the driver would send on its own, with the
    fingerprint check, or with the read of every position when none is known.
    """
    known = _known.pop(db, None)  # the frame's statements may move them
    stale = _stale.pop(db, None)
    if known is not None and known[2] != role:
        known = None
    if stale is not None and stale[2] != role:
        stale = None
    if known is not None:
        row = _open_query(driver_name, conn, "fingerprint", FINGERPRINT, begin)[0]
        fingerprint = (int(row[0]), int(row[1]))
        if fingerprint == known[1]:
            return known[0], fingerprint
        begin = False
    elif stale is not None:
        oids, lasts, starts = _arrays(stale[0])
        args = f"('{oids}'::oid[], '{lasts}'::int8[])"
        moved = _MOVED.format(args[1:-1])
        row = _open_query(driver_name, conn, "moved", moved, begin, _MOVED.format("$1, $2"), "(oid[], int8[])", args)[0]
        if (int(row[0]), int(row[1])) == stale[1]:
            if row[2] is not None:  # put the new positions of the ones that moved in the reference
                values = lasts[1:-1].split(",")
                for at, value in zip(row[2][1:-1].split(","), row[3][1:-1].split(",")):
                    values[int(at) - 1] = value
                lasts = "{" + ",".join(values) + "}"
            return restore_sql(oids, lasts, starts), stale[1]
        begin = False
    snapshot = _open_query(driver_name, conn, "snapshot", _SNAPSHOT_AND_FINGERPRINT, begin)
    oids, lasts, starts, count, newest = snapshot[0]
    if oids is None:
        return "", (-1,)  # nothing to put back; nothing is remembered either
    return restore_sql(oids, lasts, starts), (int(count), int(newest))


#: for positions that may have moved (oids, positions): the FINGERPRINT, and the ones that moved as
#: two array literals, their places in the arrays (from 1) and their positions now
_MOVED = (
    "SELECT (SELECT count(*) FROM pg_sequence)::int8, (SELECT coalesce(max(seqrelid)::int8, 0) FROM pg_sequence),"
    " array_agg(b.i)::text, array_agg(pg_sequence_last_value(b.o))::text"
    " FROM unnest({}) WITH ORDINALITY AS b(o, v, i) JOIN pg_sequence s ON s.seqrelid = b.o"
    " WHERE" + _EXISTING + "pg_sequence_last_value(b.o) IS DISTINCT FROM b.v END"
)


def _arrays(sql: str) -> tuple[str, str, str]:
    """The three array literals of a :func:`restore_sql` statement (numbers and NULL: no quote inside)."""
    parts = sql[len(_HEAD) : -len(_TAIL)].split("'")
    return parts[1], parts[3], parts[5]


def _open_query(
    driver_name: str, conn: Any, kind: str, sql: str, begin: bool, body: str = "", params: str = "", args: str = ""
) -> list[tuple[Any, ...]]:
    """:func:`_query`, prepared where the transaction begins in the same round trip.

    ``body``, ``params``, ``args``: ``sql`` as a statement with parameters, their types, their values.

    Planning the snapshot costs about 0.1 ms, the fingerprint 0.02 ms. Only
    there: a prepared statement found missing has then failed nothing but the
    BEGIN, which is rolled back before the plain statement is sent. Inside a
    transaction (a frame in a data scope), it would abort the scope's
    transaction.
    """
    calls = _prepared(conn, kind, body or sql, params, args, deallocated=False) if begin else None
    if calls is None:
        return _query(driver_name, conn, sql, begin)
    prepare, execute = calls
    try:
        rows = _query(driver_name, conn, prepare + execute, begin)
    except Exception as exc:
        if not lost(conn, kind, exc):
            raise
        _rollback_begun(driver_name, conn)
        return _query(driver_name, conn, sql, begin)
    executed(conn, reused=not prepare)
    return rows


def _rollback_begun(driver_name: str, conn: Any) -> None:
    """Roll back the transaction that a failed :func:`_query` with ``begin`` left aborted."""
    STATS.round_trips += 1
    if driver_name == "psycopg":
        conn.pgconn.exec_(b"ROLLBACK")  # psycopg did not see the BEGIN either
    else:
        conn.rollback()


def _query(driver_name: str, conn: Any, sql: str, begin: bool) -> list[tuple[Any, ...]]:
    """Run ``sql`` (after a BEGIN, if ``begin``) in one round trip; its rows."""
    STATS.round_trips += 1
    if driver_name == "psycopg":
        if begin:
            return _begin_psycopg3(conn, sql)
        with conn.cursor() as cur:
            cur.execute(sql, prepare=False)
            rows: list[tuple[Any, ...]] = cur.fetchall()
            return rows
    with conn.cursor() as cur:
        # After a textual ROLLBACK, psycopg2 still believes a transaction is
        # open and sends no BEGIN of its own: send it here.
        explicit = begin and conn.status == _PSYCOPG2_STATUS_BEGIN
        cur.execute(f"BEGIN; {sql}" if explicit else sql)
        rows = cur.fetchall()
        return rows


def _begin_psycopg3(conn: Any, sql: str) -> list[tuple[Any, ...]]:
    """BEGIN and ``sql`` in one round trip, below psycopg 3's cursor (which would send its own BEGIN)."""
    from psycopg import errors, pq

    result = conn.pgconn.exec_(f"BEGIN; {sql}".encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise errors.error_from_result(result, encoding=conn.info.encoding)
    return [
        tuple(None if v is None else v.decode() for v in (result.get_value(row, col) for col in range(result.nfields)))
        for row in range(result.ntuples)
    ]
