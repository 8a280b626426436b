"""Can the test's transaction be trusted? Escape routes, threads, faults, deferred constraints.

Every route out of the rolled-back transaction is either made safe (the test
behaves as if nothing escaped) or detected (the test fails with an error that
names the route). Threads share the transaction one statement at a time, and a
deadlock between them ends with an error, not a hang. A dead connection fails
its test, and the next test runs on a new one. The autouse ``_no_leftovers``
fixture checks from outside that nothing was committed.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import queue
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any, Callable

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool

import sa_rollback
from sa_rollback._physical import Physical
from sa_rollback._proxy import LogicalConnection
from sa_rollback._state import STATE

from ._compat import create_engine, needs_sqlalchemy_2
from .conftest import DB_A, RUN_ID, WORKER, any_driver, libpq_dsn

Outside = Callable[..., list[tuple[Any, ...]]]
#: prepared transactions are server-wide: a name of this process's own (not in test ids, which
#: must be the same in every xdist worker)
GID = f"sar_{RUN_ID}_{WORKER}"


def names(conn_or_session: sa.Connection | Session) -> list[str]:
    return list(conn_or_session.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())


def add(conn_or_session: sa.Connection | Session, *items: str) -> None:
    for item in items:
        conn_or_session.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": item})


def physical(engine: sa.Engine) -> Physical:
    """The shared connection the engine's checkouts use in the current scope."""
    with engine.connect() as conn:
        logical = conn.connection.dbapi_connection
        assert isinstance(logical, LogicalConnection)
        return logical.phys


def read_only_of(real: Any) -> Any:
    return real.readonly if hasattr(real, "readonly") else real.read_only


# 1. escape routes -----------------------------------------------------------------------

# -- textual transaction control


def test_lone_textual_rollback_undoes_own_work_only(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "kept")
        with engine.connect() as conn:
            add(conn, "dropped")
            conn.exec_driver_sql("ROLLBACK")
            assert names(conn) == ["kept"]


def test_commit_and_chain_is_a_logical_commit(engine: sa.Engine, outside: Outside) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            add(conn, "chained")
            conn.exec_driver_sql("COMMIT AND CHAIN")
            add(conn, "then-dropped")
            conn.exec_driver_sql("ROLLBACK AND CHAIN")
        with engine.connect() as conn:
            assert names(conn) == ["chained"]
        assert outside("SELECT count(*) FROM items") == [(0,)]


@any_driver  # refused before it runs: the driver never sees it
@pytest.mark.parametrize(
    "statement",
    [
        "SELECT 1; COMMIT",
        "INSERT INTO items (name) VALUES ('x'); ROLLBACK",
        "COMMIT; INSERT INTO items (name) VALUES ('x')",
        "INSERT INTO items (name) VALUES ('x'); COMMIT; BEGIN",
        "INSERT INTO items (name) VALUES ('x'); PREPARE TRANSACTION '{gid}'",
    ],
)
def test_multi_statement_transaction_end_is_refused(engine: sa.Engine, outside: Outside, statement: str) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.TransactionEscapeError, match=r"multi-statement string \(.*test_trust.py:\d+"):
        with scope:
            with engine.begin() as conn:
                add(conn, "before")
            with engine.connect() as conn:
                conn.exec_driver_sql(statement.replace("{gid}", GID))
    assert outside("SELECT count(*) FROM items") == [(0,)]
    assert outside(f"SELECT count(*) FROM pg_prepared_xacts WHERE gid = '{GID}'") == [(0,)]


def test_transaction_ended_by_an_unrecognized_statement_is_reported(
    engine: sa.Engine, outside: Outside, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop behind the classifier: after each statement, the driver's transaction status."""
    import sa_rollback._proxy as proxy
    from sa_rollback._classify import Kind, Statement

    monkeypatch.setattr(proxy, "classify", lambda sql: Statement(Kind.WRITE))  # a statement it cannot see through
    scope = sa_rollback.RollbackScope()
    try:
        with pytest.raises(sa_rollback.TransactionEscapeError, match=r"ended the test's transaction.*test_trust.py"):
            with scope:
                with engine.connect() as conn:
                    conn.exec_driver_sql("INSERT INTO items (name) VALUES ('escaped'); COMMIT")
        monkeypatch.undo()
        with sa_rollback.rollback_scope():  # the next scope starts cleanly
            with engine.begin() as conn:
                add(conn, "next")
    finally:
        assert outside("DELETE FROM items RETURNING name") == [("escaped",)]  # committed for real, and said so


def test_semicolons_in_literals_and_function_bodies_are_not_refused(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO notes (body) VALUES ('done; COMMIT')"))
            conn.exec_driver_sql(
                "CREATE FUNCTION sar_f() RETURNS int LANGUAGE plpgsql AS $$ BEGIN RETURN 1; END $$; SELECT sar_f()"
            )
            assert conn.execute(sa.text("SELECT body FROM notes")).scalar() == "done; COMMIT"


@any_driver  # accepted and not applied: the driver never sees it
@pytest.mark.parametrize(
    "statement",
    [
        "SET TRANSACTION READ ONLY",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
        "SET transaction_read_only = on",
        "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    ],
)
def test_transaction_characteristics_do_not_leak_to_other_connections(engine: sa.Engine, statement: str) -> None:
    with sa_rollback.rollback_scope():
        with engine.connect() as reader:
            reader.execute(sa.text("SELECT 1"))
            reader.exec_driver_sql(statement)  # accepted, as in production
            reader.commit()
        with engine.begin() as writer:  # production: another connection, unaffected
            add(writer, "still-writable")
            assert writer.exec_driver_sql("SHOW transaction_read_only").scalar() == "off"
            assert writer.exec_driver_sql("SHOW default_transaction_read_only").scalar() == "off"
        with engine.connect() as conn:
            assert names(conn) == ["still-writable"]


@pytest.mark.parametrize("driver", ["psycopg"])  # Connection.transaction() is psycopg 3's
@needs_sqlalchemy_2("dialect for psycopg 3")
def test_psycopg_transaction_blocks_act_on_the_logical_connection(driver: str, engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as other:
            add(other, "other")
        raw = engine.raw_connection()
        conn = raw.dbapi_connection
        with conn.transaction():  # outer: commits at the end
            conn.execute("INSERT INTO items (name) VALUES ('outer')")
            with pytest.raises(ZeroDivisionError), conn.transaction():  # a savepoint, rolled back
                conn.execute("INSERT INTO items (name) VALUES ('inner')")
                raise ZeroDivisionError
            with conn.transaction(force_rollback=True):
                conn.execute("INSERT INTO items (name) VALUES ('forced')")
        with pytest.raises(sa_rollback.UnsupportedOperationError, match="pipeline"):
            conn.pipeline()
        conn.set_autocommit(True)
        assert conn.autocommit is True
        conn.set_autocommit(False)
        raw.close()
        with engine.connect() as check:
            assert names(check) == ["other", "outer"]


@pytest.mark.parametrize("driver", ["psycopg2"])  # connection.reset() is psycopg2's
def test_psycopg2_reset_ends_only_the_logical_transaction(driver: str, engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as other:
            add(other, "other")
        raw = engine.raw_connection()
        raw.cursor().execute("INSERT INTO items (name) VALUES ('reset-away')")
        raw.dbapi_connection.reset()
        raw.close()
        with engine.connect() as check:
            assert names(check) == ["other"]


# -- autocommit


def test_autocommit_engine(url: str, engine: sa.Engine) -> None:
    auto_engine = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with sa_rollback.rollback_scope():
            with auto_engine.connect() as auto:
                add(auto, "auto")
                auto.rollback()  # production: nothing to undo, each statement committed
                with pytest.raises(sa.exc.IntegrityError):
                    add(auto, "auto")
                add(auto, "after-failure")  # the failure aborted nothing
                with engine.connect() as other:
                    assert names(other) == ["after-failure", "auto"]
            with Session(engine) as session:  # a transactional session next to it
                add(session, "session")
                session.rollback()
            with engine.connect() as conn:
                assert names(conn) == ["after-failure", "auto"]
        with auto_engine.connect() as auto:  # and the pool connection is unharmed
            assert names(auto) == []
            assert auto.connection.dbapi_connection.autocommit is True
    finally:
        auto_engine.dispose()


def test_autocommit_connection_failure_does_not_undo_others(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "session-pending")
            session.flush()
            with engine.connect() as plain:
                auto = plain.execution_options(isolation_level="AUTOCOMMIT")
                with pytest.raises(sa.exc.ProgrammingError):
                    auto.execute(sa.text("SELECT * FROM no_such_table"))
                add(auto, "auto")
            assert names(session) == ["auto", "session-pending"]
            session.commit()
        with engine.connect() as conn:
            assert names(conn) == ["auto", "session-pending"]
            assert conn.connection.dbapi_connection.autocommit is False  # isolation reset on return


# -- pool handling


def test_detached_connection_joins_the_transaction(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        conn = engine.connect()
        conn.detach()
        add(conn, "detached")
        conn.commit()
        logical = conn.connection.dbapi_connection
        assert isinstance(logical, LogicalConnection)
        guard = logical.guard
        assert guard is not None and guard.detached
        with engine.connect() as other:
            assert names(other) == ["detached"]
        conn.close()
        assert guard.real.closed  # the pool connection it took along is closed with it
    with engine.connect() as conn:
        assert names(conn) == []


@any_driver  # pool handling
def test_engine_dispose_during_the_test(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "before-dispose")
        engine.dispose()
        with engine.begin() as conn:
            assert names(conn) == ["before-dispose"]
            add(conn, "after-dispose")
        held = engine.connect()
        engine.dispose()  # while a connection is checked out
        add(held, "held")
        held.commit()
        held.close()
        with engine.connect() as conn:
            assert names(conn) == ["after-dispose", "before-dispose", "held"]


@pytest.mark.parametrize("poolclass", [NullPool, StaticPool])
def test_nullpool_and_staticpool(url: str, poolclass: type, outside: Outside) -> None:
    eng = create_engine(url, poolclass=poolclass)
    try:
        with sa_rollback.rollback_scope():
            first = eng.connect()
            second = eng.connect()  # StaticPool: both on its single pool connection
            add(first, "first")
            first.commit()
            assert names(second) == ["first"]
            add(second, "second")
            first.close()
            second.commit()
            second.close()
            with eng.connect() as conn:
                assert names(conn) == ["first", "second"]
            assert outside("SELECT count(*) FROM items") == [(0,)]
        with eng.connect() as conn:
            assert names(conn) == []
            real = conn.connection.driver_connection
            assert read_only_of(real) in (None, False)  # the pool connection is writable again
            conn.execute(sa.text("INSERT INTO notes (body) VALUES ('real')"))
            conn.rollback()
    finally:
        eng.dispose()


# -- driver_connection


def test_driver_connection_write_is_refused_and_reported(engine: sa.Engine, outside: Outside) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.TransactionEscapeError, match=r"driver_connection.*test_trust.py:\d+"):
        with scope:
            with engine.connect() as conn:
                add(conn, "through-dbapi")
                real = conn.connection.driver_connection
                cur = real.cursor()
                with pytest.raises(Exception, match="read-only transaction"):
                    cur.execute("INSERT INTO items (name) VALUES ('through-driver')")
                conn.commit()
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_driver_connection_commit_cannot_commit(engine: sa.Engine, outside: Outside) -> None:
    with sa_rollback.rollback_scope():
        raw = engine.raw_connection()
        real = raw.driver_connection
        with pytest.raises(Exception, match="read-only transaction"):
            real.cursor().execute("INSERT INTO items (name) VALUES ('through-driver')")
        real.commit()  # PostgreSQL turns it into a rollback
        raw.close()
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_driver_connection_read_is_reported(engine: sa.Engine) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.TransactionEscapeError, match="sees only committed data"):
        with scope:
            raw = engine.raw_connection()
            raw.cursor().execute("INSERT INTO items (name) VALUES ('x')")
            cur = raw.driver_connection.cursor()
            cur.execute("SELECT count(*) FROM items")
            assert cur.fetchone()[0] == 0  # what it sees: not the test's data
            raw.close()


def test_driver_connection_restored_and_pre_ping(url: str) -> None:
    eng = create_engine(url, pool_pre_ping=True, pool_size=1)
    try:
        with eng.connect() as conn:  # a pooled connection exists: the next checkout pings it
            conn.execute(sa.text("SELECT 1"))
        with sa_rollback.rollback_scope():
            with eng.begin() as conn:  # the ping's transaction is not mistaken for an escape
                add(conn, "pinged")
                assert read_only_of(conn.connection.driver_connection) is True
        with eng.connect() as conn:
            assert read_only_of(conn.connection.driver_connection) in (None, False)
            assert names(conn) == []
    finally:
        eng.dispose()


def test_connection_dropped_without_close_is_rolled_back(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        conn = engine.connect()
        add(conn, "uncommitted")
        del conn  # garbage collected: production rolls its transaction back
        gc.collect()
        with engine.connect() as other:
            assert names(other) == []
    with engine.connect() as conn:
        assert read_only_of(conn.connection.driver_connection) in (None, False)


# 2. threads ---------------------------------------------------------------------------------


def test_thread_pool_writers_are_serialized(engine: sa.Engine) -> None:
    factory = sessionmaker(engine)

    def work(i: int) -> int:
        with factory() as session:
            add(session, f"w{i:02}")
            session.commit()
            return len(names(session))

    with sa_rollback.rollback_scope():
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            seen = list(pool.map(work, range(40)))
        assert all(1 <= n <= 40 for n in seen)
        with engine.connect() as conn:
            assert names(conn) == [f"w{i:02}" for i in range(40)]


@any_driver  # threads take turns on the shared connection, whatever the driver
def test_background_worker_thread(engine: sa.Engine) -> None:
    jobs: queue.Queue[str | None] = queue.Queue()
    done: queue.Queue[str] = queue.Queue()

    def worker() -> None:
        while (job := jobs.get()) is not None:
            with engine.begin() as conn:
                add(conn, job)
            done.put(job)

    with sa_rollback.rollback_scope():
        thread = threading.Thread(target=worker, name="sar-worker")
        thread.start()
        try:
            with Session(engine) as session:
                add(session, "main")
                session.commit()
                for job in ("job-1", "job-2"):
                    jobs.put(job)
                    assert done.get(timeout=10) == job
                assert names(session) == ["job-1", "job-2", "main"]
        finally:
            jobs.put(None)
            thread.join(10)


@any_driver  # threads take turns on the shared connection, whatever the driver
def test_flask_dev_server_in_a_thread(engine: sa.Engine) -> None:
    from flask import Flask
    from werkzeug.serving import make_server

    app = Flask(__name__)

    @app.post("/items/<name>")
    def create(name: str) -> dict[str, Any]:
        with Session(engine) as session:
            add(session, name)
            session.commit()
        return {"created": name}

    @app.get("/items")
    def listing() -> dict[str, Any]:
        with engine.connect() as conn:
            return {"names": names(conn)}

    # No proxies: the environment may define one for http.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with sa_rollback.rollback_scope():
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, name="sar-flask")
        thread.start()
        try:
            base = f"http://127.0.0.1:{server.server_port}"
            for name in ("web-1", "web-2"):
                with opener.open(urllib.request.Request(f"{base}/items/{name}", method="POST"), timeout=10) as r:
                    assert json.load(r) == {"created": name}
            with engine.begin() as conn:
                add(conn, "test")
            with opener.open(f"{base}/items", timeout=10) as response:
                assert json.load(response) == {"names": ["test", "web-1", "web-2"]}
        finally:
            server.shutdown()
            thread.join(10)
    with engine.connect() as conn:
        assert names(conn) == []


@any_driver  # the wait is for sa_rollback's own lock
def test_deadlock_with_outside_lock_ends_with_an_error(engine: sa.Engine, url: str) -> None:
    """A worker's statement waits for a lock that only the main thread can release, and the main
    thread needs the connection: without the timeout this hangs forever."""
    blocker = psycopg.connect(libpq_dsn(DB_A))
    blocker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT count(*) FROM notes"))  # waits for the outside lock
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=blocked, name="sar-blocked-worker")
    scope = sa_rollback.RollbackScope(lock_timeout=0.5)
    try:
        with pytest.raises(sa_rollback.LockTimeoutError) as caught:
            with scope:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
                worker.start()
                time.sleep(0.2)  # the worker is inside its statement
                started = time.monotonic()
                try:
                    with engine.connect() as conn:
                        conn.execute(sa.text("SELECT 1"))
                finally:
                    assert time.monotonic() - started < 5
                    blocker.rollback()  # now the worker can finish
                    worker.join(10)
    finally:
        blocker.close()
    message = str(caught.value)
    assert "'MainThread' waited 0.5 s" in message
    assert "'sar-blocked-worker'" in message
    assert "in blocked" in message  # where the holder was
    assert "test_deadlock_with_outside_lock" in message  # where the waiter was
    assert not worker.is_alive() and errors == []


def test_scope_end_cancels_a_stuck_statement(engine: sa.Engine) -> None:
    """The test ends while a thread is stuck in a statement: the scope cancels it and rolls back."""
    blocker = psycopg.connect(libpq_dsn(DB_A))
    blocker.execute("LOCK TABLE notes IN ACCESS EXCLUSIVE MODE")
    errors: list[BaseException] = []

    def blocked() -> None:
        try:
            with engine.begin() as conn:
                add(conn, "from-worker")
                conn.execute(sa.text("SELECT count(*) FROM notes"))
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=blocked, name="sar-stuck")
    try:
        with pytest.raises(sa_rollback.LockTimeoutError, match="'sar-stuck'"):
            with sa_rollback.RollbackScope(lock_timeout=0.5):
                with engine.begin() as conn:
                    add(conn, "from-main")
                worker.start()
                time.sleep(0.2)
        worker.join(10)
        assert not worker.is_alive()
        assert len(errors) == 1 and "cancel" in str(errors[0]).lower()
    finally:
        blocker.close()
    with sa_rollback.rollback_scope():  # the next scope works, on a clean transaction
        with engine.connect() as conn:
            assert names(conn) == []


@pytest.mark.parametrize("driver", ["psycopg"])  # cursor.stream() is psycopg 3's
@needs_sqlalchemy_2("dialect for psycopg 3")
def test_stream_holds_the_connection_with_a_timeout(driver: str, engine: sa.Engine) -> None:
    """psycopg's cursor.stream() keeps the connection busy between rows: another thread's statement
    waits, and a main thread waiting for that thread inside the loop would hang without the timeout."""
    results: queue.Queue[BaseException | int] = queue.Queue()

    def helper() -> None:
        try:
            with engine.connect() as conn:
                results.put(conn.execute(sa.text("SELECT 1")).scalar_one())
        except BaseException as exc:
            results.put(exc)

    with sa_rollback.rollback_scope(lock_timeout=0.5):
        with engine.begin() as conn:
            add(conn, "a", "b")
        raw = engine.raw_connection()
        try:
            for _row in raw.cursor().stream("SELECT name FROM items"):
                threading.Thread(target=helper, name="sar-helper").start()
                outcome = results.get(timeout=10)  # the helper waits for the stream to end
                assert isinstance(outcome, sa_rollback.LockTimeoutError)
                assert "'sar-helper' waited" in str(outcome) and "'MainThread'" in str(outcome)
                break
        finally:
            raw.close()
        STATE.top.errors.clear()  # type: ignore[union-attr]  # reported for threads nobody checks


@pytest.mark.parametrize("driver", ["psycopg"])  # cursor.stream() is psycopg 3's
@needs_sqlalchemy_2("dialect for psycopg 3")
def test_statement_inside_own_stream_is_refused(driver: str, engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "a")
        raw = engine.raw_connection()
        try:
            rows = raw.cursor().stream("SELECT name FROM items")
            assert next(rows) == ("a",)
            with engine.connect() as other:  # production: another connection; here it would hang
                with pytest.raises(sa_rollback.UnsupportedOperationError, match="stream"):
                    other.execute(sa.text("SELECT 1"))
            assert list(rows) == []
        finally:
            raw.close()


# 3. faults ----------------------------------------------------------------------------------


def terminate(*pids: int) -> None:
    with psycopg.connect(libpq_dsn(DB_A), autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(100):  # wait until the server has let them go
            if not admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)).fetchone():
                return
            time.sleep(0.02)


def test_backend_killed_mid_test(engine: sa.Engine, outside: Outside) -> None:
    scope = sa_rollback.RollbackScope()
    with pytest.raises(sa_rollback.ConnectionLostError, match=r"was lost .*nothing was committed"):
        with scope:
            with engine.begin() as conn:
                add(conn, "lost")
            phys = physical(engine)
            pid = phys.backend_pid
            terminate(pid)
            with pytest.raises(sa.exc.DBAPIError):  # the driver's own error first
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            with pytest.raises(sa_rollback.ConnectionLostError):  # then a clear one
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
    assert phys.key not in STATE.physicals or STATE.physicals[phys.key] is not phys
    with sa_rollback.rollback_scope():  # the next scope runs on a new connection
        with engine.begin() as conn:
            add(conn, "next")
        assert physical(engine).backend_pid != pid
        with engine.connect() as conn:
            assert names(conn) == ["next"]
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_all_physicals_killed_like_a_restart(driver: str, engine: sa.Engine, outside: Outside) -> None:
    from .conftest import DB_B, driver_url

    other = create_engine(driver_url(driver, DB_B))
    try:
        with pytest.raises(sa_rollback.ConnectionLostError):
            with sa_rollback.rollback_scope():
                with engine.begin() as a, other.begin() as b:
                    add(a, "a")
                    add(b, "b")
                terminate(physical(engine).backend_pid, physical(other).backend_pid)
                # the test does nothing more: the scope's end finds out
        with sa_rollback.rollback_scope():
            with engine.begin() as a, other.begin() as b:
                assert names(a) == names(b) == []
                add(a, "a2")
                add(b, "b2")
        assert outside("SELECT count(*) FROM items") == [(0,)]
        assert outside("SELECT count(*) FROM items", DB_B) == [(0,)]
    finally:
        other.dispose()


def test_backend_killed_between_tests(engine: sa.Engine) -> None:
    """Nothing depends on the connection between scopes: the next one gets a new one, and no error."""
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "first")
        pid = physical(engine).backend_pid
    terminate(pid)
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            assert names(conn) == []
            add(conn, "second")
        assert physical(engine).backend_pid != pid


@any_driver  # raised before the driver is called
def test_keyboard_interrupt_from_an_event_listener(engine: sa.Engine, outside: Outside) -> None:
    def interrupt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "interrupt-here" in statement:
            raise KeyboardInterrupt

    sa.event.listen(engine, "before_cursor_execute", interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sa_rollback.rollback_scope():
                with engine.begin() as conn:
                    add(conn, "committed")
                with Session(engine) as session:
                    add(session, "pending")
                    session.execute(sa.text("SELECT 'interrupt-here'"))
        assert outside("SELECT count(*) FROM items") == [(0,)]
        with sa_rollback.rollback_scope():
            with engine.connect() as conn:
                assert names(conn) == []
    finally:
        sa.event.remove(engine, "before_cursor_execute", interrupt)


def test_keyboard_interrupt_inside_a_statement(engine: sa.Engine) -> None:
    """A signal lands while the driver waits for the server, with the connection's lock held."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            with sa_rollback.rollback_scope():
                with Session(engine) as session:
                    add(session, "pending")
                    session.flush()
                    signal.setitimer(signal.ITIMER_REAL, 0.1)
                    session.execute(sa.text("SELECT pg_sleep(0.5)"))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            assert names(conn) == []
            add(conn, "after")


@any_driver  # the scope's bookkeeping
def test_teardown_that_raises(engine: sa.Engine) -> None:
    def fixture() -> Iterator[Session]:
        with sa_rollback.rollback_scope():
            session = Session(engine)
            yield session
            raise RuntimeError("teardown failed")  # session left open, transaction pending

    gen = fixture()
    session = next(gen)
    add(session, "pending")
    session.flush()
    with pytest.raises(RuntimeError, match="teardown failed"):
        next(gen)
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            assert names(conn) == []
    session.close()


@any_driver  # the scope's bookkeeping
def test_interrupted_scope_close_is_cleaned_up_by_the_next_scope(
    engine: sa.Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(KeyboardInterrupt):
        with sa_rollback.rollback_scope():
            with engine.begin() as conn:
                add(conn, "left-behind")
            phys = physical(engine)

            def interrupted(scope: Any) -> None:
                raise KeyboardInterrupt

            monkeypatch.setattr(phys, "close_frame", interrupted)
    monkeypatch.undo()
    assert len(phys.frames) == 1  # its frame is still there
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            assert names(conn) == []
        assert physical(engine) is phys and len(phys.frames) == 1


# 5. deferred constraints --------------------------------------------------------------------

DEFERRED_SCHEMA = """
CREATE TABLE sar_parent (id int PRIMARY KEY);
CREATE TABLE sar_child (
    parent_id int CONSTRAINT sar_child_parent_fk REFERENCES sar_parent DEFERRABLE INITIALLY DEFERRED
)
"""


def test_deferred_constraint_violation_fails_the_scope(engine: sa.Engine) -> None:
    scope = sa_rollback.RollbackScope("deferred test")
    with pytest.raises(sa_rollback.DeferredConstraintError, match="sar_child_parent_fk") as caught:
        with scope:
            with engine.begin() as conn:
                conn.exec_driver_sql(DEFERRED_SCHEMA)  # DDL in the scope: rolled back too
                conn.exec_driver_sql("INSERT INTO sar_child VALUES (1)")  # no parent: deferred
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM sar_child").scalar() == 1
    assert caught.value.constraint == "sar_child_parent_fk"
    assert "deferred test" in str(caught.value) and "COMMIT would have failed" in str(caught.value)
    with sa_rollback.rollback_scope():  # rolled back anyway, and the next scope is fine
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT to_regclass('sar_child')").scalar() is None


def test_deferred_constraint_satisfied_later_and_opt_out(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            conn.exec_driver_sql(DEFERRED_SCHEMA)
            conn.exec_driver_sql("INSERT INTO sar_child VALUES (1)")
            conn.exec_driver_sql("INSERT INTO sar_parent VALUES (1)")  # satisfied before the end
    with sa_rollback.rollback_scope(check_deferred=False):
        with engine.begin() as conn:
            conn.exec_driver_sql(DEFERRED_SCHEMA)
            conn.exec_driver_sql("INSERT INTO sar_child VALUES (2)")


def test_deferred_check_in_nested_scopes(engine: sa.Engine) -> None:
    with sa_rollback.rollback_scope("outer"):
        with engine.begin() as conn:
            conn.exec_driver_sql(DEFERRED_SCHEMA)
            conn.exec_driver_sql("INSERT INTO sar_parent VALUES (1)")
        with pytest.raises(sa_rollback.DeferredConstraintError, match="inner"):
            with sa_rollback.rollback_scope("inner"):
                with engine.begin() as conn:
                    conn.exec_driver_sql("INSERT INTO sar_child VALUES (2)")
        with engine.begin() as conn:  # still deferred in the outer scope, and its data is intact
            conn.exec_driver_sql("INSERT INTO sar_child VALUES (3)")
            assert conn.exec_driver_sql("SELECT count(*) FROM sar_parent").scalar() == 1
            conn.exec_driver_sql("DELETE FROM sar_child")


@any_driver  # whether the check is asked for, not how the driver runs it
def test_deferred_check_only_when_the_scope_wrote(engine: sa.Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[bool] = []
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        driver = physical(engine).driver
        original = driver.rollback_outer
        monkeypatch.setattr(
            driver, "rollback_outer", lambda conn, check, probe="": checks.append(check) or original(conn, check, probe)
        )
    with sa_rollback.rollback_scope():
        with engine.begin() as conn:
            add(conn, "x")
    with sa_rollback.rollback_scope():
        with Session(engine) as session:
            add(session, "y")
            session.flush()
            session.rollback()  # the write is undone: nothing to check
    assert checks == [False, True, False]
