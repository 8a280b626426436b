"""Sequences put back where they stood when a scope's frame opened (``reset_sequences``).

Sequences are not transactional: a rollback leaves ``nextval`` where the test
took it. A frame that resets them needs each sequence's position when it
opened (its *reference*), turned into one statement (:func:`restore_sql`) that
is appended to the frame's rollback, in the same round trip. On the server,
that statement compares each sequence with its reference and calls ``setval``
only on the ones that moved.

Reading every position costs about a microsecond or more per sequence on the
server, so it is done once per database, not per test: after a frame's
restore, its database's sequences stand exactly at that frame's reference,
and the next frame that opens there takes it as its own (:data:`_known`) with
no read. What could move a sequence unseen makes it forget: a frame that does
not reset them (:func:`forget`), a connection used outside every rollback
scope (:func:`untracked`, from the checkout listener and the release of
adopted connections), and a change of the set of sequences (DDL on a
connection sa_rollback does not see), which the frame checks in the round
trip that begins its transaction (:data:`FINGERPRINT`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ._history import Frame

from ._stats import STATS

#: each readable sequence of the database: its oid, last value (NULL before its first nextval), start
#: (the privilege check is in the select list, as in the pg_sequences view: in WHERE, the planner
#: may run it on pg_class rows that are not sequences, and it raises on those)
SNAPSHOT = (
    "SELECT c.oid::int8, pg_sequence_last_value(c.oid), s.seqstart"
    " FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid"
    " WHERE c.relkind = 'S' AND NOT pg_is_other_temp_schema(c.relnamespace)"
    " AND CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(c.oid, 'SELECT,USAGE') END"
)

#: the set of sequences, cheaply: created ones get a new, larger oid, dropped ones lower the count
FINGERPRINT = "SELECT count(*)::int8, coalesce(max(seqrelid)::int8, 0) FROM pg_sequence"

#: SNAPSHOT with the FINGERPRINT in every row
_SNAPSHOT_AND_FINGERPRINT = SNAPSHOT.replace(
    " FROM pg_sequence s",
    ", (SELECT count(*) FROM pg_sequence)::int8, (SELECT coalesce(max(seqrelid)::int8, 0) FROM pg_sequence)"
    " FROM pg_sequence s",
    1,
)

#: database (host, port, name) -> (restore statement, fingerprint) of the positions that hold there now
_known: dict[tuple[Any, ...], tuple[str, tuple[int, ...]]] = {}


def untracked() -> None:
    """A connection works outside every scope: it may move sequences; forget every known position."""
    if _known:
        _known.clear()


def forget(db: tuple[Any, ...]) -> None:
    """A frame that does not put sequences back opens on ``db``."""
    _known.pop(db, None)


def restored(db: tuple[Any, ...], frame: Frame) -> None:
    """``frame`` was rolled back: if it puts sequences back, ``db``'s stand at its reference."""
    if frame.reset_sql:
        _known[db] = (frame.reset_sql, frame.reset_fp)


def _array(values: Sequence[Optional[int]]) -> str:
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


def restore_sql(rows: Sequence[Sequence[Any]]) -> str:
    """The statement that puts back every sequence of ``rows`` (from :data:`SNAPSHOT`) that moved.

    A sequence that had not handed out a value yet goes back to its start, not
    yet called. Empty when the database has no sequence. Three array literals,
    not a ``VALUES`` list, which the server takes about half a millisecond to
    parse and plan at 100 rows. The join skips a sequence the test dropped (it
    comes back with the rollback).
    """
    if not rows:
        return ""
    oids, lasts, starts = zip(*((oid, last, start) for oid, last, start in rows))
    return (
        "SELECT count(setval(b.o, coalesce(b.v, b.st), b.v IS NOT NULL))"
        f" FROM unnest('{_array(oids)}'::oid[], '{_array(lasts)}'::int8[], '{_array(starts)}'::int8[]) AS b(o, v, st)"
        " JOIN pg_sequence s ON s.seqrelid = b.o WHERE pg_sequence_last_value(b.o) IS DISTINCT FROM b.v"
    )


#: psycopg2.extensions.STATUS_BEGIN: psycopg2 believes a transaction is open (it sends no BEGIN)
_PSYCOPG2_STATUS_BEGIN = 2


def reference(driver_name: str, conn: Any, db: tuple[Any, ...], begin: bool) -> tuple[str, tuple[int, ...]]:
    """The restore statement of a frame opening on ``conn``, and the fingerprint it holds for.

    ``begin``: the connection is idle on the server and the outer transaction
    starts here. Where the driver allows, the BEGIN goes in the same round
    trip, in place of the one the driver would send on its own, with the
    fingerprint check, or with the read of every position when none is known.
    """
    known = _known.pop(db, None)  # the frame's statements may move them
    if known is not None:
        rows = _query(driver_name, conn, FINGERPRINT, begin)
        fingerprint = tuple(rows[0])
        if fingerprint == known[1]:
            return known[0], fingerprint
        begin = False
    rows = _query(driver_name, conn, _SNAPSHOT_AND_FINGERPRINT, begin)
    if not rows:
        return "", (-1,)  # nothing to put back; nothing is remembered either
    return restore_sql([row[:3] for row in rows]), tuple(rows[0][3:])


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
        tuple(None if v is None else int(v) for v in (result.get_value(row, col) for col in range(result.nfields)))
        for row in range(result.ntuples)
    ]
