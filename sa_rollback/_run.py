"""This run's state, kept in ``config.stash``: the settings, each test's scope, the databases.

Shared by the hooks (:mod:`.plugin`) and the fixtures (:mod:`.fixtures`), which
both import it; it imports neither.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, TypeVar

import pytest

from ._adoption import NOTED
from ._scope import LazyScope, RollbackScope
from ._settings import Settings
from ._state import STATE
from .databases import (
    Plan,
    Provisioned,
    drop_run_clones,
    prepare,
    provision,
    release_leases,
    split_inputs,
    teardown,
)
from .errors import SaRollbackError, SaRollbackWarning

T = TypeVar("T")
settings_key = pytest.StashKey[Settings]()
#: each run's :class:`TestScope`, by its config, for as long as it is configured (None when
#: sa_rollback is off). A dict, not ``config.stash``: the per-fixture hook reads it, and a dict
#: lookup costs no call where the stash costs three.
TESTS: dict[pytest.Config, Optional[TestScope]] = {}
databases_key = pytest.StashKey["Databases"]()
#: the pytest scope (0 function ... 4 session) of each rollback scope the plugin opened, by id
ranks_key = pytest.StashKey[dict[int, int]]()


def worker_id(config: pytest.Config) -> str:
    """This process's xdist worker id ("gw0", ...), or "main" without xdist."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:
        return str(workerinput["workerid"])
    return "main"


def is_xdist_controller(config: pytest.Config) -> bool:
    if hasattr(config, "workerinput"):
        return False
    return bool(getattr(config.option, "numprocesses", None)) and getattr(config.option, "dist", "no") != "no"


class Databases:
    """This process's test database, provisioned once, on first need."""

    def __init__(self, config: pytest.Config, settings: Settings) -> None:
        self.config = config
        self.settings = settings
        workerinput = getattr(config, "workerinput", None)
        self.run_id: str = (
            workerinput["sa_rollback_run"]
            if workerinput and "sa_rollback_run" in workerinput
            else (os.environ.get("SA_ROLLBACK_RUN_ID") or uuid.uuid4().hex[:8])
        )
        self.worker = worker_id(config)
        #: an xdist worker whose controller holds the run's lease takes none of its own
        self.controller_leases = bool(workerinput and workerinput.get("sa_rollback_lease"))
        self.provisioned: Optional[Provisioned] = None
        self._plan: Optional[Plan] = None
        self.builds: list[tuple[str, float]] = []

    def plan(self) -> Plan:
        """Server and template, made once per process (the xdist controller makes it first)."""
        if self._plan is None:
            settings = self.settings
            self._plan = self._guard(
                lambda: prepare(
                    url=settings.url,
                    schema=settings.schema,
                    server_dir=settings.server_dir,
                    run_id=self.run_id,
                    parallel=self.worker != "main" or is_xdist_controller(self.config),
                    rebuild=settings.rebuild,
                    on_build=lambda name, seconds: self.builds.append((name, seconds)),
                    schema_inputs=split_inputs(settings.schema_inputs),
                    schema_dir=self.schema_dir(),
                    lease=not self.controller_leases,
                )
            )
        return self._plan

    def planned_timings(self) -> Optional[dict[str, float]]:
        """How long finding the server and the template took in this process (None before the plan)."""
        return self._plan.timings if self._plan is not None else None

    def fingerprinted(self) -> str:
        """What the template's fingerprint was taken of, for the start-up line ("" if unknown)."""
        inputs = self._plan.inputs if self._plan is not None else []
        return f" (fingerprint of {', '.join(inputs)})" if inputs else ""

    def schema_dir(self) -> Path:
        """Where relative schema paths start: the ini file's directory, else pytest's rootdir."""
        inipath = self.config.inipath
        return inipath.parent if inipath is not None else self.config.rootpath

    def get(self) -> Provisioned:
        if self.provisioned is None:
            plan = self.plan()
            self.provisioned = self._guard(lambda: provision(plan, self.run_id, self.worker, self._notice))
            if self.settings.export_env:
                os.environ[self.settings.export_env] = self.provisioned.url_string()
        return self.provisioned

    def _notice(self, text: str) -> None:
        """Say something at once, past pytest's output capture (a wait the user can end)."""
        capture = self.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
            sys.stderr.write(text + "\n")
            sys.stderr.flush()

    @staticmethod
    def _guard(step: Callable[[], T]) -> T:
        try:
            return step()
        except SaRollbackError as exc:
            raise pytest.UsageError(f"sa_rollback: {exc}") from None
        except Exception:
            raise pytest.UsageError(
                "sa_rollback: setting up the test database failed:\n" + traceback.format_exc()
            ) from None

    def sweep(self) -> None:
        """The xdist controller, once every worker is done: drop the clones a worker left behind."""
        if self._plan is None:
            return
        try:
            drop_run_clones(self._plan, self.run_id)
        except Exception as exc:
            self.config.issue_config_time_warning(
                SaRollbackWarning(f"Dropping the workers' leftover test databases failed: {exc}"), stacklevel=2
            )

    @property
    def leased(self) -> bool:
        """Whether this process holds the run's lease (it planned the run); its workers then need none."""
        return self._plan is not None and not self.controller_leases

    def close(self) -> None:
        STATE.close_all()
        try:
            self._drop_own()
        finally:
            release_leases()

    def _drop_own(self) -> None:
        if self.provisioned is not None:
            try:
                teardown(self.provisioned)
            except Exception as exc:
                self.config.issue_config_time_warning(
                    SaRollbackWarning(f"Dropping the test database {self.provisioned.database!r} failed: {exc}"),
                    stacklevel=2,
                )
            self.provisioned = None


class TestReport(Protocol):
    """What the end-of-run report counts of each test's scope (:class:`._report.RunReport`)."""

    setup: float

    def closed(self, nodeid: str, seconds: float) -> None: ...


class TestScope(LazyScope):
    """The lazy scope of each test in turn, from the test's setup to its teardown.

    This is what a test that touches no database pays for, so it is one
    object for the whole run, reused test after test, with one bound method
    as every test's finalizer: nothing is made, allocated or stored per test
    unless the test uses a database.
    """

    __slots__ = (
        "_check_deferred",
        "_config",
        "_hint",
        "_parent",
        "_parent_marker",
        "_report",
        "begun",
        "count",
        "finish",
        "forget",
        "item",
        "resets",
        "resets_by_default",
    )

    def __init__(self, config: pytest.Config, settings: Settings, report: TestReport, deferred_hint: str) -> None:
        super().__init__(self._make_scope)
        self._config = config
        self._report = report
        self._check_deferred = settings.check_deferred
        self._hint = deferred_hint
        #: does a test without a marker saying otherwise reset sequences?
        self.resets_by_default = settings.reset_sequences
        #: the parent of the last test begun, and the closest sa_rollback marker on it or above
        self._parent: Any = None
        self._parent_marker: Optional[pytest.Mark] = None
        #: tests ended since the report last took the count (kept here: the report is one more object per test)
        self.count = 0
        #: the test whose setup has begun (its scope opened, or found it has none), to its teardown
        self.begun: Optional[pytest.Item] = None
        #: the test whose scope is open (lazily), to its teardown
        self.item: Optional[pytest.Item] = None
        #: does the current test reset sequences?
        self.resets = False
        #: the finalizer of every test with a scope: run after its function fixtures' teardown
        self.finish = self._finish
        #: the finalizer of a test with a marker: a second run of it (a rerun plugin's) begins again
        self.forget = self._forget

    def begin(self, item: pytest.Item, fixturedef: Optional[pytest.FixtureDef[Any]] = None) -> Optional[pytest.Mark]:
        """Begin ``item``: open its scope, lazily, unless it has an ``sa_rollback`` marker.

        The marker is returned then, and nothing is opened: the caller reads
        it, and calls :meth:`open_for` if the test is to have a scope. The
        marker walk and :meth:`open_for` are written out here, since every
        test comes here.

        ``fixturedef``: the test's first function fixture, when this is
        called as it is set up. The finalizer goes to it rather than to the
        item (a call less): its teardown comes after every later function
        fixture's, and runs its finalizers in reverse, so this one after the
        fixture's own. pytest skips a fixture's finalizers when its set-up
        ended without a test outcome (``KeyboardInterrupt``): the caller then
        registers :attr:`finish` on the item too, which runs once either way.
        """
        self.begun = item
        for mark in item.own_markers:
            if mark.name == "sa_rollback":
                return mark
        parent = item.parent
        if parent is not self._parent:
            # Read once per class or module: walking up to the session touched objects that
            # pytest had not touched since, and that cost a test some microseconds.
            self._parent = parent
            self._parent_marker = closest_marker(parent)
        if self._parent_marker is not None:
            return self._parent_marker
        self.item = item
        self.resets = self.resets_by_default
        if NOTED:  # what was lent before must be adopted as the scope opens: it cannot wait
            self.scope = self._make().__enter__()
        else:  # LazyScope.open, with State.defer written out: each call is a test's microsecond
            self.scope = None
            deferred = STATE.deferred
            if deferred:
                STATE.defer(self)
            else:
                deferred[self] = True
        (item if fixturedef is None else fixturedef).addfinalizer(self.finish)
        return None

    def open_for(self, item: pytest.Item, resets: bool) -> None:
        """Open ``item``'s scope, lazily; it is rolled back after the item's function fixtures are torn down."""
        self.item = item
        self.resets = resets
        self.open()
        item.addfinalizer(self.finish)

    def current(self, item: object) -> Optional[RollbackScope]:
        """The scope of ``item`` (made now if not yet), or None when it runs without one."""
        return self.get() if self.item is item else None

    def made(self, item: object) -> Optional[RollbackScope]:
        """The scope of ``item`` if it is made already, else None."""
        return self.scope if self.item is item else None

    def _make_scope(self) -> RollbackScope:
        # Called when the test first uses a database (see LazyScope).
        started = time.perf_counter()
        item = self.item
        assert item is not None
        sequences = sequence_scope_args(self._config, self.resets)
        scope = RollbackScope(item.nodeid, check_deferred=self._check_deferred, **sequences)
        scope.deferred_hint = self._hint
        self._report.setup += time.perf_counter() - started
        return scope

    def _forget(self) -> None:
        self.begun = None

    def _finish(self) -> None:
        __tracebackhide__ = True
        item = self.item
        if item is None:
            return  # finished already (registered twice: see begin)
        self.count += 1
        self.item = self.begun = None
        # LazyScope.end, with State.cancel written out
        if STATE.deferred.pop(self, False):
            return  # never used, and now forgotten: nothing to roll back
        with STATE.lock:
            pass  # another thread may be making it: the lock is held until it is pushed
        scope, self.scope = self.scope, None
        if scope is None:
            return
        if scope.errors:
            # What the test's call raised (pytest keeps it in sys.last_value) is not raised again.
            prune(scope, getattr(sys, "last_value", None))
        started = time.perf_counter()
        try:
            scope.close()
        finally:
            self._report.closed(item.nodeid if item is not None else "?", time.perf_counter() - started)


def sequence_scope_args(config: pytest.Config, reset: bool) -> dict[str, Any]:
    """The RollbackScope arguments that reset sequences, when asked: only on databases sa_rollback made."""
    if not reset:
        return {}
    return {"reset_sequences": True, "sequence_databases": config.stash[databases_key].get().owned()}


def closest_marker(node: Any) -> Optional[pytest.Mark]:
    """``node.get_closest_marker("sa_rollback")``, without its generators."""
    while node is not None:
        for mark in node.own_markers:
            if mark.name == "sa_rollback":
                return mark  # type: ignore[no-any-return]
        node = node.parent
    return None


def prune(scope: Optional[RollbackScope], raised: Optional[BaseException]) -> None:
    """An error the test already failed with is not reported a second time by its scope's teardown.

    The scope keeps errors such as a refused multi-statement ``COMMIT`` so that
    the test fails even when the application catches them; when the error
    reached pytest anyway, it is reported once, where it happened.
    """
    if scope is None or not scope.errors or raised is None:
        return
    seen: set[int] = set()
    chain: list[BaseException] = []
    error: Optional[BaseException] = raised
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    scope.errors[:] = [kept for kept in scope.errors if not any(kept is e for e in chain)]
