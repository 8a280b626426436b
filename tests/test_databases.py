"""Provisioning: server, schema template, per-worker clones, redirect, errors.

Every database this module makes is named after a random run id, so two runs of
the suite on one server never touch each other's databases; it drops them all
at the end.
"""

from __future__ import annotations

import contextlib
import textwrap
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from sa_rollback import SaRollbackWarning
from sa_rollback.databases import Janitor, Mark, clone_name, drop_dead_clones
from sa_rollback.databases._lease import Lease
from sa_rollback.databases._names import HOSTNAME
from sa_rollback.databases._provision import prune_templates
from sa_rollback.errors import DatabaseSetupError

from ._servers import server_dir, server_processes
from .conftest import ADMIN_URL, DRIVERS, libpq_dsn

RUN = uuid.uuid4().hex[:8]
BASE = f"sa_rollback_selftest_{RUN}_base"
ENABLE = 'pytest_plugins = ["sa_rollback"]\n'
#: every base database this module configures; their templates and the bases themselves are dropped at the end
BASES = [BASE]

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import declarative_base

# Classic declarations, which SQLAlchemy 1.4 and 2.x read alike.
Base = declarative_base()


class User(Base):
    __tablename__ = "users"
    id = sa.Column(sa.Integer, primary_key=True)
    name = sa.Column(sa.Text, unique=True)
"""
USERS_SQL = "CREATE TABLE users (id serial PRIMARY KEY, name text UNIQUE);"

SAME_ROW_TESTS = """
import os
import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("i", range(6))
def test_same_row(db_session, i):
    db_session.execute(sa.text("INSERT INTO users (id, name) VALUES (1, 'same')"))
    db_session.commit()
    name = db_session.execute(sa.text("SELECT current_database()")).scalar()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["OUT_DIR"], f"db-{worker}.txt"), "a", encoding="utf-8") as out:
        out.write(name + "\\n")
"""


def admin() -> psycopg.Connection:
    return psycopg.connect(libpq_dsn("postgres"), autocommit=True)


def janitor() -> Janitor:
    return Janitor(make_url(ADMIN_URL))


def base_url(driver: str = DRIVERS[-1], database: str = BASE) -> str:
    return make_url(ADMIN_URL).set(drivername=f"postgresql+{driver}", database=database).render_as_string(False)


def new_base(name: str) -> str:
    """Record a base database name of this run: it and everything made from it are dropped at the end."""
    BASES.append(name)
    return name


def drop_made_from(base: str) -> None:
    """Drop the databases the plugin made from ``base`` (its templates) and ``base`` itself."""
    with warnings.catch_warnings(), janitor() as j:
        warnings.simplefilter("ignore", SaRollbackWarning)
        for name, mark in j.marked():
            if mark.base == base:
                j.drop(name)
        j.conn.execute(j.conn.compose("DROP DATABASE IF EXISTS {} WITH (FORCE)", base))


def marked() -> list[tuple[str, Mark]]:
    """The plugin's databases on the server; a concurrent run's malformed test mark is no error here."""
    with warnings.catch_warnings(), janitor() as j:
        warnings.simplefilter("ignore", SaRollbackWarning)
        return j.marked()


def clones_of(base: str) -> list[str]:
    return [
        name
        for name, mark in marked()
        if mark.kind == "clone" and (mark.base == base or (mark.base is None and name.startswith(base + "_sar_")))
    ]


@pytest.fixture(scope="module", autouse=True)
def _base_database() -> Iterator[None]:
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(BASE)))
    # The clones made here with RUN's mark belong to a live run: a concurrent run's sweep leaves them.
    lease = Lease(make_url(ADMIN_URL), RUN)
    try:
        yield
    finally:
        lease.close()
    left = [name for base in BASES for name in clones_of(base)]
    for base in BASES:
        drop_made_from(base)
    assert left == [], f"clones left behind: {left}"


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("SA_ROLLBACK_URL", base_url())
    monkeypatch.setenv("OUT_DIR", str(pytester.path))
    monkeypatch.delenv("SA_ROLLBACK_SCHEMA", raising=False)
    monkeypatch.delenv("SA_ROLLBACK_RUN_ID", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)  # when this suite itself runs under xdist
    pytester.makeconftest(ENABLE)
    return pytester


def databases_used(path: Path) -> dict[str, set[str]]:
    return {p.stem[3:]: set(p.read_text(encoding="utf-8").splitlines()) for p in path.glob("db-*.txt")}


def test_xdist_workers_get_their_own_clone_and_the_template_is_built_once(inner: pytest.Pytester) -> None:
    marker = uuid.uuid4().hex  # a new hook source, so this run must build a new template
    inner.makepyfile(
        models=MODELS,
        schema_hook=f"""
        # {marker}
        import os
        import sqlalchemy as sa
        from models import Base

        def build(url):
            with open(os.path.join(os.environ["OUT_DIR"], "builds.txt"), "a") as out:
                out.write(url.rsplit("/", 1)[-1] + "\\n")
            engine = sa.create_engine(url)
            Base.metadata.create_all(engine)
            engine.dispose()
        """,
        test_rows=SAME_ROW_TESTS,
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--sa-schema", "hook:schema_hook:build")
    result.assert_outcomes(passed=6)
    used = databases_used(inner.path)
    assert set(used) == {"gw0", "gw1"}
    assert all(len(names) == 1 for names in used.values())
    assert used["gw0"] != used["gw1"]
    assert (inner.path / "builds.txt").read_text().count("\n") == 1
    assert clones_of(BASE) == []  # dropped by the run itself, not left to the next one


def test_unchanged_schema_is_reused_and_a_changed_one_rebuilt(inner: pytest.Pytester) -> None:
    table = f"t_{uuid.uuid4().hex[:10]}"
    models = MODELS.replace('"users"', f'"{table}"')
    inner.makepyfile(models=models, test_one="def test_one(db_session):\n    pass\n")
    args = ("-p", "no:cacheprovider", "--sa-schema", "models:Base")
    first = inner.runpytest_subprocess(*args)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*sa_rollback: built template*"])
    second = inner.runpytest_subprocess(*args)
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*sa_rollback: reused template*"])
    inner.makepyfile(models=models + "    email = sa.Column(sa.Text)\n")
    third = inner.runpytest_subprocess(*args)
    third.stdout.fnmatch_lines(["*sa_rollback: built template*"])
    forced = inner.runpytest_subprocess(*args, "--sa-rebuild=on")
    forced.stdout.fnmatch_lines(["*sa_rollback: built template*"])


def test_application_url_is_redirected_and_exported(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("APP_URL", base_url("psycopg2"))
    monkeypatch.setenv("BASE_NAME", BASE)
    inner.makepyfile(
        models=MODELS,
        app="""
        import os
        import sqlalchemy as sa

        engine = sa.create_engine(os.environ["APP_URL"])  # the application's own configuration
        EXPORTED = os.environ["DATABASE_URL"]  # read at import, as many apps do
        """,
        test_app="""
        import os
        import sqlalchemy as sa
        from app import EXPORTED, engine

        def test_redirected(sa_rollback_url):
            with engine.connect() as conn:
                name = conn.execute(sa.text("SELECT current_database()")).scalar()
            assert name != os.environ["BASE_NAME"]
            assert name == sa.engine.make_url(sa_rollback_url).database
            assert EXPORTED == sa_rollback_url
            with engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO users (name) VALUES ('x')"))
        """,
    )
    result = inner.runpytest_subprocess(
        "-p", "no:cacheprovider", "--sa-schema", "models:Base", "--sa-export-env", "DATABASE_URL"
    )
    result.assert_outcomes(passed=1)
    with psycopg.connect(libpq_dsn(BASE)) as conn:  # the configured database itself was never touched
        assert conn.execute("SELECT to_regclass('users')").fetchone() == (None,)


def test_sql_files_and_existing_database(inner: pytest.Pytester) -> None:
    inner.makefile(".sql", schema=USERS_SQL)
    inner.makepyfile(test_rows=SAME_ROW_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "sql:schema.sql")
    result.assert_outcomes(passed=6)
    assert len(databases_used(inner.path)["main"]) == 1
    # 'existing' clones the configured database as it stands: it has no users table.
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "existing", "-x")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(['*relation "users" does not exist*'])


def test_a_clone_that_waits_for_sessions_on_its_template_says_who_they_are(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_x="def test_x(db_session):\n    pass\n")
    held = psycopg.connect(libpq_dsn(BASE) + "?application_name=held_by_selftest", autocommit=True)

    def release_when_the_clone_waits() -> None:
        with admin() as watcher:
            deadline = time.monotonic() + 60
            while (
                time.monotonic() < deadline
                and not watcher.execute(
                    # This clone's statement only: other runs on the shared server create databases too.
                    "SELECT 1 FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
                    (f"CREATE DATABASE%TEMPLATE%{BASE}%",),
                ).fetchone()
            ):
                time.sleep(0.05)
        held.close()  # the clone goes on once it is gone

    releaser = threading.Thread(target=release_when_the_clone_waits)
    releaser.start()
    try:
        result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "existing")
    finally:
        releaser.join()
    result.assert_outcomes(passed=1)
    result.stderr.fnmatch_lines(
        [f"sa_rollback: waiting up to 30 s to clone '{BASE}'*1 session(s) are: pid * 'held_by_selftest' from *"]
    )
    assert result.stderr.str().count("waiting up to") == 1, result.stderr.str()


COOKBOOK_ENV = """
from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
"""


def alembic_project(inner: pytest.Pytester, env_py: str) -> None:
    """alembic.ini, env.py and one revision that creates ``users``, in the inner project."""
    head = uuid.uuid4().hex[:12]
    (inner.path / "migrations" / "versions").mkdir(parents=True, exist_ok=True)
    inner.makefile(".ini", alembic="[alembic]\nscript_location = migrations\n")
    (inner.path / "migrations" / "env.py").write_text(env_py)
    (inner.path / "migrations" / "script.py.mako").write_text("")
    (inner.path / "migrations" / "versions" / f"{head}_users.py").write_text(
        textwrap.dedent(
            f"""
            import sqlalchemy as sa
            from alembic import op

            revision = "{head}"
            down_revision = None

            def upgrade():
                op.create_table("users", sa.Column("id", sa.Integer, primary_key=True),
                                sa.Column("name", sa.Text, unique=True))
            """
        )
    )


def test_alembic_schema(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    alembic_project(inner, COOKBOOK_ENV)
    inner.makepyfile(test_rows=SAME_ROW_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "alembic:alembic.ini")
    result.assert_outcomes(passed=6)
    # From a subdirectory (as IDEs run it), the path and script_location start at the ini file.
    inner.makeini("[pytest]\n")
    monkeypatch.chdir(inner.mkdir("sub"))
    args = ("-p", "no:cacheprovider", "--sa-schema", "alembic:alembic.ini", str(inner.path / "test_rows.py"))
    inner.runpytest_subprocess(*args).assert_outcomes(passed=6)
    # A second head makes the schema ambiguous: a clear error, once.
    (inner.path / "migrations" / "versions" / "other.py").write_text(
        'revision = "other1"\ndown_revision = None\ndef upgrade():\n    pass\n'
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "alembic:alembic.ini")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*Alembic has several heads*merge them*"])


def test_an_alembic_env_with_its_own_url_migrates_the_template_never_the_configured_database(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the FastAPI full-stack template does: env.py builds its own engine from the app's settings.
    monkeypatch.setenv("APP_DATABASE_URL", base_url())
    own_engine = (
        "import os\nimport sqlalchemy as sa\nfrom alembic import context\n\n"
        "engine = sa.create_engine(os.environ['APP_DATABASE_URL'])\n"
        "with engine.begin() as connection:\n"
        "    context.configure(connection=connection, target_metadata=None)\n"
        "    with context.begin_transaction():\n"
        "        context.run_migrations()\n"
    )
    alembic_project(inner, own_engine)
    inner.makepyfile(test_rows=SAME_ROW_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "alembic:alembic.ini")
    result.assert_outcomes(passed=6)
    with psycopg.connect(libpq_dsn(BASE)) as conn:  # the configured database was never migrated
        assert conn.execute("SELECT to_regclass('users'), to_regclass('alembic_version')").fetchone() == (None, None)
    # An env.py that migrates elsewhere (a driver connection of its own escapes any redirect) leaves
    # the template empty, which gets a clear message instead of UndefinedTable.
    (inner.path / "migrations" / "env.py").write_text(
        "from alembic import context\n\n"
        "context.configure(connection=context.config.attributes['connection'], target_metadata=None)\n"
        "# no run_migrations() on the connection it was given\n"
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "alembic:alembic.ini")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the template database has no alembic_version table: env.py migrated another*"])
    assert "UndefinedTable" not in result.stderr.str()


def test_relative_schema_paths_start_at_the_ini_file(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    (inner.path / "db").mkdir()
    (inner.path / "db" / "schema.sql").write_text(f"{USERS_SQL}\n-- {uuid.uuid4().hex}\n")
    inner.makeini("[pytest]\nsa_rollback_schema = sql:db/schema.sql\n")
    tests = inner.mkdir("tests")
    (tests / "test_users.py").write_text(
        "import sqlalchemy as sa\n\n"
        "def test_users(db_session):\n"
        "    assert db_session.execute(sa.text('SELECT count(*) FROM users')).scalar() == 0\n"
    )
    monkeypatch.chdir(tests)
    inner.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
    # A missing file names the directory it was looked for in: the ini file's, not the current one.
    inner.makeini("[pytest]\nsa_rollback_schema = alembic:alembic.ini\n")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "ERROR: sa_rollback: The Alembic configuration 'alembic.ini' does not exist: "
            f"looked for it in '{inner.path}'*"
        ]
    )
    inner.makeini("[pytest]\nsa_rollback_schema = sql:db/schema.sql,db/missing.sql\n")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.stderr.fnmatch_lines(
        [f"*The schema file 'db/missing.sql' does not exist: looked for it in '{inner.path / 'db'}'*"]
    )


@pytest.mark.parametrize("extra", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_failing_schema_hook_shows_its_traceback_once(inner: pytest.Pytester, extra: tuple[str, ...]) -> None:
    inner.makepyfile(
        schema_hook="def build(url):\n    raise RuntimeError('the hook broke')\n",
        test_many="import pytest\n\n@pytest.mark.parametrize('i', range(5))\ndef test_x(db_session, i):\n    pass\n",
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "hook:schema_hook:build", *extra)
    assert result.ret != 0
    output = result.stdout.str() + result.stderr.str()
    assert output.count("RuntimeError: the hook broke") == 1
    assert "schema_hook.py" in output


def test_unreachable_server_names_host_port_and_setting_without_password(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_x="def test_x(db_session):\n    pass\n")
    result = inner.runpytest_subprocess(
        "-p", "no:cacheprovider", "--sa-url", "postgresql://someone:s3cret%20word@127.0.0.1:1/app"
    )
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*PostgreSQL is unreachable at 127.0.0.1:1 as user someone*--sa-url*"])
    assert "s3cret" not in result.stdout.str() + result.stderr.str()


def test_role_without_createdb_gets_a_clear_error(inner: pytest.Pytester) -> None:
    with admin() as conn:
        if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = 'sa_rollback_nocreate'").fetchone() is None:
            with contextlib.suppress(psycopg.errors.DuplicateObject):  # a concurrent run made it
                conn.execute("CREATE ROLE sa_rollback_nocreate LOGIN NOCREATEDB")
    url = make_url(base_url()).set(username="sa_rollback_nocreate").render_as_string(False)
    inner.makepyfile(models=MODELS, test_x="def test_x(db_session):\n    pass\n")
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-url", url, "--sa-schema", "models:Base")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*may not create databases*CREATEDB*"])


def test_embedded_server_with_zero_configuration(inner: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.delenv("SA_ROLLBACK_URL")
    with server_dir() as path:
        monkeypatch.setenv("SA_ROLLBACK_SERVER_DIR", str(path))
        run_zero_configuration(inner)
        assert server_processes(path) == []  # stopped by the run's last process as it exited


def run_zero_configuration(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_zero="""
        import sqlalchemy as sa

        def test_create_and_write(db_session):
            db_session.execute(sa.text("CREATE TABLE t (x int)"))
            db_session.execute(sa.text("INSERT INTO t VALUES (1)"))
            db_session.commit()
            assert db_session.execute(sa.text("SELECT current_database()")).scalar().startswith("sa_rollback_sar_")

        def test_rolled_back(db_session):
            assert db_session.execute(sa.text("SELECT to_regclass('t')")).scalar() is None
        """
    )
    for extra in ((), ("-n", "2")):
        result = inner.runpytest_subprocess("-p", "no:cacheprovider", *extra)
        result.assert_outcomes(passed=2)


def test_never_drops_or_replaces_a_database_it_did_not_create() -> None:
    name = f"{BASE}_foreign"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            with janitor() as j:
                assert j.drop(name) is False
                assert j.drop_if_unused(name) is False
                with pytest.raises(DatabaseSetupError, match="sa_rollback did not create it"):
                    j.replace(name, Mark.clone(BASE, RUN), template=BASE)
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() == (1,)
        finally:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_janitor_quotes_identifiers_with_the_drivers_own_quoting(driver: str) -> None:
    name = f'{BASE} we"ird; DROP DATABASE {BASE}'
    url = make_url(ADMIN_URL).set(drivername=f"postgresql+{driver}")
    with Janitor(url) as j:
        assert j.conn.driver.name == driver
        mark = Mark.clone(BASE, RUN)
        j.create(name, mark, template=BASE)
        try:
            assert j.exists(name) and j.exists(BASE)
            assert j.mark(name) == mark
        finally:
            assert j.drop(name) is True
        assert not j.exists(name) and j.exists(BASE)


REAL_COMMIT_TESTS = """
import os
import psycopg
import pytest
import sqlalchemy as sa

SEEN = {}


def plain(url):
    return psycopg.connect("postgresql://" + url.split("://", 1)[1], autocommit=True)


@pytest.mark.sa_rollback(real_commits=True)
def test_commits_for_real(db_engine, sa_rollback_url):
    with open(os.path.join(os.environ["OUT_DIR"], "seq.txt"), "w") as out:
        with db_engine.connect() as conn:
            out.write(str(conn.execute(sa.text("SELECT nextval('users_id_seq')")).scalar()))
    with plain(sa_rollback_url) as listener:
        listener.execute("LISTEN news")
        with db_engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO users (name) VALUES ('real')"))
            conn.execute(sa.text("NOTIFY news, 'hello'"))
        # another connection, outside SQLAlchemy, reads the committed row
        assert listener.execute("SELECT name FROM users").fetchall() == [("real",)]
        assert [n.payload for n in listener.notifies(timeout=5, stop_after=1)] == ["hello"]
    with db_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("CREATE INDEX CONCURRENTLY users_name_idx ON users (name)"))


def test_everything_is_back(db_engine):
    with db_engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM users")).scalar() == 0
        assert conn.execute(sa.text("SELECT to_regclass('users_name_idx')")).scalar() is None
        first = conn.execute(sa.text("SELECT nextval('users_id_seq')")).scalar()
    with open(os.path.join(os.environ["OUT_DIR"], "seq.txt")) as seen:
        assert str(first) == seen.read()  # the sequence was restored too
"""


def test_real_commit_mode_restores_the_database(inner: pytest.Pytester) -> None:
    inner.makepyfile(models=MODELS, test_real=REAL_COMMIT_TESTS)
    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "models:Base")
    result.assert_outcomes(passed=2)


def test_real_commit_mode_refuses_a_database_it_does_not_own(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        test_real="""
        import pytest

        @pytest.mark.sa_rollback(real_commits=True)
        def test_x():
            pass
        """
    )
    result = inner.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*real_commits=True) restores a database sa_rollback created*--sa-schema*"])


ONE_COMMIT = """
import os
import sqlalchemy as sa


def test_commits(db_session):
    db_session.execute(sa.text("INSERT INTO users (name) VALUES ('x')"))
    db_session.commit()
    name = db_session.execute(sa.text("SELECT current_database()")).scalar()
    with open(os.path.join(os.environ["OUT_DIR"], "db-main.txt"), "w", encoding="utf-8") as out:
        out.write(name)
    if os.environ.get("CRASH"):
        os._exit(1)  # no teardown, as when a run is killed
"""


def run_sql_schema(inner: pytest.Pytester, *args: str) -> pytest.RunResult:
    inner.makefile(".sql", schema=USERS_SQL)
    return inner.runpytest_subprocess("-p", "no:cacheprovider", "--sa-schema", "sql:schema.sql", *args)


def test_multibyte_names_give_each_worker_its_own_clone(inner: pytest.Pytester, monkeypatch) -> None:
    # 62 bytes, 35 characters: a cut by characters would leave names PostgreSQL truncates into one.
    base = new_base("ü" * 27 + RUN)
    monkeypatch.setenv("SA_ROLLBACK_URL", base_url(database=base))
    monkeypatch.setenv("SA_ROLLBACK_RUN_ID", RUN)
    inner.makepyfile(test_rows=SAME_ROW_TESTS)
    result = run_sql_schema(inner, "-n", "2")
    result.assert_outcomes(passed=6)
    used = databases_used(inner.path)
    assert used == {worker: {clone_name(base, RUN, worker)} for worker in ("gw0", "gw1")}
    (template,) = [name for name, mark in marked() if mark.kind == "template" and mark.base == base]
    result.stdout.fnmatch_lines([f"*built template {template} in*"])
    for name in (template, *used["gw0"], *used["gw1"]):
        assert len(name.encode()) <= 63 and name.startswith("ü" * 20)


def test_clones_of_a_killed_run_are_found_by_their_mark_though_their_names_are_shortened(
    inner: pytest.Pytester, monkeypatch
) -> None:
    base = new_base(f"sa_rollback_selftest_{RUN}_{'x' * 30}")  # 60 bytes: clone names get a hash
    monkeypatch.setenv("SA_ROLLBACK_URL", base_url(database=base))
    monkeypatch.setenv("CRASH", "1")
    inner.makepyfile(test_one=ONE_COMMIT)
    run_sql_schema(inner)
    killed = (inner.path / "db-main.txt").read_text(encoding="utf-8")
    assert "_sar_" not in killed and clones_of(base) == [killed]
    monkeypatch.delenv("CRASH")
    run_sql_schema(inner).assert_outcomes(passed=1)
    assert (inner.path / "db-main.txt").read_text(encoding="utf-8") != killed
    assert clones_of(base) == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_password_and_database_name_with_spaces(inner: pytest.Pytester, monkeypatch, driver: str) -> None:
    role, password = f"sa_rollback_selftest_{RUN}_{driver}", "pass word"
    base = new_base(f"sa_rollback_selftest_{RUN} with space {driver}")
    with admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(sql.Identifier(role), sql.Literal(password))
        )
    try:
        url = make_url(base_url(driver, base)).set(username=role, password=password)
        monkeypatch.setenv("SA_ROLLBACK_URL", url.render_as_string(hide_password=False))
        inner.makepyfile(test_one=ONE_COMMIT)
        result = run_sql_schema(inner, "-v")
        result.assert_outcomes(passed=1)
        used = (inner.path / "db-main.txt").read_text(encoding="utf-8")
        assert used.startswith(base + "_sar_")
        output = result.stdout.str() + result.stderr.str()
        assert "pass word" not in output and "pass%20word" not in output
    finally:
        drop_made_from(base)
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_a_malformed_mark_is_not_ours_and_is_left_alone_with_a_warning(inner: pytest.Pytester) -> None:
    name = f"{BASE}_sar_old_main"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        # No pid: before the Mark type, reading it raised IndexError on every run.
        comment = f"sa_rollback:clone run=old host={HOSTNAME}"
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(name), sql.Literal(comment)))
    try:
        with janitor() as j:
            with pytest.warns(SaRollbackWarning, match=f"{name}.*cannot be read.*leaves it alone"):
                assert j.drop(name) is False
            with pytest.warns(SaRollbackWarning, match=name):
                drop_dead_clones(j, BASE)
            # Another base's run (a concurrent run on a shared server) has no word to say about it.
            with warnings.catch_warnings():
                warnings.simplefilter("error", SaRollbackWarning)
                drop_dead_clones(j, f"{BASE}_other")
                prune_templates(j, f"{BASE}_other", current=f"{BASE}_other_sar_tpl_x")
            assert j.exists(name)
        inner.makepyfile(test_rows=SAME_ROW_TESTS)
        result = run_sql_schema(inner)
        result.assert_outcomes(passed=6)
        assert f"{name}' has a comment that looks like sa_rollback's mark" in result.stdout.str() + result.stderr.str()
        with admin() as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() == (1,)
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


def test_a_database_an_unfinished_drop_left_invalid_is_dropped_and_the_session_lives_on() -> None:
    name = f"{BASE}_invalid"
    with janitor() as j:
        j.create(name, Mark.clone(BASE, RUN))
    with admin() as conn:
        # What PostgreSQL 15.4+ leaves when a DROP DATABASE stops midway (an interrupt, a crash).
        conn.execute("UPDATE pg_database SET datconnlimit = -2 WHERE datname = %s", (name,))
    with janitor() as j:
        pid = j.conn.execute("SELECT pg_backend_pid()")[0][0]
        assert j.drop(name) is True
        assert not j.exists(name)
        assert j.conn.execute("SELECT pg_backend_pid()")[0][0] == pid  # no ALTER DATABASE ended it


def test_drop_refuses_new_connections_before_it_ends_the_open_ones() -> None:
    name = f"{BASE}_busy"
    with janitor() as j:
        j.create(name, Mark.clone(BASE, RUN))
    held = psycopg.connect(libpq_dsn(name), autocommit=True)
    refusals: list[str] = []
    with janitor() as j:
        send = j.conn.execute

        def execute(query: object, params: tuple[object, ...] | None = None) -> list[tuple[object, ...]]:
            text = query if isinstance(query, str) else query.as_string(j.conn.raw)  # type: ignore[attr-defined]
            if text.startswith("DROP DATABASE"):
                # A pool reconnecting at this moment: it must be refused, not let in to make the DROP fail.
                try:
                    psycopg.connect(libpq_dsn(name), connect_timeout=5).close()
                except psycopg.OperationalError as exc:
                    refusals.append(str(exc))
            return send(query, params)

        j.conn.execute = execute  # type: ignore[method-assign]
        started = time.monotonic()
        assert j.drop(name) is True
        assert time.monotonic() - started < 4  # a DROP that waits for a session gives up after 5 s
        assert not j.exists(name)
    assert len(refusals) == 1 and "not currently accepting connections" in refusals[0]
    with pytest.raises(psycopg.OperationalError):
        held.execute("SELECT 1")  # the session that was open is gone too
    held.close()


def test_a_failed_drop_leaves_the_database_accepting_connections() -> None:
    name = f"{BASE}_kept"
    with janitor() as j:
        j.create(name, Mark.clone(BASE, RUN))
        j.conn.execute(j.conn.compose("ALTER DATABASE {} IS_TEMPLATE true", name))
        try:
            # A template cannot be dropped; the error is that of the driver a bare URL gets.
            with pytest.raises(j.conn.driver.module.errors.WrongObjectType):
                j.drop(name)
            assert j.exists(name)
            psycopg.connect(libpq_dsn(name)).close()  # it accepts connections again
        finally:
            j.conn.execute(j.conn.compose("ALTER DATABASE {} IS_TEMPLATE false", name))
            assert j.drop(name)
