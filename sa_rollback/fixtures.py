"""Fixtures of the pytest plugin. Their docstrings are what ``pytest --fixtures`` shows."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pytest

from ._queries import Queries
from ._run import TESTS, databases_key, settings_key
from ._scope import RollbackScope
from ._settings import Settings
from .errors import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, scoped_session

    #: what db_session gives: a Session, or Flask-SQLAlchemy's scoped session (``_db.session``)
    AnySession = Union[Session, scoped_session[Session]]


@pytest.fixture(scope="session")
def sa_rollback_settings(pytestconfig: pytest.Config) -> Settings:
    """The resolved sa_rollback settings of this run (a frozen dataclass)."""
    return pytestconfig.stash[settings_key]


@pytest.fixture
def sa_rollback_scope(request: pytest.FixtureRequest) -> Optional[RollbackScope]:
    """The :class:`sa_rollback.RollbackScope` of the current test, or None when disabled.

    Everything the test writes to PostgreSQL, through any engine, is rolled back
    when it closes. ``sa_rollback_scope.errors`` lists problems that SQLAlchemy
    would otherwise swallow; the test fails with the first one at teardown.
    """
    tests = TESTS.get(request.config)
    return None if tests is None else tests.current(request.node)


@pytest.fixture(scope="session")
def sa_rollback_url(pytestconfig: pytest.Config) -> str:
    """The URL of this process's test database, as a string (it holds any password; do not print it).

    With ``--sa-url`` and no schema setting, serial runs use that database as it
    is. Otherwise it is a clone of the schema template made for this process
    (each xdist worker has its own), and the application's connections to the
    configured database are redirected to it. With no URL at all, it lives on
    an embedded PostgreSQL server started for the run.
    """
    return pytestconfig.stash[databases_key].get().url_string()


@pytest.fixture(scope="session")
def sa_rollback_make_database(pytestconfig: pytest.Config, sa_rollback_url: str) -> Callable[[str], str]:
    """Make another empty database of this process's own: ``url = sa_rollback_make_database("audit")``.

    For applications with several databases (Flask-SQLAlchemy ``SQLALCHEMY_BINDS``).
    Each xdist worker gets its own; all are dropped at the end of the run. What
    tests write there is rolled back like everything else.
    """
    databases = pytestconfig.stash[databases_key]

    def make(suffix: str) -> str:
        return databases.get().extra(suffix, databases.run_id).render_as_string(hide_password=False)

    return make


@pytest.fixture(scope="session")
def sa_rollback_engine(sa_rollback_url: str) -> Generator[Engine, None, None]:
    """A SQLAlchemy engine on the test database, shared by the whole run."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(sa_rollback_url)
    yield engine
    engine.dispose()


def _user_db(request: pytest.FixtureRequest) -> Any:
    try:
        return request.getfixturevalue("_db")
    except pytest.FixtureLookupError:
        return None


@pytest.fixture
def db_engine(request: pytest.FixtureRequest) -> Engine:
    """An engine on the test database; what it writes is rolled back after the test.

    When the project defines a ``_db`` fixture (pytest-flask-sqlalchemy's
    convention: it returns the Flask-SQLAlchemy ``db``), this is ``_db.engine``.
    Otherwise it is an engine on the database that sa_rollback provides. Any
    other engine is rolled back too; this one is just at hand.
    """
    db = _user_db(request)
    if db is not None:
        try:
            engine: Engine = db.engine
            return engine
        except RuntimeError as exc:
            raise ConfigurationError(
                f"`_db.engine` failed: {exc}. Flask-SQLAlchemy 3 needs an application context; "
                "request a fixture that pushes one (with app.app_context(): yield) before db_engine."
            ) from None
    provided: Engine = request.getfixturevalue("sa_rollback_engine")
    return provided


@pytest.fixture
def db_session(request: pytest.FixtureRequest) -> Generator[AnySession, None, None]:
    """A SQLAlchemy session on the test database; commit freely, it is all rolled back.

    With a ``_db`` fixture (pytest-flask-sqlalchemy's convention) this is
    ``_db.session``, the very session the application uses, so the test and the
    views share one identity map as they did under pytest-flask-sqlalchemy; it
    is ended after the test (``remove()``), as that plugin did, so that an app
    context kept for a whole module starts each test with a fresh session.
    Otherwise it is a new ``Session`` on ``db_engine``, closed after the test.
    """
    db = _user_db(request)
    if db is not None:
        session = db.session
        try:
            yield session
        finally:
            end = getattr(session, "remove", None) or session.close
            try:
                end()
            except RuntimeError:
                # "Working outside of application context": the app context
                # ended first, and Flask-SQLAlchemy removed the session then.
                pass
        return
    from sqlalchemy.orm import Session

    session = Session(bind=request.getfixturevalue("db_engine"))
    try:
        yield session
    finally:
        session.close()


@pytest.fixture(scope="session")
def sa_rollback_session_scope() -> None:
    """Request it from a session fixture to roll back what that fixture writes at the end of the run.

    ``def tenant(sa_rollback_session_scope): ...``: the fixture (and the fixtures
    it requests) runs in a rollback scope of its own that lives as long as pytest
    keeps the fixture. Every test sees its data as the fixture left it, in a
    scope nested inside, so what a test writes is undone before the next one.
    Scopes nest: session, package, module, class, test. A wider fixture that
    requests none of the ``sa_rollback_*_scope`` fixtures commits for real.
    """


@pytest.fixture(scope="package")
def sa_rollback_package_scope() -> None:
    """Request it from a package fixture to roll back what that fixture writes when the package ends.

    Works as ``sa_rollback_session_scope`` does, for one package.
    """


@pytest.fixture(scope="module")
def sa_rollback_module_scope() -> None:
    """Request it from a module fixture to roll back what that fixture writes when the module ends.

    ``def catalog(sa_rollback_module_scope): return load_catalog()``: the tests
    of the module see the catalog exactly as the fixture left it, their own
    writes are undone after each test, and after the module the catalog is
    gone. A parametrized fixture's data goes when its parameter changes.
    """


@pytest.fixture(scope="class")
def sa_rollback_class_scope() -> None:
    """Request it from a class fixture to roll back what that fixture writes when the class ends.

    Works as ``sa_rollback_module_scope`` does, for one test class (Django's
    ``setUpTestData``).
    """


@pytest.fixture
def sa_queries(request: pytest.FixtureRequest) -> Generator[Queries, None, None]:
    """Every statement the test sends from here on, through any engine: ``sa_queries.assert_count(2)``.

    pytest-django's ``django_assert_num_queries``, for sa_rollback. Each recorded
    statement (``sa_queries.statements``) has ``sql``, ``params``, ``database``
    and ``duration`` (seconds in the driver; None for a COMMIT or savepoint
    that sa_rollback answered itself). sa_rollback's own savepoints and
    rollbacks are not recorded.

    * ``sa_queries.count``: how many so far; ``sa_queries.clear()`` starts over.
    * ``sa_queries.assert_count(n)``: fail, listing the statements numbered, unless exactly ``n`` were sent.
    * ``with sa_queries.expect(n): ...``: the same for the statements of the block only.
    * ``sa_queries.on("dbname")``, or ``database="dbname"`` on the two above: one database only.
      The configured database's name stands for the clone the tests actually run on.

    Recording starts when the fixture is set up: fixtures set up before it are
    not counted. It needs the test's rollback scope (not with
    ``--sa-rollback=off`` or ``@pytest.mark.sa_rollback(enabled=False)`` or
    ``real_commits=True``). Without pytest: ``with sa_rollback.capture_queries() as queries:``.
    """
    tests = TESTS.get(request.config)
    if tests is None or tests.item is not request.node:
        raise ConfigurationError(
            f"sa_queries records the statements of the test's rollback scope, and {request.node.nodeid} runs "
            "without one (--sa-rollback=off, or @pytest.mark.sa_rollback(enabled=False) or real_commits=True)."
        )
    aliases: dict[str, str] = {}
    provisioned = request.config.stash[databases_key].provisioned
    if provisioned is not None and provisioned.base and provisioned.created:
        aliases[provisioned.base] = provisioned.database
    with Queries(aliases) as queries:
        yield queries
