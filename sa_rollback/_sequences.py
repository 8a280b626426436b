"""Sequences put back where they stood when a scope's frame opened (``reset_sequences``).

Sequences are not transactional: a rollback leaves ``nextval`` where the test
took it. A frame that resets them reads every sequence's position once, when
it opens (:data:`SNAPSHOT`), and turns it into one statement
(:func:`restore_sql`) that is appended to the frame's rollback, in the same
round trip. On the server, that statement compares each sequence with its
recorded position and calls ``setval`` only on the ones that moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

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


def _literal(value: Optional[int]) -> str:
    return "NULL" if value is None else str(int(value))


def restore_sql(rows: Sequence[Sequence[Any]]) -> str:
    """The statement that puts back every sequence of ``rows`` (from :data:`SNAPSHOT`) that moved.

    A sequence that had not handed out a value yet goes back to its start, not
    yet called. Empty when the database has no sequence.
    """
    if not rows:
        return ""
    values = ", ".join(
        f"({_literal(oid)}::oid, {_literal(last)}::int8, {_literal(start)}::int8)" for oid, last, start in rows
    )
    return (
        "SELECT count(setval(b.o::regclass, coalesce(b.v, b.st), b.v IS NOT NULL))"
        f" FROM (VALUES {values}) AS b(o, v, st) JOIN pg_sequence s ON s.seqrelid = b.o"
        " WHERE pg_sequence_last_value(b.o::regclass) IS DISTINCT FROM b.v"
    )


#: psycopg2.extensions.STATUS_BEGIN: psycopg2 believes a transaction is open (it sends no BEGIN)
_PSYCOPG2_STATUS_BEGIN = 2


def snapshot(driver_name: str, conn: Any, begin: bool) -> str:
    """Read the database's sequences on ``conn`` (one round trip); return their restore statement.

    ``begin``: the connection is idle on the server and the outer transaction
    starts here. Where the driver allows, the BEGIN goes in the same round
    trip, in place of the one the driver would send on its own.
    """
    STATS.round_trips += 1
    if driver_name == "psycopg":
        if begin:
            return restore_sql(_begin_psycopg3(conn))
        with conn.cursor() as cur:
            cur.execute(SNAPSHOT, prepare=False)
            return restore_sql(cur.fetchall())
    with conn.cursor() as cur:
        # After a textual ROLLBACK, psycopg2 still believes a transaction is
        # open and sends no BEGIN of its own: send it here.
        explicit = begin and conn.status == _PSYCOPG2_STATUS_BEGIN
        cur.execute(f"BEGIN; {SNAPSHOT}" if explicit else SNAPSHOT)
        return restore_sql(cur.fetchall())


def _begin_psycopg3(conn: Any) -> list[tuple[Optional[int], ...]]:
    """BEGIN and the snapshot in one round trip, below psycopg 3's cursor (which would send its own BEGIN)."""
    from psycopg import errors, pq

    result = conn.pgconn.exec_(f"BEGIN; {SNAPSHOT}".encode())
    if result.status != pq.ExecStatus.TUPLES_OK:
        raise errors.error_from_result(result, encoding=conn.info.encoding)
    values = ((result.get_value(row, col) for col in range(result.nfields)) for row in range(result.ntuples))
    return [tuple(None if v is None else int(v) for v in row) for row in values]
