"""pytest-flask-sqlalchemy's documented behaviours, through sa_rollback: the migration path.

A suite written for that plugin (a ``_db`` fixture returning the Flask-SQLAlchemy
``db``; tests on ``db_session`` and ``db_engine``; application code committing
through ``db.session``; raw ``engine.execute`` on SQLAlchemy 1.4; its
``mocked-*`` ini keys) runs in a subprocess with sa_rollback enabled instead.
Each test checks what the application sees, the next test checks that it
starts clean, and the outer test checks from a plain connection outside
SQLAlchemy that nothing was left behind. The same suite with isolation
switched off fails, so the inner checks can fail.

Runs on whichever Flask-SQLAlchemy is installed: 2.5 or 3.0 on SQLAlchemy 1.4
(CI's 1.4 leg), 3.1 on 2.x.
"""

from __future__ import annotations

import pytest

from ._compat import SA14
from .conftest import driver_url

pytestmark = pytest.mark.usefixtures("_inner_env")

APP = """
import os

import sqlalchemy as sa
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["INNER_URL"]
app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
db = SQLAlchemy(app)


class Item(db.Model):
    __tablename__ = "items"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.Text, nullable=False, unique=True)
    qty = db.Column(db.Integer, nullable=False, default=0)


@app.route("/items/<name>", methods=["POST"])
def add_item(name):
    db.session.add(Item(name=name))
    db.session.commit()
    return "created"


@app.route("/items")
def list_items():
    return ",".join(item.name for item in Item.query.order_by(Item.name))


#: SQLAlchemy 1.4's Engine.execute, which pytest-flask-sqlalchemy's README uses on db_engine
LEGACY_EXECUTE = hasattr(sa.engine.Engine, "execute")
"""

# The conftest of a pytest-flask-sqlalchemy project, with the plugin line changed.
CONFTEST = """
import pytest
import sqlalchemy as sa

from app import Item, app, db

pytest_plugins = ["sa_rollback"]


@pytest.fixture(scope="session")
def _app_context():
    with app.app_context():  # Flask-SQLAlchemy 3 needs one for db.engine and db.session
        yield


@pytest.fixture(scope="session")
def _db(_app_context):
    db.create_all()  # the tables exist: nothing to create, as in a project whose schema is migrated
    with db.engine.begin() as conn:  # seed data of a session fixture: real, and removed at the end
        conn.execute(sa.text("INSERT INTO items (name, qty) VALUES ('seed', 1)"))
    yield db
    with db.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE name = 'seed'"))
"""

TESTS = """
import pytest
import sqlalchemy as sa

from app import LEGACY_EXECUTE, Item, app, db


def names(connectable):
    rows = connectable.execute(sa.text("SELECT name FROM items ORDER BY name"))
    return [row[0] for row in rows]


def test_1_db_session_is_the_apps_session_and_commits(db_session):
    assert db_session is db.session
    seed = db_session.query(Item).filter_by(name="seed").one()  # the README's pattern: change a row
    seed.qty = 99
    db_session.add(Item(name="from-test"))
    db_session.commit()
    assert [i.name for i in Item.query.order_by(Item.name)] == ["from-test", "seed"]
    with db.engine.connect() as other:  # another connection of the app sees the commit
        assert names(other) == ["from-test", "seed"]


def test_2_next_test_is_clean(db_session):
    assert [(i.name, i.qty) for i in db_session.query(Item)] == [("seed", 1)]


def test_3_db_engine_is_the_apps_engine(db_engine):
    assert db_engine is db.engine
    with db_engine.begin() as conn:
        conn.execute(sa.text("UPDATE items SET name = 'renamed' WHERE name = 'seed'"))
    assert db.session.query(Item).one().name == "renamed"


@pytest.mark.skipif(not LEGACY_EXECUTE, reason="SQLAlchemy 2 has no Engine.execute")
def test_4_raw_engine_execute_autocommits(db_engine, db_session):
    db_engine.execute("INSERT INTO items (name) VALUES ('raw')")  # 1.4 autocommits a DML string
    db_engine.execute(sa.text("UPDATE items SET qty = 5 WHERE name = 'raw'"))
    assert [(i.name, i.qty) for i in db_session.query(Item).order_by(Item.name)] == [("raw", 5), ("seed", 1)]
    with pytest.raises(sa.exc.IntegrityError):  # a failed autocommit statement: its own rollback only
        db_engine.execute("INSERT INTO items (name) VALUES ('raw')")
    assert names(db_engine) == ["raw", "seed"]


def test_5_views_commit_through_db_session(db_session):
    client = app.test_client()
    assert client.post("/items/from-view").status_code == 200
    assert client.get("/items").data == b"from-view,seed"
    assert db_session.query(Item).count() == 2


def test_6_all_clean(db_engine):
    with db_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name, qty FROM items")).fetchall() == [("seed", 1)]
"""


@pytest.fixture
def _inner_env(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))


def _suite(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(app=APP, conftest=CONFTEST, test_peer=TESTS)
    # pytest-flask-sqlalchemy's keys, still in the project's ini file
    pytester.makeini("[pytest]\nmocked-sessions = app.db.session\nmocked-engines = app.db.engine\n")


def test_a_pytest_flask_sqlalchemy_suite_passes_and_leaves_nothing(pytester: pytest.Pytester, outside) -> None:
    _suite(pytester)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rs")
    if SA14:
        result.assert_outcomes(passed=6)
    else:  # Engine.execute is 1.4's: that test skips on 2.x
        result.assert_outcomes(passed=5, skipped=1)
    result.stdout.fnmatch_lines(["*mocked-engines, mocked-sessions come from pytest-flask-sqlalchemy*"])
    assert outside("SELECT name, qty FROM items") == []


def test_the_same_suite_without_isolation_fails(pytester: pytest.Pytester, outside) -> None:
    _suite(pytester)
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--sa-rollback=off")
        failed = {line.split("::")[1].split(" ")[0] for line in result.stdout.lines if line.startswith("FAILED")}
        assert {"test_2_next_test_is_clean", "test_6_all_clean"} <= failed, result.stdout.str()
    finally:
        outside("DELETE FROM items RETURNING name")
