"""What a user sees when a setting, a marker or the set-up is wrong: one clear line, the right exit code.

Run in a subprocess, as the plugin's other tests, since the listeners are process-wide.
"""

from __future__ import annotations

import pytest

from sa_rollback._settings import _default_cache_dir

from .conftest import driver_url

ENABLE = 'pytest_plugins = ["sa_rollback"]\n'
PASSING = "def test_x():\n    pass\n"


@pytest.fixture(autouse=True)
def _inner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA_ROLLBACK_URL", driver_url("psycopg"))
    monkeypatch.setenv("INNER_URL", driver_url("psycopg"))
    for name in ("SA_ROLLBACK", "SA_ROLLBACK_LOCK_TIMEOUT", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_CHECK_DEFERRED"):
        monkeypatch.delenv(name, raising=False)


def _usage_error(result: pytest.RunResult, line: str) -> None:
    """Exit code 4 and exactly one ERROR line, which matches ``line``; no INTERNALERROR."""
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    errors = [text for text in result.stderr.lines if text.startswith("ERROR")]
    assert len(errors) == 1, result.stderr.str()
    result.stderr.fnmatch_lines([line])
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("args", "env", "ini", "expected"),
    [
        (
            ["--sa-lock-timeout=abc"],
            {},
            "",
            "*the command line option --sa-lock-timeout is 'abc'; it takes a positive*",
        ),
        (["--sa-lock-timeout=-5"], {}, "", "*--sa-lock-timeout is '-5'; it takes a positive number of seconds*"),
        (["--sa-lock-timeout=0"], {}, "", "*--sa-lock-timeout is '0'; it takes a positive number of seconds*"),
        (
            ["--sa-rollback=maybe"],
            {},
            "",
            "*the command line option --sa-rollback is 'maybe'; it takes one of: on, off*",
        ),
        ([], {"SA_ROLLBACK_LOCK_TIMEOUT": "abc"}, "", "*the environment variable SA_ROLLBACK_LOCK_TIMEOUT is 'abc'*"),
        ([], {}, "sa_rollback = maybe", "*the ini key sa_rollback is not understood*it takes one of: on, off*"),
        ([], {}, "sa_rollback_check_deferred = sometimes", "*the ini key sa_rollback_check_deferred is not*"),
        ([], {}, "sa_rollback_lock_timeout = soon", "*the ini key sa_rollback_lock_timeout is 'soon'; it takes*"),
    ],
)
def test_a_bad_setting_is_one_usage_error_naming_it_as_written(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    ini: str,
    expected: str,
) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(test_x=PASSING)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", *args)
    _usage_error(result, f"ERROR: sa_rollback: {expected}")
    assert "; it takes" in result.stderr.str()  # not an internal field name ("enabled takes")


MARKED = """
import os
import pytest
import sqlalchemy as sa

ENGINE = sa.create_engine(os.environ["INNER_URL"])


def count():
    with ENGINE.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM items WHERE name = 'marked'")).scalar()


@pytest.mark.sa_rollback({args})
def test_writes():
    with ENGINE.begin() as conn:
        conn.execute(sa.text("INSERT INTO items (name) VALUES ('marked')"))


def test_after():
    print("AFTER", count())
"""


@pytest.mark.parametrize(
    ("args", "real"),
    [
        ('"off"', True),
        ('enabled="false"', True),
        ("False", True),
        ('enabled="0"', True),
        ('real_commits="no"', False),  # must not turn real commits on
        ('real_commits="off"', False),
        ('enabled="on"', False),
        ("True", False),
    ],
)
def test_a_marker_word_means_what_it_says(pytester: pytest.Pytester, outside, args: str, real: bool) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(test_marked=MARKED.format(args=args))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"*AFTER {int(real)}*"])  # the next test sees the write only if it was real
    left = outside("DELETE FROM items WHERE name = 'marked' RETURNING name")
    assert left == ([("marked",)] if real else [])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            "enable=False",
            "*sa_rollback(enable=False): got an unexpected keyword argument 'enable'. "
            "Its arguments are: enabled=True, real_commits=False, reset_sequences=None.*",
        ),
        ('enabled="maybe"', "*sa_rollback(enabled='maybe'): enabled is 'maybe'; it takes True or False*"),
        ("real_commits=None", "*real_commits is None; it takes True or False*"),
        ("False, True, 3", "*too many positional arguments*Its arguments are: enabled=True*"),
    ],
)
def test_a_bad_marker_names_the_valid_arguments(pytester: pytest.Pytester, args: str, expected: str) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(test_marked=MARKED.format(args=args))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([expected])
    assert "_marker_args" not in result.stdout.str()


def test_help_shows_switches_as_on_off_and_every_default(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(ENABLE)
    result = pytester.runpytest_subprocess("--help", "-p", "no:cacheprovider")
    flat = " ".join(result.stdout.str().split())
    flags = flat.split("sa_rollback: rolled-back database transactions:")[1].split("[pytest] configuration")[0]
    inis = " sa_rollback (bool):" + flat.split(" sa_rollback (bool):")[1].split("mocked-engines")[0]
    for section in (flags, inis):
        assert "default: True" not in section and "default: False" not in section
        assert (
            section.count("(default: on)") == 4
        )  # --sa-rollback, --sa-check-deferred, --sa-detect-outside, --sa-report
        assert section.count("(default: off)") == 2  # --sa-rebuild, --sa-reset-sequences
        assert "(default: 30)" in section
        # The server directory's default (help wraps it anywhere): the user's cache, or for root /var/tmp.
        assert _default_cache_dir().replace(" ", "") + ")" in section.replace(" ", "")
    for key in ("sa_rollback", "sa_rollback_rebuild", "sa_rollback_check_deferred", "sa_rollback_reset_sequences"):
        assert f" {key} (bool):" in inis
    assert "--sa-rollback=on|off" in flags


def _url(**parts: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(driver_url("psycopg")).set(**parts).render_as_string(hide_password=False)


MANY_TESTS = """
import pytest

@pytest.mark.parametrize("i", range(3))
def test_uses_the_database(db_session, i):
    pass
"""


@pytest.mark.parametrize(
    ("parts", "expected", "not_expected"),
    [
        (
            {"database": "sa_rollback_selftest_no_such_db"},
            "ERROR: sa_rollback: The database 'sa_rollback_selftest_no_such_db' does not exist on *Create it, "
            "or set the schema (--sa-schema / SA_ROLLBACK_SCHEMA / the sa_rollback_schema ini key)*",
            "Start the server",
        ),
        (
            {"username": "sa_rollback_no_such_role", "password": "s3cret-pw"},
            "ERROR: sa_rollback: PostgreSQL at *refused user sa_rollback_no_such_role*The server is running: "
            "check the user and password in --sa-url*",
            "Start the server",
        ),
        (
            {"drivername": "postgresql+aiopg"},
            "ERROR: sa_rollback: The test database URL uses the async driver 'postgresql+aiopg'*"
            "postgresql+asyncpg or postgresql+psycopg*",
            "MissingGreenlet",
        ),
    ],
    ids=["missing-database", "refused-login", "aiopg"],
)
def test_a_database_that_cannot_be_used_is_said_once_at_start_up(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, parts: dict[str, str], expected: str, not_expected: str
) -> None:
    monkeypatch.setenv("SA_ROLLBACK_URL", _url(**parts))
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(test_many=MANY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    _usage_error(result, expected)
    output = result.stdout.str() + result.stderr.str()
    assert not_expected not in output
    assert "s3cret-pw" not in output
    assert "test_uses_the_database" not in output  # stopped before any test ran


ESCAPES = """
import os
import sqlalchemy as sa

ENGINE = sa.create_engine(os.environ["INNER_URL"])


def test_escapes():
    with ENGINE.connect() as conn:
        conn.exec_driver_sql("INSERT INTO items (name) VALUES ('escaped'); COMMIT")


def test_escape_swallowed():
    with ENGINE.connect() as conn:
        try:
            conn.exec_driver_sql("INSERT INTO items (name) VALUES ('escaped'); COMMIT")
        except Exception:
            pass  # the application hides it: the test still fails, at teardown
"""


def test_a_refused_multi_statement_commit_is_reported_once(pytester: pytest.Pytester, outside) -> None:
    pytester.makeconftest(ENABLE)
    pytester.makepyfile(test_escape=ESCAPES)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(failed=1, passed=1, errors=1)  # the swallowed one passes, then errors at teardown
    result.stdout.fnmatch_lines(["FAILED test_escape.py::test_escapes*"])
    result.stdout.fnmatch_lines(["ERROR test_escape.py::test_escape_swallowed*"])
    assert "ERROR test_escape.py::test_escapes" not in result.stdout.str()
    assert outside("SELECT count(*) FROM items WHERE name = 'escaped'") == [(0,)]
