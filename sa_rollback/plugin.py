"""pytest hooks and options. Enabled by ``pytest_plugins = ["sa_rollback"]``."""

from __future__ import annotations

import threading
from collections.abc import Generator
from contextlib import AbstractContextManager
from typing import Any, Callable, Literal, Optional

import pytest

from . import _report, _signals
from ._marks import read_marker, resets_sequences
from ._report import report_key
from ._run import (
    TESTS,
    Databases,
    TestScope,
    databases_key,
    is_xdist_controller,
    prune,
    ranks_key,
    sequence_scope_args,
    settings_key,
)
from ._scope import RollbackScope, open_scopes, suspended
from ._settings import OPTIONS, Option, Settings, resolve
from ._state import STATE
from .errors import ConfigurationError, SaRollbackWarning, ScopeError
from .fixtures import (  # noqa: F401  (pytest finds fixtures in the plugin module)
    db_engine,
    db_session,
    sa_queries,
    sa_rollback_class_scope,
    sa_rollback_engine,
    sa_rollback_make_database,
    sa_rollback_module_scope,
    sa_rollback_package_scope,
    sa_rollback_scope,
    sa_rollback_session_scope,
    sa_rollback_settings,
    sa_rollback_url,
)


class _XdistHooks:
    """Registered only when pytest-xdist is active: hands the run id (and its lease) to every worker."""

    def __init__(self, databases: Databases) -> None:
        self.databases = databases

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["sa_rollback_run"] = self.databases.run_id
        node.workerinput["sa_rollback_lease"] = self.databases.leased

    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        _report.node_down(node)


#: pytest-flask-sqlalchemy's ini keys, accepted so that its users' configs keep loading
_LEGACY_INI = ("mocked-engines", "mocked-sessions", "mocked-sessionmakers")


def _default_text(option: Option) -> str:
    """The default as the user writes it: on/off for switches, nothing where there is none."""
    if option.default is None:
        return ""
    if option.kind == "bool":
        return f" (default: {'on' if option.default else 'off'})"
    if option.kind == "float":
        return f" (default: {option.default:g})"
    return f" (default: {option.default})"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sa_rollback", "sa_rollback: rolled-back database transactions")
    for option in OPTIONS:
        help_text = f"{option.help}{_default_text(option)}"
        ini_type: Literal["bool", "string"] = "bool" if option.kind == "bool" else "string"
        metavar = "on|off" if option.kind == "bool" else None
        group.addoption(
            option.flag,
            dest=f"sa_{option.field}",
            default=None,
            metavar=metavar,
            help=f"{help_text}. Also ini key {option.ini}, env {option.env}",
        )
        parser.addini(option.ini, help=help_text, type=ini_type, default=None)
    for key in _LEGACY_INI:
        parser.addini(key, type="args", default=[], help="Ignored: sa_rollback covers every engine without mocking")


def _ini(config: pytest.Config, key: str) -> Any:
    """An ini value; a switch that pytest cannot read is reported under its key, like any setting."""
    try:
        return config.getini(key)
    except (ValueError, TypeError, pytest.UsageError) as exc:
        raise ConfigurationError(
            f"the ini key {key} is not understood ({exc}); it takes one of: on, off, true, false, 1, 0."
        ) from None


def pytest_configure(config: pytest.Config) -> None:
    try:
        settings = resolve(cli=lambda field: config.getoption(f"sa_{field}"), ini=lambda key: _ini(config, key))
    except ConfigurationError as exc:
        raise pytest.UsageError(f"sa_rollback: {exc}") from None
    config.stash[settings_key] = settings
    config.stash[ranks_key] = {}
    databases = Databases(config, settings)
    config.stash[databases_key] = databases
    _report.configure(config, settings, databases)
    TESTS[config] = TestScope(config, settings, config.stash[report_key], _DEFERRED_HINT) if settings.enabled else None
    config.stash[_signals.restore_key] = _signals.install()  # SIGTERM (a cancelled CI job) cleans up as Ctrl-C does
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(databases), "sa_rollback_xdist")
    config.addinivalue_line(
        "markers",
        "sa_rollback(enabled=True, real_commits=False, reset_sequences=None): enabled=False lets this "
        "test's writes through for real; real_commits=True commits for real and restores the databases "
        "afterwards; reset_sequences=True puts every sequence back after the test (default: the "
        "--sa-reset-sequences setting)",
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
    # "inf" means wait forever; locks take at most TIMEOUT_MAX.
    STATE.lock_timeout = min(settings.lock_timeout, threading.TIMEOUT_MAX)
    if settings.enabled:
        from ._scope import install
        from .databases import POOLS

        install()
        POOLS.install()


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    config = session.config
    settings = config.stash[settings_key]
    databases = config.stash[databases_key]
    # An application may read its URL at import, during collection: the
    # database must exist (and the redirect be in place) before that.
    if not (settings.url or settings.schema or settings.export_env):
        return
    if is_xdist_controller(config):
        # tryfirst: before xdist starts the workers, which then only clone.
        databases.plan()
    else:
        databases.get()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    databases = config.stash.get(databases_key, None)
    if databases is None:
        return
    _report.summary(terminalreporter, config, databases)
    for name, seconds in databases.builds:
        terminalreporter.write_line(f"sa_rollback: built template {name} in {seconds:.2f} s{databases.fingerprinted()}")
    provisioned = databases.provisioned
    if provisioned is None or not provisioned.template or provisioned.template == provisioned.database:
        return
    if not databases.builds and "_sar_tpl_" in provisioned.template:
        terminalreporter.write_line(f"sa_rollback: reused template {provisioned.template}{databases.fingerprinted()}")
    terminalreporter.write_line(f"sa_rollback: test database {provisioned.database} (clone of {provisioned.template})")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker drops its clone before it reports back: the controller may end it right after.

    The controller, whose workers are all done by now, drops what any of them left.
    """
    config = session.config
    databases = config.stash.get(databases_key, None)
    if databases is None:
        return
    if hasattr(config, "workerinput"):
        _report.worker_done(config, databases)  # before the close, which forgets the clone's timings
        databases.close()
    elif is_xdist_controller(config):
        databases.sweep()


def pytest_unconfigure(config: pytest.Config) -> None:
    TESTS.pop(config, None)
    _report.unconfigure()
    databases = config.stash.get(databases_key, None)
    if databases is not None:
        databases.close()
    else:
        STATE.close_all()
    restore = config.stash.get(_signals.restore_key, None)
    if restore is not None:
        restore()


#: does any test of the session reset sequences? (then wider fixtures' data scopes do too)
_any_resets_key = pytest.StashKey[bool]()


def _data_scope_resets(request: pytest.FixtureRequest) -> bool:
    """A data scope puts sequences back when it ends if any test resets them, so that they start where it began."""
    config = request.config
    if _any_resets_key not in config.stash:
        config.stash[_any_resets_key] = any(
            resets_sequences(item, item.get_closest_marker("sa_rollback")) for item in request.session.items
        )
    return config.stash[_any_resets_key]


def _begin_marked(item: pytest.Item, tests: TestScope, marker: pytest.Mark) -> None:
    """Begin a test that has an ``sa_rollback`` marker: :meth:`TestScope.begin` returned it.

    Tests are begun when the first function-scoped fixture of the test is set
    up, or at the end of its setup if it has none: after every wider fixture,
    before every function fixture. The finalizer is registered before any
    function fixture's, so it runs after all of them and before wider ones are
    torn down. A bad marker, or a refusal, is raised here, before any of the
    test's own code has run: a setup error of the test.
    """
    __tracebackhide__ = True
    item.addfinalizer(tests.forget)
    enabled, real_commits = read_marker(marker)
    if not enabled:
        return
    if real_commits:
        _check_restorable(item)
        for outer in open_scopes():
            raise ConfigurationError(
                f"@pytest.mark.sa_rollback(real_commits=True) on {item.nodeid}: the test runs inside "
                f"{outer.label!r}, whose data is rolled back when it ends. Real commits would make "
                "that data permanent, and restoring the database afterwards would drop it before "
                "its scope ends. Move the test where no sa_rollback_*_scope fixture is in use (another "
                "module or class), or drop real_commits=True."
            )
        item.addfinalizer(_snapshot_all(item))
        return
    tests.open_for(item, resets_sequences(item, marker))


#: how a pytest user skips the deferred-constraint check, for DeferredConstraintError
_DEFERRED_HINT = next(
    f"set {o.flag}=off (or the ini key {o.ini} = off, or {o.env}=off)" for o in OPTIONS if o.field == "check_deferred"
)


def _open_scope(label: str, settings: Settings, **sequences: Any) -> RollbackScope:
    """A scope the plugin opens: its errors name the plugin's settings rather than the library's arguments."""
    scope = RollbackScope(label, check_deferred=settings.check_deferred, **sequences)
    scope.deferred_hint = _DEFERRED_HINT
    return scope.__enter__()


def _check_restorable(item: pytest.Item) -> None:
    provisioned = item.config.stash[databases_key].get()
    if not provisioned.owned():
        raise ConfigurationError(
            "@pytest.mark.sa_rollback(real_commits=True) restores a database sa_rollback created, but "
            f"this run uses {provisioned.database!r} as it is. Set --sa-schema (for example 'existing') "
            "so that the tests run on a clone."
        )


def _snapshot_all(item: pytest.Item) -> Callable[[], None]:
    """Copy every database this process owns; return the function that puts them back."""
    from .databases import restore_snapshot, take_snapshot

    databases = item.config.stash[databases_key]
    provisioned = databases.get()
    snapshots = [(name, take_snapshot(provisioned.server, name, databases.run_id)) for name in provisioned.owned()]

    def restore() -> None:
        for name, snapshot in snapshots:
            restore_snapshot(provisioned.server, name, snapshot)

    return restore


#: the types of test items seen (a function-scoped fixture's ``request.node`` is one; a wider one's is a
#: collector): asking ``fixturedef.scope`` costs three calls, once per test
_ITEM_TYPES: set[type] = set()


def _is_item(fixturedef: pytest.FixtureDef[Any], node: object) -> bool:
    if fixturedef.scope != "function":
        return False
    _ITEM_TYPES.add(type(node))
    return True


#: the fixtures a wider fixture requests to have its writes rolled back when it ends, by pytest scope
DATA_FIXTURES = {
    "sa_rollback_class_scope": "class",
    "sa_rollback_module_scope": "module",
    "sa_rollback_package_scope": "package",
    "sa_rollback_session_scope": "session",
}
#: pytest scopes, narrowest first
_RANK = {"function": 0, "class": 1, "module": 2, "package": 3, "session": 4}


def _holds_data(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> bool:
    """Does the fixture request one of DATA_FIXTURES, directly or through the fixtures it requests?"""
    # The test's fixture closure; pytest keeps it private, but has had it for years.
    closure: dict[str, Any] = getattr(request, "_arg2fixturedefs", {})
    seen: set[str] = set()
    todo = list(fixturedef.argnames)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in DATA_FIXTURES:
            return True
        for definition in closure.get(name, ())[-1:]:
            todo.extend(definition.argnames)
    return False


def _open_data_scope(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> int:
    """Where the fixture's own scope goes: how many open scopes are at least as wide as it.

    Raises when a narrower scope that must be set aside already ran
    statements: the new scope could only go on top of it, and its data would
    go with that narrower scope's rollback.
    """
    ranks = request.config.stash[ranks_key]
    rank = _RANK[fixturedef.scope]
    scopes = open_scopes()
    keep = 0
    while keep < len(scopes) and ranks.get(id(scopes[keep]), 0) >= rank:
        keep += 1
    for narrower in scopes[keep:]:
        if narrower.used_databases:
            raise ScopeError(
                f"The {fixturedef.scope}-scoped fixture {fixturedef.argname!r} holds rolled-back data "
                f"(it requests an sa_rollback_*_scope fixture), but it is set up only now, inside "
                f"{narrower.label!r}, which has already used the database. Its data would be rolled "
                "back with that narrower scope. Request it before: in the test's arguments, or in a "
                "fixture the test requests, rather than through request.getfixturevalue() later."
            )
    return keep


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(
    fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
) -> Generator[None, Any, Any]:
    """Open the test's scope before its first function fixture; put each wider fixture where it belongs.

    A wider fixture that requests an ``sa_rollback_*_scope`` fixture (or
    requests a fixture that does) runs in a rollback scope of its own, nested
    in the open ones at least as wide, and rolled back when pytest tears it
    down. Any other wider fixture runs outside every scope and commits for
    real, even when a test requests it first (directly or through
    ``request.getfixturevalue``), or its data would vanish after that test.
    """
    node = request.node  # the test item for a function-scoped fixture, a collector for a wider one
    tests = TESTS.get(node.config)
    if tests is not None and (node is tests.begun or type(node) in _ITEM_TYPES or _is_item(fixturedef, node)):
        first = tests.begun is not node
        if first and (marker := tests.begin(node, fixturedef)) is not None:
            _begin_marked(node, tests, marker)
        try:
            return (yield)
        except BaseException as exc:
            prune(tests.made(node), exc)
            if first:  # its finalizers may be skipped (see TestScope.begin)
                node.addfinalizer(tests.finish)
            raise
    settings = request.config.stash[settings_key]
    if fixturedef.argname in DATA_FIXTURES or not settings.enabled:
        return (yield)
    if not _holds_data(fixturedef, request):
        outside = _Outside()
        request.addfinalizer(outside.leave)  # runs after the fixture's own teardown
        if STATE.top is None:
            result = yield
        else:
            with suspended():
                result = yield
        request.addfinalizer(outside.enter)  # runs before it
        return result
    keep = _open_data_scope(fixturedef, request)
    with suspended(keep):
        label = f"{fixturedef.argname} ({fixturedef.scope} fixture)"
        resets = sequence_scope_args(request.config, _data_scope_resets(request))
        if resets:  # the tests that reset sequences report a database they may not reset; the data is no test
            resets["refuse_other_sequences"] = False
        scope = _open_scope(label, settings, **resets)
        request.config.stash[ranks_key][id(scope)] = _RANK[fixturedef.scope]
        # Registered before the fixture's own teardown, so it runs after it.
        request.addfinalizer(lambda: _close_data_scope(request.config, scope))
        return (yield)


class _Outside:
    """Runs a wider fixture's teardown outside every scope, as its setup ran: its commits are real."""

    def __init__(self) -> None:
        self._suspension: Optional[AbstractContextManager[None]] = None

    def enter(self) -> None:
        self._suspension = suspended()
        self._suspension.__enter__()

    def leave(self) -> None:
        suspension, self._suspension = self._suspension, None
        if suspension is not None:
            suspension.__exit__(None, None, None)


def _close_data_scope(config: pytest.Config, scope: RollbackScope) -> None:
    config.stash[ranks_key].pop(id(scope), None)
    scope.close()


@pytest.hookimpl(trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Open the test's scope at the end of its setup, if no function fixture has opened it."""
    tests = TESTS.get(item.config)
    if tests is not None and tests.begun is not item and (marker := tests.begin(item)) is not None:
        _begin_marked(item, tests, marker)
