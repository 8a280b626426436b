"""The end-of-run report, and the run's outside-connection watch: the plugin's hooks call in here.

The plugin counts tests and times their scopes' set-up and rollback here; the
core's counters (:mod:`._stats`) and the databases' timings are read once, at
the end. Under xdist each worker sends its report to the controller
(``workeroutput``), which adds them up.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest

from ._outside import OUTSIDE
from ._run import TESTS, Databases, TestScope, is_xdist_controller, settings_key
from ._settings import OPTIONS, Settings
from ._stats import STATS

report_key = pytest.StashKey["RunReport"]()

#: how many of the slowest rollbacks the full report lists
SLOWEST = 5
#: the key in xdist's workeroutput
WORKER_KEY = "sa_rollback_report"


#: the figures that add up over processes
_SUMMED = (
    "tests",
    "setup",
    "rollback",
    "savepoints",
    "round_trips",
    "peak",
    "server",
    "template",
    "clones",
    "clone_count",
)


@dataclass
class RunReport:
    """One process's figures (or, in the xdist controller, every process's)."""

    tests: int = 0
    setup: float = 0.0
    rollback: float = 0.0
    #: (seconds, test id) of the slowest rollbacks: a min-heap of at most SLOWEST
    slowest: list[tuple[float, str]] = field(default_factory=list)
    savepoints: int = 0
    round_trips: int = 0
    databases: set[str] = field(default_factory=set)
    peak: int = 0
    server: float = 0.0
    template: float = 0.0
    clones: float = 0.0
    clone_count: int = 0
    processes: int = 1

    def closed(self, nodeid: str, seconds: float) -> None:
        self.rollback += seconds
        self.closed_entry(seconds, nodeid)

    def collect(self, databases: Optional[Databases], tests: Optional[TestScope]) -> None:
        """Take the core's and the tests' counters and the provisioning timings of this process (once, at the end)."""
        if tests is not None:
            self.tests += tests.count
            tests.count = 0
        self.savepoints += STATS.savepoints
        self.round_trips += STATS.round_trips
        self.databases |= STATS.databases
        self.peak += STATS.peak
        STATS.reset()
        if databases is None:
            return
        provisioned = databases.provisioned
        timings = provisioned.timings if provisioned is not None else (databases.planned_timings() or {})
        self.server += timings.get("server", 0.0)
        self.template += timings.get("template", 0.0)
        if "clone" in timings:
            self.clones += timings["clone"]
            self.clone_count += 1

    def as_dict(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["databases"] = sorted(self.databases)
        data["slowest"] = [list(entry) for entry in self.slowest]
        return data

    def merge(self, data: dict[str, Any]) -> None:
        """Add a worker's figures (its :meth:`as_dict`)."""
        for name in _SUMMED:
            setattr(self, name, getattr(self, name) + data.get(name, 0))
        self.processes += data.get("processes", 1)
        self.databases |= set(data.get("databases", ()))
        for seconds, nodeid in data.get("slowest", ()):
            self.closed_entry(float(seconds), str(nodeid))

    def closed_entry(self, seconds: float, nodeid: str) -> None:
        entry = (seconds, nodeid)
        if len(self.slowest) < SLOWEST:
            heapq.heappush(self.slowest, entry)
        elif entry > self.slowest[0]:
            heapq.heapreplace(self.slowest, entry)

    @property
    def provisioning(self) -> float:
        return self.server + self.template + self.clones

    def line(self) -> str:
        total = self.setup + self.rollback + self.provisioning
        over = f", summed over {self.processes} processes" if self.processes > 1 else ""
        return (
            f"sa_rollback: {_plural(self.tests, 'test')} isolated on {_plural(len(self.databases), 'database')}; "
            f"{_plural(self.savepoints, 'savepoint')}, {_plural(self.round_trips, 'round trip')} of its own; "
            f"{total:.2f} s in isolation (set-up {self.setup:.2f} s, rollback {self.rollback:.2f} s, "
            f"provisioning {self.provisioning:.2f} s); at most {_plural(self.peak, 'server connection')} "
            f"at once{over}"
        )

    def table(self) -> list[str]:
        rows = [
            ("tests isolated", str(self.tests), ""),
            ("databases touched", str(len(self.databases)), ", ".join(sorted(self.databases))),
            ("savepoints taken", str(self.savepoints), "its own: undo points and nested scopes"),
            ("round trips of its own", str(self.round_trips), "SAVEPOINT, RELEASE, ROLLBACK, sequence reads"),
            ("scope set-up", f"{self.setup:.3f} s", ""),
            ("rollback", f"{self.rollback:.3f} s", ""),
            ("server", f"{self.server:.3f} s", "start or find it"),
            ("template", f"{self.template:.3f} s", "build or find it"),
            ("clones", f"{self.clones:.3f} s", f"{self.clone_count} made"),
            (
                "server connections, peak",
                str(self.peak),
                f"shared and admin ones; summed over {self.processes} processes" if self.processes > 1 else "",
            ),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = ["sa_rollback report"]
        for name, value, note in rows:
            lines.append(f"  {name:<{width}}  {value:>10}  {note}".rstrip())
        if self.slowest:
            lines.append("  slowest to roll back:")
            for seconds, nodeid in sorted(self.slowest, reverse=True):
                lines.append(f"    {seconds:.4f} s  {nodeid}")
        return lines


def _plural(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def write(terminalreporter: Any, report: RunReport, verbose: bool) -> None:
    if verbose:
        terminalreporter.write_sep("-", "sa_rollback")
        for line in report.table():
            terminalreporter.write_line(line)
    else:
        terminalreporter.write_line(report.line())


#: how a pytest user turns the outside-connection check off, for OutsideConnectionError
_OUTSIDE_HINT = next(
    f"set {o.flag}=off (or the ini key {o.ini} = off, or {o.env}=off)" for o in OPTIONS if o.field == "detect_outside"
)


def configure(config: pytest.Config, settings: Settings, databases: Databases) -> None:
    """Start counting; watch this process's own databases for outside connections when asked."""
    STATS.reset()
    config.stash[report_key] = RunReport(processes=0 if is_xdist_controller(config) else 1)
    if settings.enabled and settings.detect_outside:
        # Now, before any pool connects: the pools' own connections must be known.
        OUTSIDE.watch(lambda: databases.provisioned.owned() if databases.provisioned else (), _OUTSIDE_HINT)


def unconfigure() -> None:
    OUTSIDE.watch(None)


def worker_done(config: pytest.Config, databases: Databases) -> None:
    """An xdist worker's figures, for the controller (read in :func:`node_down`)."""
    report = config.stash.get(report_key, None)
    if report is not None:
        report.collect(databases, TESTS.get(config))
        config.workeroutput[WORKER_KEY] = report.as_dict()  # type: ignore[attr-defined]


def node_down(node: Any) -> None:
    """The controller: a worker is done; add its figures."""
    data = getattr(node, "workeroutput", {}).get(WORKER_KEY)
    report = node.config.stash.get(report_key, None)
    if data and report is not None:
        report.merge(data)


def summary(terminalreporter: Any, config: pytest.Config, databases: Databases) -> None:
    report = config.stash.get(report_key, None)
    settings = config.stash[settings_key]
    if report is None or not (settings.report and settings.enabled):
        return
    report.collect(databases, TESTS.get(config))
    if not report.tests and databases.planned_timings() is None and report.processes <= 1:
        return  # nothing was isolated or provisioned (sa_rollback off, or no test used a database)
    write(terminalreporter, report, config.getoption("verbose") > 0)
