"""Connections held across tests, the way real suites hold them, through the plugin.

Each inner session runs in a subprocess (the listeners are process-wide), on
psycopg2 and psycopg 3, and is judged afterwards from a plain connection.
"""

from __future__ import annotations

import pytest

from .inner_projects import FLASK_APP

pytestmark = pytest.mark.usefixtures("_inner_env")

ENABLE = 'pytest_plugins = ["sa_rollback"]\n'

MODELS = """
import os
import sqlalchemy as sa
from sqlalchemy.orm import Session, declarative_base

# 2.0 style on every line: "future" mode on SQLAlchemy 1.4
ENGINE = sa.create_engine(os.environ["INNER_URL"], **({"future": True} if sa.__version__ < "2" else {}))
# Classic declarations, which SQLAlchemy 1.4 and 2.x read alike.
Base = declarative_base()


class Item(Base):
    __tablename__ = "items"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.Text, nullable=False)
    qty = sa.Column(sa.Integer, nullable=False, default=0)
"""


SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL, qty int NOT NULL DEFAULT 0);\n"


@pytest.fixture(params=["serial", "xdist"])
def mode(request: pytest.FixtureRequest) -> str:
    """Serially on the suite's database, or with two workers, each on its own clone of a schema template."""
    return str(request.param)


@pytest.fixture
def _inner_env(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    from .conftest import driver_url

    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))


def run(pytester: pytest.Pytester, mode: str) -> pytest.RunResult:
    args = ["-p", "no:cacheprovider"]
    if mode == "xdist":
        # One module per worker, so that a module's tests still follow each other.
        pytester.makefile(".sql", schema=SCHEMA)
        args += ["-n", "2", "--dist", "loadfile", "--sa-schema=sql:schema.sql"]
    return pytester.runpytest_subprocess(*args)


def test_module_session_reused_by_tests(pytester: pytest.Pytester, outside, mode: str) -> None:
    """A module fixture commits an object, reads it back (a transaction is then open), and tests change it."""
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        models=MODELS,
        test_module_session="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        from models import ENGINE, Item

        @pytest.fixture(scope="module")
        def session():
            with Session(ENGINE) as s:
                yield s

        @pytest.fixture(scope="module")
        def master(session):
            item = Item(name="module-master")
            session.add(item)
            session.commit()
            item.id  # the refresh opens a transaction: the session holds its connection
            yield item
            session.delete(item)
            session.commit()

        def test_change(session, master):
            master.name = "module-master-changed"
            session.commit()
            assert session.scalar(sa.select(Item.name)) == "module-master-changed"

        def test_sees_the_original(session, master):
            session.expire_all()
            assert master.name == "module-master"

        def test_again(session, master):
            master.qty = 5
            session.commit()
        """,
    )
    run(pytester, mode).assert_outcomes(passed=3)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_connection_opened_at_import_in_conftest_and_module(pytester: pytest.Pytester, outside, mode: str) -> None:
    pytester.makeconftest(
        """
import sqlalchemy as sa
from models import ENGINE

CONFTEST_CONN = ENGINE.connect()  # before the plugin is even loaded
CONFTEST_CONN.execute(sa.text("SELECT 1"))

pytest_plugins = ["sa_rollback"]
"""
    )
    pytester.makepyfile(
        models=MODELS,
        test_import="""
        import sqlalchemy as sa
        from conftest import CONFTEST_CONN
        from models import ENGINE

        MODULE_CONN = ENGINE.connect()  # at collection

        def insert(conn, name):
            conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
            conn.commit()

        def count(conn, name=None):
            where = "" if name is None else " WHERE name = :n"
            return conn.execute(sa.text("SELECT count(*) FROM items" + where), {"n": name}).scalar()

        def test_write_through_both():
            # Under xdist the conftest's connection predates the redirect to the worker's clone.
            insert(CONFTEST_CONN, "from conftest")
            insert(MODULE_CONN, "from module")
            assert count(CONFTEST_CONN, "from conftest") == 1
            assert count(MODULE_CONN, "from module") == 1

        def test_both_start_clean():
            assert count(CONFTEST_CONN) == 0
            assert count(MODULE_CONN) == 0
        """,
    )
    run(pytester, mode).assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_session_fixture_connection_written_by_tests(pytester: pytest.Pytester, outside, mode: str) -> None:
    pytester.makeconftest(
        ENABLE
        + """
import pytest
from models import ENGINE

@pytest.fixture(scope="session")
def conn():
    with ENGINE.connect() as c:
        yield c
"""
    )
    pytester.makepyfile(
        models=MODELS,
        test_session_conn="""
        import sqlalchemy as sa

        def test_write(conn):
            conn.execute(sa.text("INSERT INTO items (name) VALUES ('a')"))
            conn.commit()
            assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 1

        def test_clean(conn):
            assert conn.execute(sa.text("SELECT count(*) FROM items")).scalar() == 0
        """,
    )
    run(pytester, mode).assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_uncommitted_writes_of_a_fixture_fail_the_test_clearly(pytester: pytest.Pytester, outside, mode: str) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        models=MODELS,
        test_pending="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        from models import ENGINE, Item

        @pytest.fixture(scope="module")
        def session():
            with Session(ENGINE) as s:
                s.add(Item(name="never committed"))
                s.flush()
                yield s
                s.rollback()

        def test_uses_it(session):
            session.add(Item(name="inside"))
            session.commit()
        """,
    )
    result = run(pytester, mode)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*HeldConnectionError: A connection to * checked out before the current rollback scope began "
            "(at *test_pending.py:* in session()), holds uncommitted writes*",
        ]
    )
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_flask_sqlalchemy_with_a_module_wide_app_context(pytester: pytest.Pytester, outside, mode: str) -> None:
    """The migration case: pytest-flask-sqlalchemy's `_db` / `db_session`, one app context per module."""
    pytester.makeconftest(
        ENABLE
        + FLASK_APP
        + """

@pytest.fixture(scope="module")
def _db(app):
    return db


@pytest.fixture(scope="module")
def person(_db):
    item = Item(name="module-master")
    _db.session.add(item)
    _db.session.commit()
    item_id = item.id  # leaves db.session in a transaction, holding a connection
    yield item_id
    _db.session.execute(_db.delete(Item).where(Item.id == item_id))
    _db.session.commit()
"""
    )
    pytester.makepyfile(
        test_flask="""
        from conftest import Item

        def test_update(db_session, person):
            item = db_session.get(Item, person)
            item.name = "module-master-changed"
            db_session.commit()
            assert db_session.get(Item, person).name == "module-master-changed"

        def test_next_sees_the_original(db_session, person):
            assert db_session.get(Item, person).name == "module-master"

        def test_adds(db_session, person):
            db_session.add(Item(name="extra"))
            db_session.commit()
            assert db_session.query(Item).count() == 2
        """,
    )
    run(pytester, mode).assert_outcomes(passed=3)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_wider_fixture_set_up_mid_test_through_a_held_session(pytester: pytest.Pytester, outside, mode: str) -> None:
    """A module fixture set up during a test writes through a session the session fixture holds: real."""
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(
        models=MODELS,
        test_mid="""
        import pytest
        import sqlalchemy as sa
        from sqlalchemy.orm import Session
        from models import ENGINE, Item

        @pytest.fixture(scope="session")
        def session():
            with Session(ENGINE) as s:
                s.execute(sa.text("SELECT 1"))
                yield s

        @pytest.fixture(scope="module")
        def seeded(session):
            session.add(Item(name="seed"))
            session.commit()
            yield
            session.execute(sa.delete(Item).where(Item.name == "seed"))
            session.commit()

        def test_first(session, request):
            assert list(session.scalars(sa.select(Item.name))) == []  # joins the test, in a transaction
            request.getfixturevalue("seeded")  # its commit through the same session is real
            session.add(Item(name="mine"))
            session.commit()
            assert sorted(session.scalars(sa.select(Item.name))) == ["mine", "seed"]
            session.commit()  # ends the session's transaction before the test ends

        def test_second(session, seeded):
            assert list(session.scalars(sa.select(Item.name))) == ["seed"]
            session.commit()
        """,
    )
    run(pytester, mode).assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]
