"""Connections held across a scope's boundary: they join the scope, or fail loudly; never a real commit.

Every "gone afterwards" check is made from a plain psycopg connection outside
SQLAlchemy (the ``outside`` fixture), on psycopg2 and psycopg 3.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import sa_rollback
from sa_rollback._state import STATE

from ._compat import create_engine
from ._models import Item
from .conftest import driver_url


def count(conn: sa.Connection | Session, name: str | None = None) -> int:
    where = "" if name is None else " WHERE name = :n"
    return int(conn.execute(sa.text("SELECT count(*) FROM items" + where), {"n": name}).scalar_one())


def insert(conn: sa.Connection | Session, name: str) -> None:
    conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})


def test_session_read_before_the_scope_joins_it(engine: sa.Engine, outside) -> None:
    """The issue's reproduction: a committed object whose refresh opened a transaction before the scope."""
    session = Session(engine)
    item = Item(name="master")
    session.add(item)
    session.commit()
    assert item.id  # the refresh: the session now holds a checked-out connection, in a transaction
    try:
        with sa_rollback.rollback_scope():
            item.name = "changed"
            session.commit()
            assert outside("SELECT name FROM items") == [("master",)]
            with engine.connect() as conn:  # every connection of the scope sees the commit
                assert count(conn, "changed") == 1
        assert outside("SELECT name FROM items") == [("master",)]
        # Between scopes the session is the wider fixture's again: its work is real.
        session.expire_all()
        assert item.name == "master"
        item.name = "between"
        session.commit()
        assert outside("SELECT name FROM items") == [("between",)]
    finally:
        session.close()
        outside("DELETE FROM items RETURNING id")


def test_connection_opened_before_and_used_in_two_scopes(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))  # autobegun: a read-only transaction is open
    try:
        for name in ("first", "second"):
            with sa_rollback.rollback_scope():
                assert count(conn) == 0
                insert(conn, name)
                conn.commit()
                assert count(conn, name) == 1
                with engine.connect() as other:
                    assert count(other, name) == 1
            assert outside("SELECT count(*) FROM items") == [(0,)]
        assert count(conn) == 0
        conn.commit()
    finally:
        conn.close()


def test_idle_held_connection_joins_and_rolls_back(engine: sa.Engine, outside) -> None:
    conn = engine.connect()  # checked out, no statement yet: nothing open on the server
    try:
        with sa_rollback.rollback_scope():
            insert(conn, "x")
            conn.rollback()
            assert count(conn) == 0
            insert(conn, "y")
            conn.commit()
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_uncommitted_writes_from_before_fail_loudly(engine: sa.Engine, outside) -> None:
    with sa_rollback.rollback_scope():
        pass  # the listeners are installed: the checkout below is noted with its line (first in a worker, say)
    conn = engine.connect()
    insert(conn, "before")  # uncommitted, made before the scope: line named in the error
    try:
        with sa_rollback.rollback_scope():
            with pytest.raises(sa_rollback.HeldConnectionError) as info:
                insert(conn, "inside")
            message = str(info.value)
            assert "checked out before the current rollback scope began" in message
            assert "The statement was not run." in message
            assert "test_held.py" in message and "test_uncommitted_writes_from_before_fail_loudly" in message
            assert "session.commit()" in message
            assert outside("SELECT count(*) FROM items") == [(0,)]  # ran nowhere
            conn.rollback()  # undoes "before", as production would, and joins the scope
            assert count(conn) == 0
            insert(conn, "inside")
            conn.commit()
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_commit_of_writes_from_before_fails_and_ends_them(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    insert(conn, "before")
    try:
        with sa_rollback.rollback_scope():
            with pytest.raises(sa_rollback.HeldConnectionError, match="The commit failed, and those writes"):
                conn.commit()
            conn.rollback()  # what SQLAlchemy asks for after a failed commit
            assert count(conn) == 0  # the failed commit ended that transaction, as in production
            insert(conn, "inside")
            conn.commit()
            assert count(conn) == 1
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_writes_from_before_untouched_by_a_scope_that_does_not_use_them(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    insert(conn, "before")
    try:
        with sa_rollback.rollback_scope():
            with engine.begin() as other:
                insert(other, "inside")
        conn.commit()  # the wider fixture's own commit, after the scope: real, as in production
        assert outside("SELECT name FROM items") == [("before",)]
    finally:
        conn.close()
        outside("DELETE FROM items RETURNING id")


def test_returned_inside_the_scope_unused_rolls_back_the_real_transaction(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    insert(conn, "before")
    with sa_rollback.rollback_scope():
        conn.close()  # the pool's reset-on-return undoes "before", as it would in production
    with engine.connect() as again:
        assert count(again) == 0
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_aborted_transaction_from_before_fails_then_goes_on(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    with pytest.raises(sa.exc.DBAPIError):
        conn.execute(sa.text("SELECT 1/0"))
    try:
        with sa_rollback.rollback_scope():
            with pytest.raises(sa.exc.DBAPIError, match="aborted"):
                conn.execute(sa.text("SELECT 1"))
            conn.rollback()
            insert(conn, "after")
            conn.commit()
            assert count(conn) == 1
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_scoped_session_kept_across_scopes(url: str, outside) -> None:
    engine = create_engine(url)
    registry = scoped_session(sessionmaker(engine))
    registry.execute(sa.text("SELECT 1"))
    try:
        for name in ("one", "two"):
            with sa_rollback.rollback_scope():
                registry.add(Item(name=name))
                registry.commit()
                assert [i.name for i in registry.query(Item)] == [name]
            assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        registry.remove()
        engine.dispose()


def test_checked_out_inside_then_held_never_becomes_real(engine: sa.Engine, outside) -> None:
    """The reverse: a connection from inside a scope, kept after it, fails between scopes and joins the next."""
    with sa_rollback.rollback_scope():
        conn = engine.connect()
        insert(conn, "inside")
        conn.commit()
    try:
        with pytest.raises(sa_rollback.StaleConnectionError):
            insert(conn, "between")
        conn.rollback()
        assert outside("SELECT count(*) FROM items") == [(0,)]
        with sa_rollback.rollback_scope():
            insert(conn, "next")
            conn.commit()
            assert count(conn) == 1
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_stale_adopted_session_commit_fails_then_is_real_again(engine: sa.Engine, outside) -> None:
    """Writes a held session made in the scope and never committed are gone: its commit says so."""
    session = Session(engine)
    session.execute(sa.text("SELECT 1"))
    try:
        with sa_rollback.rollback_scope():
            session.add(Item(name="pending"))
            session.flush()
        with pytest.raises(sa_rollback.StaleConnectionError):
            session.commit()
        session.rollback()
        session.add(Item(name="real"))
        session.commit()
        assert outside("SELECT name FROM items") == [("real",)]
    finally:
        session.close()
        outside("DELETE FROM items RETURNING id")


def test_nested_scopes_adopt_once(engine: sa.Engine, outside) -> None:
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    try:
        with sa_rollback.rollback_scope():
            insert(conn, "outer")
            conn.commit()
            with sa_rollback.rollback_scope():
                insert(conn, "inner")
                conn.commit()
                assert count(conn) == 2
            assert count(conn) == 1
            assert STATE.adopted  # still standing in until the last scope closes
        assert not STATE.adopted
        assert outside("SELECT count(*) FROM items") == [(0,)]
    finally:
        conn.close()


def test_held_driver_connection_is_guarded(engine: sa.Engine, outside) -> None:
    raw = engine.raw_connection()
    real = raw.driver_connection
    try:
        with sa_rollback.rollback_scope():
            cursor = raw.cursor()
            cursor.execute("INSERT INTO items (name) VALUES ('through the proxy')")
            raw.commit()
            assert raw.driver_connection is real
        assert outside("SELECT count(*) FROM items") == [(0,)]
        cursor = raw.cursor()  # real again between scopes
        cursor.execute("SELECT count(*) FROM items")
        assert cursor.fetchone()[0] == 0
        raw.rollback()
    finally:
        raw.close()


def test_other_database_held_connection(driver: str, outside) -> None:
    from .conftest import DB_B

    engine = create_engine(driver_url(driver, DB_B))
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))
    try:
        with sa_rollback.rollback_scope():
            insert(conn, "b")
            conn.commit()
        assert outside("SELECT count(*) FROM items", DB_B) == [(0,)]
    finally:
        conn.close()
        engine.dispose()
