"""Shared fixtures of sa_rollback's own suite.

The suite talks to a real PostgreSQL server: ``SA_ROLLBACK_TEST_URL`` if set,
otherwise the server on 127.0.0.1:5432, otherwise the embedded server. It never
skips when the server is missing; it fails, saying which server it tried.

Each test process (the serial process, or each xdist worker) works in two
databases of its own, ``DB_A`` and ``DB_B``, so that two runs on one server, or
the workers of ``pytest -n``, never see each other's rows:

* their names carry the run id and the xdist worker id. The run id is put in
  the environment (``SA_ROLLBACK_SELFTEST_RUN``) by the first process of a run,
  at import, so the xdist workers it spawns and the pytest runs that tests start
  inherit it, and a child process that imports this file computes the same names;
* the process that creates them (at the first test that needs the server) drops
  them when its session ends; child processes that inherit them leave them alone;
* each carries a ``COMMENT ON DATABASE`` mark: the machine (host name, boot id,
  pid namespace), the pid and start time of its process, the creation time. At
  start, marked databases of earlier runs are dropped when their process is
  provably gone (same machine, and no such pid, or the pid now belongs to a
  process that started at another time); those made elsewhere, when they are
  older than a day. Unmarked databases are never dropped.

Nothing here connects at import time: ``tests/unit`` runs without a server
(its conftest overrides the autouse fixture that needs one).
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.engine import make_url

import sa_rollback
from sa_rollback._state import STATE

from . import _compat

DRIVERS = _compat.DRIVERS
ASYNC_DRIVERS = _compat.ASYNC_DRIVERS
#: the event loop that runs an async-driver test's body (see pytest_pyfunc_call)
LOOP = pytest.StashKey[asyncio.AbstractEventLoop]()

#: the run id, shared by every process of one run through the environment
RUN_ENV = "SA_ROLLBACK_SELFTEST_RUN"
RUN_ID = os.environ.setdefault(RUN_ENV, uuid.uuid4().hex[:8])
#: set by the process that created DB_A/DB_B, for the child processes that inherit them
_OWNED_ENV = "SA_ROLLBACK_SELFTEST_OWNED"
#: xdist sets PYTEST_XDIST_WORKER in each worker's environment before it imports conftest files;
#: the worker passes its id on to the processes its tests start, which see no PYTEST_XDIST_WORKER
_WORKER_ENV = "SA_ROLLBACK_SELFTEST_WORKER"
WORKER = os.environ.get("PYTEST_XDIST_WORKER") or os.environ.get(_WORKER_ENV) or "main"
os.environ[_WORKER_ENV] = WORKER
#: what xdist puts in a worker's environment
_XDIST_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")
PREFIX = "sa_rollback_selftest_"
DB_A = f"{PREFIX}{RUN_ID}_{WORKER}_a"
DB_B = f"{PREFIX}{RUN_ID}_{WORKER}_b"
MARK = "sa_rollback_selftest:"
STALE_AFTER = 24 * 3600  # seconds; for databases whose process cannot be checked

SCHEMA = """
CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL, qty int NOT NULL DEFAULT 0);
CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL);
"""


# -- the server, found on first use ------------------------------------------------------------

_admin_url: Optional[str] = None


def admin_url() -> str:
    """The server of the suite: SA_ROLLBACK_TEST_URL, else the local one, else an embedded one.

    Resolved on first use, not at import, so that tests that need no server never start one.
    The result goes into the environment, so that xdist workers and subprocesses agree.
    """
    global _admin_url
    if _admin_url is None:
        explicit = os.environ.get("SA_ROLLBACK_TEST_URL")
        if not explicit:
            explicit = _find_server()
            os.environ["SA_ROLLBACK_TEST_URL"] = explicit
        _admin_url = explicit
    return _admin_url


def _find_server() -> str:
    local = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        psycopg.connect(local, connect_timeout=3).close()
        return local
    except psycopg.OperationalError:
        pass
    from pathlib import Path

    from sa_rollback._settings import OPTIONS
    from sa_rollback.databases import embedded_server

    # Beside the plugin's default directory (as root under /var/tmp: the server's user must traverse it).
    default = next(option.default for option in OPTIONS if option.field == "server_dir")
    cache = Path(default).parent / "sa_rollback_selftest"
    server = embedded_server(cache)
    return server.admin_url.render_as_string(hide_password=False)


def __getattr__(name: str) -> Any:
    # ADMIN_URL stays importable as a constant (``from .conftest import ADMIN_URL``) while the
    # server behind it is only looked for when a module that needs it asks.
    if name == "ADMIN_URL":
        return admin_url()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def libpq_dsn(database: str) -> str:
    url = make_url(admin_url()).set(database=database)
    return (
        url.render_as_string(hide_password=False)
        .replace("postgresql+psycopg2://", "postgresql://")
        .replace("postgresql+psycopg://", "postgresql://")
    )


def driver_url(driver: str, database: str = DB_A) -> str:
    url = make_url(admin_url()).set(drivername=f"postgresql+{driver}", database=database)
    return url.render_as_string(hide_password=False)


def pytest_report_header() -> str:
    where = os.environ.get("SA_ROLLBACK_TEST_URL")
    shown = make_url(where).render_as_string(hide_password=True) if where else "127.0.0.1:5432, else embedded"
    return f"sa_rollback test server: {shown}; databases {PREFIX}{RUN_ID}_<worker>_a/_b"


# -- the suite's own databases ------------------------------------------------------------------


def _start_time(pid: int) -> str:
    """When the process started (Linux), which tells a reused pid from the original; '' elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _this_machine() -> str:
    """The host, its boot and the pid namespace: where a pid in a mark can be looked up."""
    boot = pidns = ""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()[:8]
        pidns = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        pass
    return f"{socket.gethostname()}/{boot}/{pidns}"


def _mark() -> str:
    pid = os.getpid()
    return f"{MARK} host={_this_machine()} pid={pid} start={_start_time(pid)} created={int(time.time())}"


def _parse_mark(comment: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in comment[len(MARK) :].split() if "=" in part)


def _process_alive(fields: dict[str, str]) -> Optional[bool]:
    """Is the process that created a database alive? None when that cannot be told from here."""
    if fields.get("host") != _this_machine() or not fields.get("pid", "").isdigit():
        return None
    pid = int(fields["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    start = _start_time(pid)
    return not (start and fields.get("start") and start != fields["start"])  # else the pid was reused


def _stale(comment: Optional[str], now: float) -> bool:
    """Is this a database of the suite whose run is over?"""
    if not comment or not comment.startswith(MARK):
        return False  # not ours: never touched
    fields = _parse_mark(comment)
    alive = _process_alive(fields)
    if alive is not None:
        return not alive
    created = fields.get("created", "")
    return created.isdigit() and now - int(created) > STALE_AFTER


def _marked_databases(admin: psycopg.Connection[Any]) -> list[tuple[str, Optional[str]]]:
    rows = admin.execute(
        "SELECT datname, shobj_description(oid, 'pg_database') FROM pg_database WHERE datname LIKE %s",
        (PREFIX.replace("_", r"\_") + "%",),
    ).fetchall()
    return [(str(name), comment) for name, comment in rows]


def _sweep(admin: psycopg.Connection[Any]) -> None:
    """Drop the suite's databases left by crashed runs (see the module docstring)."""
    now = time.time()
    for name, comment in _marked_databases(admin):
        if name in (DB_A, DB_B) or not _stale(comment, now):
            continue
        _drop_quietly(admin, name, "stale self-test database")
    _drop_made_from(admin, keep_bases=(DB_A, DB_B))


def _drop_quietly(admin: psycopg.Connection[Any], name: str, what: str) -> None:
    try:
        # No FORCE: a database that is still in use is not stale after all.
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
    except psycopg.Error as exc:
        warnings.warn(f"left the {what} {name} in place: {exc}", stacklevel=1)


#: sa_rollback's own mark on what it makes (templates, clones): "base=" names the configured database
_BASE = re.compile(r"^sa_rollback:\S+ .*\bbase=(\S+)")


def _drop_made_from(admin: psycopg.Connection[Any], keep_bases: tuple[str, ...] = ()) -> None:
    """Drop what sa_rollback made, in the suite's inner runs, from a self-test database that is gone.

    Inner runs point sa_rollback at DB_A or DB_B; the templates it builds from them outlive those
    runs by design (a later run reuses them), so the suite drops them itself: at its end, those
    of its own databases, and at start, those whose database is gone (a crashed run's).
    """
    existing = {name for name, _ in _marked_databases(admin)}
    for name, comment in _marked_databases(admin):
        found = _BASE.match(comment or "")
        base = found.group(1) if found else None
        if base is None or not base.startswith(PREFIX) or base in keep_bases or base in existing:
            continue
        _drop_quietly(admin, name, "database sa_rollback made from a self-test database")


def _drop_own(admin: psycopg.Connection[Any], name: str) -> None:
    """Drop one of this process's databases, after checking the mark is still there."""
    row = admin.execute(
        "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = %s", (name,)
    ).fetchone()
    if row is None:
        return
    fields = _parse_mark(row[0]) if row[0] and row[0].startswith(MARK) else {}
    if fields.get("pid") != str(os.getpid()) or fields.get("host") != _this_machine():
        warnings.warn(f"did not drop {name}: its mark {row[0]!r} is not this process's", stacklevel=1)
        return
    # FORCE: pooled connections of engines that tests left undisposed must not keep it alive.
    admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _connect_admin() -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(
            libpq_dsn(make_url(admin_url()).database or "postgres"), autocommit=True, connect_timeout=5
        )
    except psycopg.OperationalError as exc:
        url = make_url(admin_url())
        pytest.exit(
            f"PostgreSQL is unreachable at {url.host}:{url.port or 5432} ({exc}). Start it, or point "
            "SA_ROLLBACK_TEST_URL at a server where this role may create databases.",
            returncode=3,
        )


@pytest.fixture(scope="session")
def _selftest_databases() -> Iterator[tuple[str, str]]:
    """DB_A and DB_B with the suite's tables, created for this process and dropped at its end."""
    if os.environ.get(_OWNED_ENV) == DB_A:
        # A process of the suite started this one (a pytester subprocess that imports this
        # file): the databases are its, and it drops them.
        yield DB_A, DB_B
        return
    os.environ[_OWNED_ENV] = DB_A
    try:
        with _connect_admin() as admin:
            _sweep(admin)
            for name in (DB_A, DB_B):
                # CREATE DATABASE cannot run in a transaction: the mark follows at once.
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                admin.execute(
                    sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(_mark()))
                )
        for name in (DB_A, DB_B):
            with psycopg.connect(libpq_dsn(name), autocommit=True) as conn:
                conn.execute(SCHEMA)
        yield DB_A, DB_B
    finally:
        os.environ.pop(_OWNED_ENV, None)
        with _connect_admin() as admin:
            for name in (DB_A, DB_B):
                _drop_own(admin, name)
            _drop_made_from(admin)


@pytest.fixture(autouse=True)
def _subprocesses_are_not_xdist_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pytest run that a test starts is a run of its own, as from a shell, not an xdist worker.

    Inner runs inherit the environment; under ``-n`` it says PYTEST_XDIST_WORKER=gw0, and code
    that reads it (the inner tests, xdist itself) would take a plain inner run for a worker.
    """
    for name in _XDIST_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _no_leftovers(_selftest_databases: tuple[str, str]) -> Iterator[None]:
    yield
    assert STATE.top is None, "a test left a rollback scope open"
    for name in _selftest_databases:
        with psycopg.connect(libpq_dsn(name), autocommit=True) as conn:
            left = conn.execute("SELECT (SELECT count(*) FROM items) + (SELECT count(*) FROM notes)").fetchone()
            if left and left[0]:
                conn.execute("TRUNCATE items, notes RESTART IDENTITY")
                pytest.fail(f"{left[0]} rows leaked into {name}")


# -- fixtures of the semantic tests ---------------------------------------------------------


#: The driver of tests in which the DBAPI driver plays no part (the plugin's wiring, pool handling,
#: statements refused before they run, threads taking turns): the one a plain postgresql:// URL gets.
#: Where the driver's behaviour is involved (transaction status, autocommit, COPY, streaming,
#: driver_connection, errors, cancelling) and in test_semantics.py, tests run on both.
ANY_DRIVER = make_url("postgresql://").get_dialect().driver
any_driver = pytest.mark.parametrize("driver", [ANY_DRIVER])


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    """The DBAPI driver under test: psycopg2 and psycopg 3, unless a test is marked ``@any_driver``."""
    return str(request.param)


@pytest.fixture
def url(driver: str, request: pytest.FixtureRequest) -> str:
    if driver in ASYNC_DRIVERS:
        # The test's body runs on this loop, in SQLAlchemy's greenlet; it closes last.
        loop = asyncio.new_event_loop()
        request.node.stash[LOOP] = loop
        request.addfinalizer(lambda: loop.close())  # looked up late: sa_rollback wraps close()
    return driver_url(driver)


@pytest.fixture
def engine(url: str, request: pytest.FixtureRequest) -> Iterator[sa.Engine]:
    eng = _compat.create_engine(url)
    yield eng
    loop = request.node.stash.get(LOOP, None)
    if loop is None:
        eng.dispose()
    else:
        from sqlalchemy.util.concurrency import greenlet_spawn

        loop.run_until_complete(greenlet_spawn(eng.dispose))


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Optional[bool]:
    """Run a sync test body on an async driver the way AsyncSession.run_sync does: in SQLAlchemy's greenlet."""
    loop = pyfuncitem.stash.get(LOOP, None)
    if loop is None:
        return None
    from sqlalchemy.util.concurrency import greenlet_spawn

    args = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    loop.run_until_complete(greenlet_spawn(pyfuncitem.obj, **args))
    return True


@pytest.fixture
def outside() -> Iterator[Callable[..., list[tuple[Any, ...]]]]:
    """Query through a plain psycopg connection that no rollback scope can touch."""
    conn = psycopg.connect(libpq_dsn(DB_A), autocommit=True)

    def query(statement: str, database: str = DB_A) -> list[tuple[Any, ...]]:
        if database == DB_A:
            return conn.execute(statement).fetchall()
        with psycopg.connect(libpq_dsn(database), autocommit=True) as other:
            return other.execute(statement).fetchall()

    yield query
    conn.close()


@pytest.fixture
def scope() -> Iterator[sa_rollback.RollbackScope]:
    """An open rollback scope; the test checks its state, the fixture closes it."""
    with sa_rollback.RollbackScope("test") as opened:
        yield opened
