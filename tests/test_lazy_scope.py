"""The plugin's per-test scope is made on first use (LazyScope): it must isolate exactly as an open one.

Each test here drives the core without pytest's plugin, as the plugin does for
every test: a data scope (a module fixture's) holds a connection across tests,
and the test's lazy scope must still take every write of the test, whatever
path reaches the database first. Every "gone afterwards" check is made from a
plain psycopg connection outside SQLAlchemy (the ``outside`` fixture).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import sa_rollback
from sa_rollback._adoption import has_noted
from sa_rollback._scope import LazyScope
from sa_rollback._state import STATE


@pytest.fixture(autouse=True)
def _nothing_lent_before() -> Iterator[None]:
    """Earlier tests' checkouts outside scopes are noted until a scope opens: drain them, as a test's
    first scope would, so that the lazy scope may wait. Each test ends its lazy scope either way."""
    gc.collect()  # checkouts garbage collected since: nothing to adopt
    with sa_rollback.rollback_scope("drain"):
        pass
    assert not has_noted()
    yield
    assert STATE.scopes == [] and STATE.top is None


def _insert(conn: sa.Connection, name: str) -> None:
    conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})


def _names(conn: sa.Connection) -> list[str]:
    return [row[0] for row in conn.execute(sa.text("SELECT name FROM items ORDER BY name"))]


def test_a_scope_nothing_uses_is_never_made(engine: sa.Engine) -> None:
    made: list[sa_rollback.RollbackScope] = []

    def make() -> sa_rollback.RollbackScope:
        made.append(sa_rollback.RollbackScope("test"))
        return made[-1]

    lazy = LazyScope(make)

    lazy.open()
    assert STATE.scopes == [] and lazy.scope is None
    assert lazy.end() is None
    assert made == [] and STATE.top is None


def test_a_held_connection_used_without_a_checkout_writes_into_the_lazy_scope(engine: sa.Engine, outside) -> None:
    """A module-wide connection, stood in during the data scope, is used by the test with no new checkout."""
    with sa_rollback.rollback_scope("module data"):
        conn = engine.connect()
        _insert(conn, "module")
        conn.commit()
        lazy = LazyScope(lambda: sa_rollback.RollbackScope("test"))
        lazy.open()
        _insert(conn, "test")  # the statement asks for the top: the test's scope is made here
        conn.commit()
        assert lazy.scope is not None and STATE.top is lazy.scope
        scope = lazy.end()
        assert scope is not None
        scope.close()
        assert _names(conn) == ["module"]  # the test's write went with the test's scope
        conn.close()
    assert outside("SELECT name FROM items") == []


def test_a_checkout_in_another_thread_makes_the_scope_once(engine: sa.Engine, outside) -> None:
    calls: list[int] = []

    def make() -> sa_rollback.RollbackScope:
        calls.append(threading.get_ident())
        return sa_rollback.RollbackScope("test")

    lazy = LazyScope(make)

    lazy.open()
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            with engine.begin() as conn:
                _insert(conn, name)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(calls) == 1
    with engine.connect() as conn:
        assert _names(conn) == ["t0", "t1", "t2", "t3"]  # one transaction: each sees the others'
    assert outside("SELECT count(*) FROM items") == [(0,)]
    scope = lazy.end()
    assert scope is not None
    scope.close()
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_a_scope_opened_inside_nests_in_the_lazy_one(engine: sa.Engine, outside) -> None:
    lazy = LazyScope(lambda: sa_rollback.RollbackScope("test"))
    lazy.open()
    with sa_rollback.rollback_scope("inner"):
        assert STATE.scopes[0] is lazy.scope  # made first, so that the inner one nests in it
        with engine.begin() as conn:
            _insert(conn, "inner")
    with engine.begin() as conn:
        _insert(conn, "outer")
        assert _names(conn) == ["outer"]
    scope = lazy.end()
    assert scope is not None
    scope.close()
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_a_connection_lent_before_makes_it_open_at_once(engine: sa.Engine, outside) -> None:
    """What is lent before a scope is adopted when the scope opens: then it cannot wait."""
    conn = engine.connect()
    conn.execute(sa.text("SELECT 1"))  # lent outside every scope, and still held
    try:
        lazy = LazyScope(lambda: sa_rollback.RollbackScope("test"))
        lazy.open()
        assert lazy.scope is not None and STATE.top is lazy.scope
        _insert(conn, "held")
        conn.commit()
        scope = lazy.end()
        assert scope is not None
        scope.close()
    finally:
        conn.close()
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_one_lazy_scope_serves_opening_after_opening(engine: sa.Engine, outside) -> None:
    """The plugin reuses one LazyScope for every test: each opening gets a scope of its own, or none."""
    made: list[sa_rollback.RollbackScope] = []

    def make() -> sa_rollback.RollbackScope:
        made.append(sa_rollback.RollbackScope(f"test {len(made)}"))
        return made[-1]

    lazy = LazyScope(make)
    for round_ in range(3):
        lazy.open()
        with engine.begin() as conn:
            _insert(conn, f"used {round_}")
        scope = lazy.end()
        assert scope is made[-1] and lazy.scope is None and STATE.top is scope
        scope.close()
        lazy.open()  # an opening nothing uses: no scope is made
        assert lazy.end() is None and STATE.top is None
    assert len(made) == 3 and len({id(scope) for scope in made}) == 3
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_a_thread_asking_while_another_makes_the_scope_waits_for_it() -> None:
    """Until the scope is on the stack, another thread's question waits: it must not see no scope."""
    started = threading.Event()

    def make() -> sa_rollback.RollbackScope:
        started.set()
        time.sleep(0.3)  # the other thread asks meanwhile
        return sa_rollback.RollbackScope("test")

    lazy = LazyScope(make)
    lazy.open()
    maker = threading.Thread(target=lazy.get)
    maker.start()
    assert started.wait(5)
    seen = STATE.top  # asked while the maker is still making it
    ended = lazy.end()  # the test ending meanwhile gets the scope to close, not "never made"
    maker.join()
    assert ended is not None and seen is ended
    ended.close()


def test_the_maker_asking_for_the_top_itself_finds_none_yet() -> None:
    """A maker may check out a connection (provisioning, say): for it the scope is not open yet."""
    asked: list[object] = []

    def make() -> sa_rollback.RollbackScope:
        asked.append(STATE.top)
        return sa_rollback.RollbackScope("test")

    lazy = LazyScope(make)
    lazy.open()
    scope = lazy.get()
    assert asked == [None] and STATE.top is scope
    assert lazy.end() is scope
    scope.close()


def test_a_scope_never_made_ends_without_waiting_for_the_lock() -> None:
    """Ending a lazy scope nothing used takes no lock: it is what every test that uses no database pays."""
    made: list[sa_rollback.RollbackScope] = []
    lazy = LazyScope(lambda: made.append(sa_rollback.RollbackScope("test")) or made[-1])
    lazy.open()
    ended: list[object] = []
    with STATE.lock:  # held meanwhile, as by a thread making a shared connection
        ender = threading.Thread(target=lambda: ended.append(lazy.end()))
        ender.start()
        ender.join(5)
        done = not ender.is_alive()
    ender.join()
    assert done and ended == [None] and made == []
