"""pytest hooks and options. Enabled by ``pytest_plugins = ["sa_rollback"]``."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from ._settings import OPTIONS, Settings, resolve
from ._state import STATE, SaRollbackWarning
from .fixtures import (  # noqa: F401  (pytest finds fixtures in the plugin module)
    _sa_rollback_isolation,
    db_engine,
    db_session,
    sa_rollback_engine,
    sa_rollback_scope,
    sa_rollback_settings,
    sa_rollback_url,
)

settings_key = pytest.StashKey[Settings]()

#: pytest-flask-sqlalchemy's ini keys, accepted so that its users' configs keep loading
_LEGACY_INI = ("mocked-engines", "mocked-sessions", "mocked-sessionmakers")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sa_rollback", "sa_rollback: rolled-back database transactions")
    for option in OPTIONS:
        default_text = "" if option.default is None or option.field == "server_dir" else f" (default: {option.default})"
        help_text = f"{option.help}{default_text}. Also ini key {option.ini}, env {option.env}"
        if option.kind == "bool":
            group.addoption(option.flag, dest=f"sa_{option.field}", default=None, metavar="on|off", help=help_text)
            parser.addini(option.ini, help=option.help, default=None)
        else:
            group.addoption(option.flag, dest=f"sa_{option.field}", default=None, help=help_text)
            parser.addini(option.ini, help=option.help, default=None)
    for key in _LEGACY_INI:
        parser.addini(key, type="args", default=[], help="Ignored: sa_rollback covers every engine without mocking")


def pytest_configure(config: pytest.Config) -> None:
    settings = resolve(
        cli=lambda field: config.getoption(f"sa_{field}"),
        ini=lambda key: config.getini(key),
    )
    config.stash[settings_key] = settings
    config.addinivalue_line(
        "markers",
        "sa_rollback(enabled=True): enabled=False lets this test's database writes through for real",
    )
    used = [key for key in _LEGACY_INI if config.getini(key)]
    if used:
        config.issue_config_time_warning(
            SaRollbackWarning(
                f"The ini keys {', '.join(used)} come from pytest-flask-sqlalchemy and are no longer "
                "needed: sa_rollback joins every engine and session to the test's transaction "
                "without mocking. Remove them."
            ),
            stacklevel=2,
        )
    if settings.enabled:
        from ._listeners import install

        install()


def pytest_unconfigure(config: pytest.Config) -> None:
    STATE.close_all()


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Set up fixtures of a wider scope outside the test's transaction.

    A session fixture requested for the first time by a test (directly or
    through ``request.getfixturevalue``) must commit for real, or its data would
    vanish after that first test.
    """
    if fixturedef.scope == "function" or STATE.top is None:
        return (yield)
    with STATE.suspended():
        return (yield)
