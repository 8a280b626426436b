"""SQLAlchemy 1.4's legacy mode: engine.execute, autocommit, legacy sessions and transactions.

In legacy mode 1.4 commits a DML or DDL statement run outside a transaction
(``engine.execute("INSERT ...")``, ``connection.execute(insert)``, a
``Session(autocommit=True)``): an application commit, which must behave as one.
Each test drives that API inside a scope and checks what every connection
sees; the autouse ``_no_leftovers`` fixture checks from outside SQLAlchemy
that nothing was left behind. The 2.0-style API on 1.4 ("future" mode) is
covered by the rest of the suite.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

import sa_rollback

from ._compat import SA14
from ._models import Item

pytestmark = pytest.mark.skipif(not SA14, reason="SQLAlchemy 2 has no legacy mode (engine.execute, autocommit)")

ITEMS = sa.table("items", sa.column("id"), sa.column("name"), sa.column("qty"))


@pytest.fixture
def legacy(url: str) -> Iterator[Any]:
    """A 1.4 engine in legacy mode, as Flask-SQLAlchemy 2.5 and 3.0 make them."""
    eng = sa.create_engine(url)
    yield eng
    eng.dispose()


def names(connectable: Any) -> list[str]:
    return [row[0] for row in connectable.execute(sa.text("SELECT name FROM items ORDER BY name"))]


# 1. an autocommit is a commit: every connection sees it, and it is gone afterwards -------


def test_engine_execute_autocommit_is_a_commit(legacy: Any, engine: sa.Engine, outside) -> None:
    with sa_rollback.rollback_scope():
        legacy.execute("INSERT INTO items (name) VALUES ('string')")  # a plain string, 1.4's legacy form
        legacy.execute(sa.text("INSERT INTO items (name) VALUES ('text')"))
        legacy.execute(ITEMS.insert().values(name="core"))
        with engine.connect() as other:  # a future-mode engine on the same database
            assert names(other) == ["core", "string", "text"]
        with Session(legacy) as session:
            assert [i.name for i in session.query(Item).order_by(Item.name)] == ["core", "string", "text"]
        assert outside("SELECT count(*) FROM items") == [(0,)]
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_autocommit_under_a_reader_survives_its_rollback(legacy: Any) -> None:
    """Semantics 3: a reader's transaction, open across another's autocommit, rolls back only itself."""
    with sa_rollback.rollback_scope():
        with legacy.connect() as reader:
            trans = reader.begin()
            assert names(reader) == []
            legacy.execute("INSERT INTO items (name) VALUES ('auto')")
            assert names(reader) == ["auto"]  # READ COMMITTED: the commit is visible
            trans.rollback()
        assert names(legacy) == ["auto"]


def test_rollback_after_another_autocommit_is_refused(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        with legacy.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('first')"))
            legacy.execute("INSERT INTO items (name) VALUES ('auto')")  # commits after first's write
            with pytest.raises(sa_rollback.InterleavedRollbackError, match="another transaction wrote"):
                trans.rollback()
        assert names(legacy) == ["auto", "first"]  # nothing silently lost


def test_execution_option_autocommit_commits_a_statement_1_4_would_not(legacy: Any) -> None:
    cte = "WITH i AS (INSERT INTO items (name) VALUES (:n) RETURNING 1) SELECT count(*) FROM i"
    with sa_rollback.rollback_scope():
        with legacy.connect() as conn:
            # Not a DML keyword first: 1.4 does not autocommit it, and the pool's reset undoes it.
            conn.execute(sa.text(cte), {"n": "undone"})
        assert names(legacy) == []
        with legacy.connect() as conn:
            conn.execute(sa.text(cte).execution_options(autocommit=True), {"n": "kept"})
        assert names(legacy) == ["kept"]


# 2. and 4. rollback of legacy transactions; failed autocommit statements -----------------


def test_legacy_transaction_rollback_undoes_only_its_own_work(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        legacy.execute("INSERT INTO items (name) VALUES ('before')")
        with legacy.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('dropped')"))
            trans.rollback()
            with conn.begin():
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('kept')"))
        assert names(legacy) == ["before", "kept"]


def test_failed_autocommit_statement_rolls_back_only_itself(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        legacy.execute("INSERT INTO items (name) VALUES ('dup')")
        with pytest.raises(sa.exc.IntegrityError):
            legacy.execute("INSERT INTO items (name) VALUES ('dup')")
        legacy.execute("INSERT INTO items (name) VALUES ('next')")
        assert names(legacy) == ["dup", "next"]


def test_failed_statement_in_a_legacy_transaction_then_rollback(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        legacy.execute("INSERT INTO items (name) VALUES ('dup')")
        with legacy.connect() as conn:
            trans = conn.begin()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('pending')"))
            with pytest.raises(sa.exc.IntegrityError):
                conn.execute(sa.text("INSERT INTO items (name) VALUES ('dup')"))
            assert names(legacy) == ["dup"]  # another connection goes on, and sees no failed work
            trans.rollback()
            assert names(conn) == ["dup"]


# 5. savepoints and legacy subtransactions -----------------------------------------------


def test_legacy_begin_nested_and_subtransactions(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        with legacy.connect() as conn:
            outer = conn.begin()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('outer')"))
            savepoint = conn.begin_nested()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('in-savepoint')"))
            savepoint.rollback()
            outer.commit()
        with legacy.connect() as conn:
            outer = conn.begin()
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('sub')"))
            inner = conn.begin()  # 1.4's legacy "subtransaction": its rollback dooms the outer one
            inner.rollback()
            assert not outer.is_active
            outer.rollback()
        assert names(legacy) == ["outer"]


# the legacy Session: autocommit=True, and the default ------------------------------------


def test_autocommit_session(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        session = Session(legacy, autocommit=True)
        session.execute(sa.text("INSERT INTO items (name) VALUES ('executed')"))  # autocommits
        session.add(Item(name="flushed"))
        session.flush()  # in autocommit mode a flush is its own committed transaction
        session.begin()
        session.add(Item(name="dropped"))
        session.flush()
        session.rollback()
        with session.begin():
            session.add(Item(name="committed"))
        session.close()
        assert names(legacy) == ["committed", "executed", "flushed"]


def test_legacy_session_commit_and_rollback(legacy: Any) -> None:
    with sa_rollback.rollback_scope():
        with Session(legacy) as session:
            session.add(Item(name="kept"))
            session.commit()
            session.execute(sa.text("INSERT INTO items (name) VALUES ('dropped')"))  # no autocommit here
            session.rollback()
            assert [i.name for i in session.query(Item)] == ["kept"]


# 8. and 10. DDL autocommits; a commit inside a multi-statement string --------------------


def test_ddl_autocommit_is_rolled_back(legacy: Any, outside) -> None:
    with sa_rollback.rollback_scope():
        legacy.execute("CREATE TABLE made_by_legacy (x int)")
        legacy.execute("INSERT INTO made_by_legacy VALUES (1)")
        assert legacy.execute(sa.text("SELECT count(*) FROM made_by_legacy")).scalar() == 1
    assert outside("SELECT to_regclass('made_by_legacy')") == [(None,)]


def test_multi_statement_commit_through_engine_execute_is_refused(legacy: Any, outside) -> None:
    with pytest.raises(sa_rollback.TransactionEscapeError):
        with sa_rollback.rollback_scope():
            legacy.execute("INSERT INTO items (name) VALUES ('x'); COMMIT")
    assert outside("SELECT count(*) FROM items") == [(0,)]


# 13. a legacy connection held across the scope's boundary --------------------------------


def test_legacy_connection_held_across_scopes_joins_each(legacy: Any, outside) -> None:
    conn = legacy.connect()
    try:
        conn.execute(sa.text("SELECT 1"))  # the DBAPI connection is in a read-only transaction
        for name in ("first", "second"):
            with sa_rollback.rollback_scope():
                conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})  # autocommits
                assert names(legacy) == [name]
            assert outside("SELECT count(*) FROM items") == [(0,)]
        assert names(conn) == []
    finally:
        conn.close()
