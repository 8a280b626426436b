"""Data of a class, module, package or session fixture, rolled back when pytest tears it down.

Each inner session runs in a subprocess, on psycopg2 and psycopg 3, and is judged
afterwards from a plain connection outside SQLAlchemy.
"""

from __future__ import annotations

import pytest

from .inner_projects import FLASK_APP

pytestmark = pytest.mark.usefixtures("_inner_env")

HELPERS = """
import os
import sqlalchemy as sa

ENGINE = sa.create_engine(os.environ["INNER_URL"])


def names():
    with ENGINE.connect() as conn:
        return list(conn.execute(sa.text("SELECT name FROM items ORDER BY name")).scalars())


def add(*new):
    with ENGINE.begin() as conn:
        for name in new:
            conn.execute(sa.text("INSERT INTO items (name) VALUES (:n)"), {"n": name})
"""

SCHEMA = "CREATE TABLE items (id serial PRIMARY KEY, name text UNIQUE NOT NULL, qty int NOT NULL DEFAULT 0);\n"


@pytest.fixture
def _inner_env(monkeypatch: pytest.MonkeyPatch, driver: str) -> None:
    from .conftest import driver_url

    monkeypatch.setenv("INNER_URL", driver_url(driver))
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url(driver))


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)


def setup(pytester: pytest.Pytester, conftest: str = "", **modules: str) -> None:
    pytester.makeconftest('pytest_plugins = ["sa_rollback"]\n' + conftest)
    pytester.makepyfile(helpers=HELPERS, **modules)


def test_module_data_seen_by_each_test_and_gone_after(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        test_a="""
        import pytest
        import sqlalchemy as sa
        from helpers import ENGINE, add, names

        @pytest.fixture(scope="module")
        def catalog(sa_rollback_module_scope):
            add("cat-1", "cat-2")
            yield
            add("teardown-write")  # rolled back too: the scope closes after the fixture's teardown

        def test_sees_catalog_and_writes(catalog):
            assert names() == ["cat-1", "cat-2"]
            add("mine")
            with ENGINE.begin() as conn:
                conn.execute(sa.text("DELETE FROM items WHERE name = 'cat-1'"))
            assert names() == ["cat-2", "mine"]

        def test_sees_catalog_as_the_fixture_left_it(catalog):
            assert names() == ["cat-1", "cat-2"]
            with ENGINE.begin() as conn:
                conn.execute(sa.text("TRUNCATE items"))

        def test_again(catalog):
            assert names() == ["cat-1", "cat-2"]
        """,
        test_b="""
        from helpers import names

        def test_next_module_sees_nothing():
            assert names() == []
        """,
    )
    run(pytester).assert_outcomes(passed=4)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_scopes_nest_session_module_class(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        conftest="""
import pytest
from helpers import add

@pytest.fixture(scope="session")
def tenant(sa_rollback_session_scope):
    add("tenant")

@pytest.fixture(scope="session")
def plain_session():
    add("plain")  # requests no data scope: committed for real
    yield
    from helpers import ENGINE
    import sqlalchemy as sa
    with ENGINE.begin() as conn:
        conn.execute(sa.text("DELETE FROM items WHERE name = 'plain'"))
""",
        test_nest="""
        import pytest
        from helpers import add, names

        @pytest.fixture(scope="module")
        def catalog(tenant, sa_rollback_module_scope):
            add("catalog")

        class TestInClass:
            @pytest.fixture(scope="class")
            def admin(self, catalog, sa_rollback_class_scope):
                add("admin")

            def test_sees_all(self, admin):
                assert names() == ["admin", "catalog", "tenant"]
                add("t1")

            def test_sees_all_again(self, admin):
                assert names() == ["admin", "catalog", "tenant"]

        def test_after_the_class(catalog):
            assert names() == ["catalog", "tenant"]

        def test_plain_is_real(plain_session):
            assert "plain" in names()
        """,
        test_zz_other="""
        from helpers import names

        def test_only_the_session_data(tenant):
            assert names() == ["plain", "tenant"]  # "plain" is real, and its session fixture still alive
        """,
    )
    run(pytester).assert_outcomes(passed=5)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_parametrized_fixture_data_goes_with_its_parameter(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        test_param="""
        import pytest
        from helpers import add, names

        @pytest.fixture(scope="module", params=["red", "blue"])
        def colour(request, sa_rollback_module_scope):
            add(request.param)
            return request.param

        def test_only_its_own(colour):
            assert names() == [colour]

        def test_still_only_its_own(colour):
            assert names() == [colour]
        """,
    )
    run(pytester).assert_outcomes(passed=4)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_getfixturevalue_before_and_after_the_test_used_the_database(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        test_lazy="""
        import pytest
        from helpers import add, names

        @pytest.fixture(scope="module")
        def catalog(sa_rollback_module_scope):
            add("catalog")

        def test_early(request):
            request.getfixturevalue("catalog")
            assert names() == ["catalog"]
            add("mine")

        def test_next(catalog):
            assert names() == ["catalog"]
        """,
        test_late="""
        import pytest
        from helpers import add, names

        @pytest.fixture(scope="module")
        def late(sa_rollback_module_scope):
            add("late")

        def test_late(request):
            add("first")
            request.getfixturevalue("late")
        """,
    )
    result = run(pytester)
    result.assert_outcomes(passed=2, errors=0, failed=1)
    result.stdout.fnmatch_lines(["*ScopeError: The module-scoped fixture 'late' holds rolled-back data*"])
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_real_commits_inside_a_data_scope_is_refused(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        test_real="""
        import pytest
        from helpers import add

        @pytest.fixture(scope="module")
        def catalog(sa_rollback_module_scope):
            add("catalog")

        @pytest.mark.sa_rollback(real_commits=True)
        def test_real(catalog):
            add("real")
        """,
    )
    pytester.makefile(".sql", schema=SCHEMA)
    result = run(pytester, "--sa-schema=sql:schema.sql")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*real_commits=True*runs inside 'catalog (module fixture)'*"])
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_each_worker_has_its_own_copy(pytester: pytest.Pytester, outside) -> None:
    pytester.makefile(".sql", schema=SCHEMA)
    modules = {
        f"test_w{n}": """
        import pytest
        from helpers import add, names

        @pytest.fixture(scope="module")
        def catalog(sa_rollback_module_scope):
            add("same-key")  # the same unique name in every module: each worker has its own database

        @pytest.mark.parametrize("i", range(3))
        def test_sees_one(catalog, i):
            assert names() == ["same-key"]
            add(f"row-{i}")
        """
        for n in range(4)
    }
    setup(pytester, **modules)
    run(pytester, "-n", "2", "--sa-schema=sql:schema.sql").assert_outcomes(passed=12)
    assert outside("SELECT count(*) FROM items") == [(0,)]


def test_flask_db_session_in_a_module_app_context(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        conftest=FLASK_APP
        + """

@pytest.fixture(scope="module")
def seeded(app, sa_rollback_module_scope):
    db.session.add_all([Item(name="a"), Item(name="b")])
    db.session.commit()
""",
        test_flask="""
        from conftest import Item, db

        def test_one(seeded):
            assert db.session.query(Item).count() == 2
            db.session.add(Item(name="c"))
            db.session.commit()
            assert db.session.query(Item).count() == 3
            db.session.remove()

        def test_two(seeded):
            assert db.session.query(Item).count() == 2
            db.session.remove()
        """,
    )
    run(pytester).assert_outcomes(passed=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]


PACKAGE_CONFTEST = """
import os
import threading

import pytest
import sqlalchemy as sa

from helpers import add


@pytest.fixture(scope="package", autouse=True)
def package_data(sa_rollback_package_scope):
    add("pkg")
    engine = sa.create_engine(os.environ["INNER_URL"])  # an engine made in the fixture, used raw
    raw = engine.raw_connection()
    cursor = raw.cursor()
    cursor.execute("INSERT INTO items (name) VALUES ('raw')")
    raw.commit()
    raw.close()
    thread = threading.Thread(target=add, args=("thread",))
    thread.start()
    thread.join()
"""

PACKAGE_MODULE = """
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from helpers import ENGINE, add, names

WIDER = ["mod", "pkg", "raw", "thread"]


@pytest.fixture(scope="module")
def mod(sa_rollback_module_scope):
    add("mod")


def test_sees_the_package_and_module_data(mod):
    assert names() == WIDER
    with Session(ENGINE) as session:
        session.execute(sa.text("INSERT INTO items (name) VALUES ('t1')"))
        with pytest.raises(sa.exc.IntegrityError):
            with session.begin_nested():
                session.execute(sa.text("INSERT INTO items (name) VALUES ('pkg')"))
        session.commit()
    assert names() == ["mod", "pkg", "raw", "t1", "thread"]  # another connection sees the commit


def test_sees_them_as_the_fixtures_left_them(mod):
    assert names() == WIDER
    with pytest.raises(sa.exc.IntegrityError):
        add("mod")  # an error, then the test goes on
    add("t2")
    assert names() == ["mod", "pkg", "raw", "t2", "thread"]
"""


def test_package_scope_autouse_and_every_path_in_it_and_a_k_selection(pytester: pytest.Pytester, outside) -> None:
    setup(
        pytester,
        test_zz_after="""
        from helpers import names

        def test_after_the_package():
            assert names() == []
        """,
    )
    package = pytester.mkpydir("pkg")
    (package / "conftest.py").write_text(PACKAGE_CONFTEST)
    (package / "test_p1.py").write_text(PACKAGE_MODULE)
    (package / "test_p2.py").write_text(
        "from helpers import names\n\n\ndef test_other_module():\n    assert names() == ['pkg', 'raw', 'thread']\n"
    )
    run(pytester).assert_outcomes(passed=4)
    assert outside("SELECT count(*) FROM items") == [(0,)]
    # A selection that skips the package's first tests still sets up and rolls back its data.
    result = run(pytester, "-k", "as_the_fixtures_left_them or after_the_package")
    result.assert_outcomes(passed=2, deselected=2)
    assert outside("SELECT count(*) FROM items") == [(0,)]
