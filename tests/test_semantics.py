"""The rollback core against a real PostgreSQL, on psycopg2 and psycopg 3.

Each test opens a scope, drives SQLAlchemy the way applications do, and checks
what every connection sees; the autouse ``_no_leftovers`` fixture then checks
from outside that nothing was left behind.
"""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

import sa_rollback
from sa_rollback._state import STATE

from ._compat import create_engine
from .conftest import ASYNC_DRIVERS, DB_A, DB_B, DRIVERS, driver_url

ITEMS = sa.table("items", sa.column("id"), sa.column("name"), sa.column("qty"))


@pytest.fixture(params=DRIVERS + ASYNC_DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """psycopg2 and psycopg 3, and the async drivers: each test's body runs in SQLAlchemy's greenlet there."""
    return str(request.param)


def names(conn_or_session: sa.Connection | Session) -> list[str]:
    return list(conn_or_session.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())


def add(conn_or_session: sa.Connection | Session, *items: str) -> None:
    for item in items:
        conn_or_session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": item})


# 1. commits are visible to every engine and session, and gone afterwards ------------------


def test_commit_visible_everywhere_then_gone(engine: sa.Engine, url: str, outside) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "a")
            session.commit()
        other = create_engine(url)  # created inside the scope
        with other.connect() as conn:
            assert names(conn) == ["a"]
        with engine.begin() as conn:
            add(conn, "b")
        with Session(other) as session:
            assert names(session) == ["a", "b"]
        other.dispose()
        assert outside("SELECT count(*) FROM items") == [(0,)]  # never committed for real
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_engine_created_before_and_pool_warm(engine: sa.Engine) -> None:
    with engine.connect() as conn:  # a pooled connection exists before the scope
        conn.execute(sa.text("SELECT 1"))
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "warm")
        with engine.connect() as conn:
            assert names(conn) == ["warm"]
    with engine.connect() as conn:
        assert names(conn) == []


def test_raw_dbapi_connection(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        raw = engine.raw_connection()
        cur = raw.cursor()
        cur.execute("INSERT INTO items (name) VALUES ('raw')")
        raw.commit()
        raw.close()
        with engine.connect() as conn:
            assert names(conn) == ["raw"]


# 2. rollback undoes exactly the work since the last commit ----------------------------


def test_rollback_undoes_only_own_uncommitted_work(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "kept")
            session.commit()
            add(session, "dropped")
            session.flush()
            assert names(session) == ["dropped", "kept"]
            session.rollback()
            assert names(session) == ["kept"]
            add(session, "again")
            session.commit()
        with engine.connect() as conn:
            assert names(conn) == ["again", "kept"]


def test_many_commit_cycles_keep_the_savepoint_stack_short(engine: sa.Engine, driver: str) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            for i in range(200):
                add(session, f"n{i}")
                session.commit()
                assert len(names(session)) == i + 1
        key_driver = {"psycopg_async": "psycopg"}.get(driver, driver)  # psycopg async shares the sync one
        (phys,) = [p for p in STATE.physicals.values() if (p.key.driver, p.key.dbname) == (key_driver, DB_A)]
        assert len(phys.stack) <= 2


# 3. overlapping logical connections ---------------------------------------------------


def test_reader_closing_keeps_a_later_commit(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        reader = engine.connect()
        assert names(reader) == []
        with Session(engine) as helper:
            add(helper, "from-helper")
            helper.commit()
        assert names(reader) == ["from-helper"]
        reader.close()  # the pool's reset-on-return is a rollback
        with engine.connect() as conn:
            assert names(conn) == ["from-helper"]


def test_reader_closing_keeps_uncommitted_flush_of_session(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "flushed")
            with engine.connect() as reader:
                reader.execute(sa.text("SELECT count(*) FROM notes"))
            assert names(session) == ["flushed"]
            session.commit()
        with engine.connect() as conn:
            assert names(conn) == ["flushed"]


def test_outer_session_rollback_keeps_helper_commit(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        outer = Session(engine)
        assert names(outer) == []  # the outer unit of work has begun
        with Session(engine) as helper:
            add(helper, "helper")
            helper.commit()
        outer.rollback()
        assert names(outer) == ["helper"]
        outer.close()


def test_outer_session_writes_after_helper_commit_then_rolls_back(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        outer = Session(engine)
        assert names(outer) == []
        with Session(engine) as helper:
            add(helper, "helper")
            helper.commit()
        add(outer, "outer")
        outer.rollback()
        with engine.connect() as conn:
            assert names(conn) == ["helper"]
        outer.close()


def test_interleaved_uncommitted_write_raises(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        first = Session(engine)
        add(first, "first")
        first.flush()
        with Session(engine) as second:
            add(second, "second")
            second.commit()
        with pytest.raises(sa_rollback.InterleavedRollbackError, match="another transaction wrote"):
            first.rollback()
        first.close()
        with engine.connect() as conn:  # nothing silently lost
            assert names(conn) == ["first", "second"]


def test_interleaved_write_on_return_fails_the_scope(engine: sa.Engine) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.InterleavedRollbackError):
        with scope:
            raw = engine.raw_connection()
            raw.cursor().execute("INSERT INTO items (name) VALUES ('first')")
            with engine.begin() as second:
                add(second, "second")
            raw.close()  # the pool's reset-on-return swallows errors; the scope does not
    assert len(scope.errors) == 1


def test_write_then_foreign_read_then_rollback(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "mine")
            session.flush()
            with engine.connect() as reader:
                assert names(reader) == ["mine"]  # one transaction: uncommitted work is visible
            session.rollback()
            assert names(session) == []


# 4. failed statements ------------------------------------------------------------------


def test_integrity_error_then_rollback_then_go_on(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "dup")
            session.commit()
            with pytest.raises(sa.exc.IntegrityError):
                add(session, "dup")
            session.rollback()
            add(session, "next")
            session.commit()
            assert names(session) == ["dup", "next"]


def test_failed_statement_of_one_connection_does_not_block_another(engine: sa.Engine, driver: str) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "base")
        failing = Session(engine)
        add(failing, "pending")
        with pytest.raises(sa.exc.ProgrammingError):
            failing.execute(sa.text("SELECT * FROM no_such_table"))
        with engine.connect() as other:  # production: unaffected by the other's failure
            assert names(other) == ["base"]
        with pytest.raises(sa.exc.DBAPIError, match="current transaction is aborted"):
            failing.execute(sa.text("SELECT 1"))
        failing.rollback()
        assert names(failing) == ["base"]
        failing.close()


def test_failed_read_with_no_savepoint_recovers(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            # SQLAlchemy's asyncpg adapter reports this as a plain DBAPIError, not a DataError.
            with pytest.raises(sa.exc.DBAPIError):
                conn.execute(sa.text("SELECT 1/0 > 0 AS x WHERE 'a'::int = 1"))
            conn.rollback()
            assert conn.execute(sa.text("SELECT 2")).scalar() == 2


# 5. begin_nested -----------------------------------------------------------------------


def test_session_begin_nested(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "outer")
            nested = session.begin_nested()
            add(session, "inner-dropped")
            nested.rollback()
            with session.begin_nested():
                add(session, "inner-kept")
            assert names(session) == ["inner-kept", "outer"]
            session.commit()
        with engine.connect() as conn:
            assert names(conn) == ["inner-kept", "outer"]


def test_connection_begin_nested_and_outer_rollback(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            conn.begin()
            add(conn, "a")
            sp = conn.begin_nested()
            add(conn, "b")
            sp.commit()
            conn.rollback()
            assert names(conn) == []


def test_two_sessions_same_savepoint_names_do_not_collide(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        one = Session(engine)
        two = Session(engine)
        assert names(one) == names(two) == []
        n1 = one.begin_nested()  # both are "sa_savepoint_1" in SQLAlchemy
        n2 = two.begin_nested()
        n1.commit()  # must not release two's savepoint
        add(two, "two")
        n2.rollback()
        assert names(two) == []
        one.close()
        two.close()


def test_nested_loop_keeps_stack_short(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            for i in range(100):
                with session.begin_nested():
                    add(session, f"x{i}")
            session.commit()
            assert len(names(session)) == 100
        assert max(len(p.stack) for p in STATE.physicals.values()) <= 3


# 6. engines on one database share a transaction; other databases get their own --------


def test_binds_to_two_databases_are_both_rolled_back(driver: str, engine: sa.Engine, outside) -> None:
    other = create_engine(driver_url(driver, DB_B))
    with sa_rollback.rollback_scope():
        with engine.begin() as a, other.begin() as b:
            add(a, "in-a")
            add(b, "in-b")
        with other.connect() as b:
            assert names(b) == ["in-b"]
        with engine.connect() as a:
            assert names(a) == ["in-a"]
    assert outside("SELECT count(*) FROM items", DB_B) == [(0,)]
    other.dispose()


# 8. DDL --------------------------------------------------------------------------------


def test_ddl_is_rolled_back(engine: sa.Engine, outside) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE made_in_test (x int)"))
            conn.execute(sa.text("ALTER TABLE items ADD COLUMN extra int"))
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT extra FROM items, made_in_test"))
    assert outside("SELECT to_regclass('made_in_test')") == [(None,)]
    assert outside("SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'") == [(0,)]


# 9. no database, no connection ---------------------------------------------------------


def test_scope_without_database_use_opens_nothing(engine: sa.Engine) -> None:
    before = {key: len(p.frames) for key, p in STATE.physicals.items()}
    with sa_rollback.rollback_scope() as scope:
        assert scope._physicals == []
    assert {key: len(p.frames) for key, p in STATE.physicals.items()} == before


# 10. the transaction ended behind our back ---------------------------------------------


def test_lone_textual_commit_is_a_logical_commit(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            add(conn, "t")
            conn.exec_driver_sql("COMMIT")
        with engine.connect() as conn:
            assert names(conn) == ["t"]


def test_textual_commit_inside_multi_statement_is_refused(engine: sa.Engine, outside) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.TransactionEscapeError, match=r"multi-statement string .*test_semantics.py"):
        with scope:
            with engine.connect() as conn:
                add(conn, "before")
                conn.exec_driver_sql("INSERT INTO items (name) VALUES ('escaped'); COMMIT")
    assert outside("SELECT count(*) FROM items") == [(0,)]  # refused before it ran: nothing committed


# misc: autocommit, threads, nested scopes ---------------------------------------------


def test_autocommit_connection_commits_each_statement(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        auto = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        add(auto, "auto")
        with pytest.raises(sa.exc.IntegrityError):
            add(auto, "auto")
        auto.rollback()  # nothing to undo: the first insert was committed
        with engine.connect() as conn:
            assert names(conn) == ["auto"]
        auto.close()


def test_threads_share_the_transaction(engine: sa.Engine, driver: str) -> None:
    if driver in ASYNC_DRIVERS:
        pytest.skip("an async engine is driven from its event loop's thread; tasks have their own test")
    factory = sessionmaker(engine)

    def work(i: int) -> None:
        with factory() as session:
            add(session, f"t{i}")
            session.commit()

    with sa_rollback.rollback_scope():
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        with engine.connect() as conn:
            assert len(names(conn)) == 8


def test_nested_scopes(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "outer")
        with sa_rollback.rollback_scope():
            with engine.begin() as conn:
                add(conn, "inner")
            with engine.connect() as conn:
                assert names(conn) == ["inner", "outer"]
        with engine.connect() as conn:
            assert names(conn) == ["outer"]


def test_connection_kept_across_scopes_is_refused(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        kept = engine.connect()
        add(kept, "x")
    with sa_rollback.rollback_scope():
        with pytest.raises(sa_rollback.StaleConnectionError, match="open transaction"):
            add(kept, "y")
        kept.rollback()
        add(kept, "z")  # after the rollback it works again, in the new scope
        assert names(kept) == ["z"]
        kept.close()


# regressions found by tests/test_model.py --------------------------------------------


def test_rollback_after_a_failure_and_a_foreign_rollback_undoes_own_writes(engine: sa.Engine) -> None:
    """The undo point moved past a connection's own write when another one wrote; once that other
    write was rolled back, the first connection's rollback kept its write instead of undoing it."""
    with sa_rollback.rollback_scope():
        a, b = engine.connect(), engine.connect()
        add(a, "a-write")
        add(b, "b-write")
        with pytest.raises(sa.exc.IntegrityError):
            add(a, "a-write")  # a's transaction is aborted
        b.rollback()
        a.rollback()
        assert names(b) == []
        a.close()
        b.close()


def test_rollback_to_savepoint_after_another_connection_needed_the_transaction(engine: sa.Engine) -> None:
    """After a failed statement inside begin_nested(), another connection ran a statement; rolling
    back to the savepoint then failed with 'current transaction is aborted'."""
    with sa_rollback.rollback_scope():
        with engine.connect() as a, engine.connect() as b:
            add(a, "kept")
            nested = a.begin_nested()
            add(a, "dropped")
            with pytest.raises(sa.exc.IntegrityError):
                add(a, "kept")
            assert names(b) == ["kept"]  # the failed savepoint's work is gone for everyone
            nested.rollback()  # production: fine
            assert names(a) == ["kept"]
            add(a, "after")
            a.commit()
            assert names(b) == ["after", "kept"]


def test_failed_savepoint_work_is_dropped_before_another_connection_writes(engine: sa.Engine) -> None:
    """Recovery rolled back only to the newest savepoint (another connection's), so the failed
    connection's writes stayed under the other's, and its rollback to its savepoint was refused."""
    with sa_rollback.rollback_scope():
        with engine.connect() as a, engine.connect() as b:
            nested = a.begin_nested()
            add(a, "doomed")
            assert names(b) == ["doomed"]  # b takes a savepoint after a's write
            with pytest.raises(sa.exc.IntegrityError):
                add(a, "doomed")
            add(b, "b-write")
            nested.rollback()  # production: undoes "doomed", keeps b's write
            assert names(a) == ["b-write"]
            b.commit()
            a.rollback()
            assert names(a) == ["b-write"]
            b.rollback()


def test_rollback_to_savepoint_after_foreign_write_then_own_write(engine: sa.Engine) -> None:
    """A rollback to a savepoint was refused whenever another transaction wrote after the
    savepoint, even when everything this connection wrote since came after that write."""
    with sa_rollback.rollback_scope():
        with engine.connect() as a, engine.connect() as b:
            add(a, "before")
            nested = a.begin_nested()
            add(b, "foreign")
            add(a, "mine")
            nested.rollback()
            assert names(a) == ["before", "foreign"]
            b.commit()
            a.commit()
        with engine.connect() as conn:
            assert names(conn) == ["before", "foreign"]


def test_rollback_to_savepoint_after_recovery_keeps_older_writes(engine: sa.Engine) -> None:
    """After recovery rolled a failed connection back to one of its undo points, its latest write
    was only known as an upper bound, which made its rollback to a savepoint look interleaved."""
    with sa_rollback.rollback_scope():
        with engine.connect() as a, engine.connect() as b:
            add(a, "a1")
            nested = a.begin_nested()
            add(b, "b1")
            add(a, "a2")
            with pytest.raises(sa.exc.IntegrityError):
                add(a, "a2")
            add(b, "b2")
            nested.rollback()
            assert names(a) == ["a1", "b1", "b2"]
            b.commit()
            with pytest.raises(sa_rollback.InterleavedRollbackError):
                a.rollback()  # a1 came before b1: production undoes only a1, one transaction cannot
