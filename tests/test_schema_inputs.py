"""--sa-schema-inputs: files that feed a schema go into the template's fingerprint."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from sa_rollback.databases import schema_source, split_inputs
from sa_rollback.errors import ConfigurationError

from .conftest import ADMIN_URL, libpq_dsn
from .test_databases import drop_made_from

HOOK = """
import glob
import psycopg
import sqlalchemy as sa

def build(url):
    dsn = sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for path in sorted(glob.glob("migrations/*.sql")):
            conn.execute(open(path).read())
"""

TEST = """
import sqlalchemy as sa

def test_tables(db_session):
    query = "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables WHERE schemaname = 'public'"
    names = db_session.execute(sa.text(query)).scalar()
    print("TABLES", names)
"""


def test_inputs_change_the_fingerprint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "001.sql").write_text("CREATE TABLE a (id int);")
    (tmp_path / "schema.sql").write_text("CREATE TABLE s (id int);")
    plain = schema_source("sql:schema.sql")
    with_inputs = schema_source("sql:schema.sql", ["migrations/*.sql"])
    assert plain is not None and with_inputs is not None
    assert plain.fingerprint != with_inputs.fingerprint
    assert with_inputs.inputs == ["schema.sql", "1 file matching 'migrations/*.sql'"]
    (tmp_path / "migrations" / "002.sql").write_text("CREATE TABLE b (id int);")
    again = schema_source("sql:schema.sql", ["migrations/*.sql"])
    assert again is not None and again.fingerprint != with_inputs.fingerprint
    assert again.inputs[-1] == "2 files matching 'migrations/*.sql'"
    with pytest.raises(ConfigurationError, match=r"'nothing/\*\.sql' .* matches no file"):
        schema_source("sql:schema.sql", ["nothing/*.sql"])
    assert split_inputs("a/*.sql, b/**/*.py\nc.txt") == ["a/*.sql", "b/**/*.py", "c.txt"]


@pytest.fixture
def base() -> Iterator[str]:
    name = f"sa_rollback_selftest_{uuid.uuid4().hex[:8]}_inputs"
    with psycopg.connect(libpq_dsn("postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield name
    drop_made_from(name)


def test_a_changed_input_rebuilds_a_hook_schema(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=base)
    monkeypatch.setenv("SA_ROLLBACK_URL", url.render_as_string(hide_password=False))
    monkeypatch.delenv("SA_ROLLBACK_SCHEMA", raising=False)
    pytester.makeconftest('pytest_plugins = ["sa_rollback"]\n')
    pytester.makepyfile(schema_hook=HOOK, test_tables=TEST)
    migrations = pytester.mkdir("migrations")
    (migrations / "001.sql").write_text("CREATE TABLE first (id int);")
    args = ("-p", "no:cacheprovider", "-s", "--sa-schema", "hook:schema_hook:build")
    inputs = ("--sa-schema-inputs", "migrations/*.sql")

    result = pytester.runpytest_subprocess(*args, *inputs)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*TABLES first",
            "sa_rollback: built template * (fingerprint of the hook's module *schema_hook.py, "
            "1 file matching 'migrations/*.sql')",
        ]
    )
    result = pytester.runpytest_subprocess(*args, *inputs)
    result.stdout.fnmatch_lines(["*TABLES first", "sa_rollback: reused template *"])
    (migrations / "002.sql").write_text("CREATE TABLE second (id int);")
    result = pytester.runpytest_subprocess(*args, *inputs)
    result.stdout.fnmatch_lines(["*TABLES first,second", "sa_rollback: built template *2 files matching*"])
    # without the setting, only the hook's module counts: a changed migration is not seen
    pytester.runpytest_subprocess(*args).stdout.fnmatch_lines(["*TABLES first,second", "sa_rollback: built *"])
    (migrations / "003.sql").write_text("CREATE TABLE third (id int);")
    result = pytester.runpytest_subprocess(*args)
    result.stdout.fnmatch_lines(["*TABLES first,second", "sa_rollback: reused template *"])
