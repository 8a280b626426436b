"""This run's state, kept in ``config.stash``: the settings, each test's scope, the databases.

Shared by the hooks (:mod:`.plugin`) and the fixtures (:mod:`.fixtures`), which
both import it; it imports neither.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Callable, Optional, TypeVar

import pytest

from ._scope import LazyScope
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
#: the test's scope, made on first use (None when the test runs without one); set when its first fixture is set up
scope_key = pytest.StashKey[Optional[LazyScope]]()
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
