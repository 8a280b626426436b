"""The plugin's own cost on its hot paths: per checkout, per statement, per test that touches no database.

``python -m benchmarks --profile-hot-path`` runs only this section.

Times are CPU time of the measuring thread (``time.thread_time_ns``): the
plugin costs CPU, not waiting. The network wait (its round trips are counted
exactly elsewhere) and the time other processes hold the CPU are left out; on
this shared machine wall-clock blocks varied by a factor of two, CPU time by a
few percent. They come from paired blocks: each block runs one variant many
times, every round runs one block of each variant in an order that rotates
from round to round, and a cost is the mean over the rounds of the difference
between two variants' blocks of the same round. Counts come from cProfile's
call counts, which are exact: the function calls (Python and builtin) that one
checkout, statement or test makes, with the plugin's share by function.

The per-test cost under pytest is measured in one pytest run of a generated
suite: sa_rollback's per-test hooks are switched on and off from one test to
the next (adjacent tests form a pair, in alternating order), and each test's
protocol (setup, call, teardown) is timed, without the time the garbage
collector took in it, which is reported apart.
"""

from __future__ import annotations

import cProfile
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

import sa_rollback
from sa_rollback._proxy import LogicalConnection

from .config import Plan, db
from .db import Admin, build_schema
from .schema import make_schema
from .stats import paired, summary

Progress = Callable[[str], None]
#: runs a variant ``n`` times and returns the CPU nanoseconds it took
Runner = Callable[[int], int]
#: CPU time of this thread
CLOCK = time.thread_time_ns
PACKAGE_DIR = str(Path(sa_rollback.__file__).resolve().parent) + os.sep


def paired_blocks(variants: dict[str, Runner], iterations: int, rounds: int) -> dict[str, list[float]]:
    """Microseconds per iteration of each variant, one block per variant and round, in rotating order."""
    names = list(variants)
    for name in names:
        variants[name](iterations)  # warm-up: pools, caches, prepared statements
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            gc.collect()
            samples[name].append(variants[name](iterations) / iterations / 1000)
    return samples


def _timed(step: Callable[[], Any]) -> Runner:
    def run(n: int) -> int:
        start = CLOCK()
        for _ in range(n):
            step()
        return CLOCK() - start

    return run


def _label(code: Any) -> str:
    if isinstance(code, str):  # a builtin
        return code
    path = code.co_filename
    short = "sa_rollback/" + path[len(PACKAGE_DIR) :] if path.startswith(PACKAGE_DIR) else Path(path).name
    return f"{short}:{code.co_firstlineno}({code.co_name})"


def call_counts(step: Callable[[], Any], n: int) -> dict[str, Any]:
    """Function calls per iteration under cProfile: all of them, and the plugin's own, by function.

    ``sa_rollback_us_share`` is each function's share of the time spent in the
    plugin's own functions (cProfile's ``tottime``), which the profiler
    inflates but does not reorder much; the garbage collector is off meanwhile.
    """
    profile = cProfile.Profile()
    gc.collect()
    gc.disable()  # a collection would be charged to whichever function allocated last
    try:
        profile.enable()
        for _ in range(n):
            step()
        profile.disable()
    finally:
        gc.enable()
    entries = profile.getstats()
    total = sum(e.callcount for e in entries)
    ours = [e for e in entries if not isinstance(e.code, str) and e.code.co_filename.startswith(PACKAGE_DIR)]
    own_time = sum(e.inlinetime for e in ours) or 1.0
    functions = sorted(ours, key=lambda e: -e.inlinetime)
    return {
        "iterations": n,
        # The profiler's own disable() call is the one call that is not per iteration.
        "calls": (total - 1) / n,
        "sa_rollback_calls": sum(e.callcount for e in ours) / n,
        "sa_rollback_functions": [
            {"function": _label(e.code), "calls": e.callcount / n, "share": e.inlinetime / own_time}
            for e in functions
            if e.callcount
        ],
    }


# -- per checkout ---------------------------------------------------------------


def checkout_cost(engine: sa.Engine, iterations: int, rounds: int) -> dict[str, Any]:
    """``engine.connect()`` + ``close()``: inside a scope, before and after its first statement, and outside one.

    Outside a scope the listeners return at once; before the scope's first
    statement on the database, each checkout also checks that the server kept
    the shared connection (``Physical.usable()``), which is the path of the
    first checkout of every test.
    """

    def checkout() -> None:
        engine.connect().close()

    def statement() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    loop = _timed(checkout)

    def outside(n: int) -> int:
        return loop(n)

    def in_scope(n: int) -> int:
        with sa_rollback.rollback_scope():
            statement()  # the scope's frame exists, as after a test's first statement
            return loop(n)

    def before_first_statement(n: int) -> int:
        with sa_rollback.rollback_scope():
            return loop(n)

    samples = paired_blocks(
        {"outside": outside, "in_scope": in_scope, "before_first_statement": before_first_statement},
        iterations,
        rounds,
    )
    counts: dict[str, Any] = {"outside": call_counts(checkout, 200)}
    with sa_rollback.rollback_scope():
        statement()
        counts["in_scope"] = call_counts(checkout, 200)
    with sa_rollback.rollback_scope():
        counts["before_first_statement"] = call_counts(checkout, 200)
    return {
        "iterations": iterations,
        "rounds": rounds,
        "us": {name: summary(values) for name, values in samples.items()},
        "in_scope": {
            "plugin_us": paired(samples["in_scope"], samples["outside"])["diff"],
            "extra_calls": counts["in_scope"]["calls"] - counts["outside"]["calls"],
        },
        "before_first_statement": {
            "plugin_us": paired(samples["before_first_statement"], samples["outside"])["diff"],
            "liveness_check_us": paired(samples["before_first_statement"], samples["in_scope"])["diff"],
            "extra_calls": counts["before_first_statement"]["calls"] - counts["outside"]["calls"],
        },
        "calls": counts,
    }


def liveness_check_cost(engine: sa.Engine, iterations: int, rounds: int) -> dict[str, Any]:
    """``Driver.dead()`` alone, on the shared connection: the liveness check's poll, per call."""
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            logical = conn.connection.dbapi_connection
            assert isinstance(logical, LogicalConnection)
            phys = logical.phys
    driver, real = phys.driver, phys.conn
    samples = paired_blocks(
        {"dead": _timed(lambda: driver.dead(real)), "empty_call": _timed(lambda: None)}, iterations, rounds
    )
    return {
        "dead_us": paired(samples["dead"], samples["empty_call"])["diff"],
        "calls": call_counts(lambda: driver.dead(real), 200),
    }


# -- per statement --------------------------------------------------------------


@contextmanager
def _logical_and_physical(engine: sa.Engine) -> Iterator[tuple[Any, Any, LogicalConnection]]:
    """Inside a scope: a cursor of a logical connection, one of the shared physical connection, and the former."""
    with sa_rollback.rollback_scope():
        raw = engine.raw_connection()
        try:
            logical = raw.dbapi_connection
            assert isinstance(logical, LogicalConnection)
            logical_cursor = logical.cursor()
            logical_cursor.execute("SELECT 1")  # opens the frame: the statements below run inside it
            physical_cursor = logical.phys.conn.cursor()
            yield logical_cursor, physical_cursor, logical
        finally:
            raw.close()


def statement_cost(engine: sa.Engine, iterations: int, rounds: int) -> dict[str, Any]:
    """One ``SELECT 1``: through a logical connection's cursor against the shared connection's own cursor.

    Both run in the same transaction, on the same connection, with one round
    trip each: the difference is the plugin's code (the cursor wrapper and
    ``LogicalConnection.run_statement``). ``run_only`` times ``run_statement`` with a statement
    function that does nothing, which leaves out the driver and the network;
    ``sqlalchemy`` is ``connection.exec_driver_sql("SELECT 1")`` inside a
    scope against the same outside one, in a transaction too.
    """
    sql = "SELECT 1"

    def noop(query: Any, *args: Any, **kwargs: Any) -> None:
        return None

    with _logical_and_physical(engine) as (logical_cursor, physical_cursor, logical):

        def through_logical() -> None:
            logical_cursor.execute(sql)
            logical_cursor.fetchone()

        def through_physical() -> None:
            physical_cursor.execute(sql)
            physical_cursor.fetchone()

        def run_only() -> None:
            logical.run_statement(physical_cursor, noop, sql, (None,), {}, None)

        def noop_only() -> None:
            noop(sql, None)

        dbapi = paired_blocks(
            {"logical": _timed(through_logical), "physical": _timed(through_physical)}, iterations, rounds
        )
        python = paired_blocks({"run": _timed(run_only), "noop": _timed(noop_only)}, iterations * 10, rounds)
        counts = {
            "logical": call_counts(through_logical, 200),
            "physical": call_counts(through_physical, 200),
            "run_only": call_counts(run_only, 200),
        }

    def sqlalchemy_runner(scoped: bool) -> Runner:
        def run(n: int) -> int:
            with sa_rollback.rollback_scope() if scoped else _nothing(), engine.begin() as conn:
                conn.exec_driver_sql(sql).scalar()
                start = CLOCK()
                for _ in range(n):
                    conn.exec_driver_sql(sql).scalar()
                return CLOCK() - start

        return run

    orm = paired_blocks({"in_scope": sqlalchemy_runner(True), "outside": sqlalchemy_runner(False)}, iterations, rounds)
    return {
        "iterations": iterations,
        "rounds": rounds,
        "dbapi": {
            "us": {name: summary(values) for name, values in dbapi.items()},
            "plugin_us": paired(dbapi["logical"], dbapi["physical"])["diff"],
            "extra_calls": counts["logical"]["calls"] - counts["physical"]["calls"],
        },
        "run_only": {
            "plugin_us": paired(python["run"], python["noop"])["diff"],
            "calls": counts["run_only"]["calls"],
        },
        "sqlalchemy": {
            "us": {name: summary(values) for name, values in orm.items()},
            "plugin_us": paired(orm["in_scope"], orm["outside"])["diff"],
        },
        "calls": counts,
    }


@contextmanager
def _nothing() -> Iterator[None]:
    yield


# -- per test under pytest ---------------------------------------------------------

_NODB_CONFTEST = """\
import cProfile
import gc
import json
import os
import time
import types

import pytest

pytest_plugins = ["sa_rollback"]
PACKAGE_DIR = []

#: hooks that pytest calls for every test; the plugin's other hooks run once per session
PER_TEST = {
    "pytest_runtest_protocol", "pytest_runtest_logstart", "pytest_runtest_logfinish", "pytest_runtest_setup",
    "pytest_runtest_call", "pytest_runtest_teardown", "pytest_runtest_makereport", "pytest_runtest_logreport",
    "pytest_fixture_setup", "pytest_fixture_post_finalizer", "pytest_pyfunc_call",
}
SHIMS = []
TIMES = {"on": [], "off": []}
#: CPU time in the garbage collector during each timed test: a collection runs in whichever test
#: crosses the allocation threshold, so it is taken out of that test's time and reported apart
GC_TIMES = {"on": [], "off": []}
_gc = [0, 0]


def _gc_callback(phase, info):
    if phase == "start":
        _gc[1] = time.thread_time_ns()
    else:
        _gc[0] += time.thread_time_ns() - _gc[1]


gc.callbacks.append(_gc_callback)
CALLS = {"on": [], "off": [], "on_plugin": []}
PROFILED = int(os.environ["BENCH_PROFILED_PAIRS"])


#: (hook caller, [(position, the shims' implementation)]): what _switch takes out and puts back
_SWITCHED = {}


def _switch(config, on):
    # The shims' implementations are taken out of, and put back into, the hook callers' lists in
    # place. Registering and unregistering the shims instead (pytest_plugin_registered, fixture
    # parsing, pluggy's bookkeeping) made the next test slower: two empty hooks measured +12 us.
    pm = config.pluginmanager
    if not _SWITCHED:
        for shim in SHIMS:
            pm.register(shim)
            for caller in pm.get_hookcallers(shim) or []:
                impls = caller._hookimpls
                entry = _SWITCHED.setdefault(id(caller), (caller, []))
                entry[1].extend((impls.index(impl), impl) for impl in impls if impl.plugin is shim)
    for caller, entries in _SWITCHED.values():
        impls = caller._hookimpls
        for position, impl in entries:
            present = impl in impls
            if on and not present:
                impls.insert(position, impl)
            elif not on and present:
                impls.remove(impl)


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    # Move the plugin's per-test hooks into shims that can be switched per test; the plugin
    # module itself stays out from here on (its session hooks already ran).
    import sa_rollback  # imported by now: imported earlier, pytest could not rewrite its asserts

    PACKAGE_DIR.append(os.path.dirname(os.path.abspath(sa_rollback.__file__)) + os.sep)
    pm = session.config.pluginmanager
    moved = []
    for plugin in list(pm.get_plugins()):
        module = getattr(plugin, "__name__", "")
        if not (isinstance(module, str) and module.startswith("sa_rollback")):
            continue
        hooks = {c.name: getattr(plugin, c.name) for c in pm.get_hookcallers(plugin) or [] if c.name in PER_TEST}
        if hooks:
            pm.unregister(plugin)
            SHIMS.append(types.SimpleNamespace(**hooks))
            moved.append([module, sorted(hooks)])
    try:
        return (yield)
    finally:
        with open(os.environ["BENCH_OUT"], "w") as fh:
            json.dump({"times_us": TIMES, "gc_us": GC_TIMES, "calls": CALLS, "moved_hooks": moved}, fh)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    pair, second = divmod(item._bench_index, 2)
    on = (second == 0) == (pair % 2 == 0)  # on-off, off-on, on-off, ...
    _switch(item.config, on)
    profiled = pair >= len(item.session.items) // 2 - PROFILED
    profile = cProfile.Profile() if profiled else None
    _gc[0] = 0
    start = time.thread_time_ns()  # CPU time: other processes' bursts are left out
    if profile is not None:
        profile.enable()
    try:
        return (yield)
    finally:
        if profile is not None:
            profile.disable()
            entries = profile.getstats()
            key = "on" if on else "off"
            CALLS[key].append(sum(e.callcount for e in entries) - 1)
            if on:
                CALLS["on_plugin"].append(
                    sum(e.callcount for e in entries if getattr(e.code, "co_filename", "").startswith(PACKAGE_DIR[0]))
                )
        else:
            took, in_gc = time.thread_time_ns() - start, _gc[0]
            TIMES["on" if on else "off"].append((took - in_gc) / 1000)
            GC_TIMES["on" if on else "off"].append(in_gc / 1000)


def pytest_collection_modifyitems(items):
    for index, item in enumerate(items):
        item._bench_index = index
"""

_NODB_TESTS = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_nothing(i):
    assert i >= 0
"""


def nodb_test_cost(
    tests: int,
    profiled_pairs: int,
    extra: tuple[str, ...] = ("-s", "-p", "no:logging"),
    package_root: Path | None = None,
) -> dict[str, Any]:
    """Per-test cost of the plugin's hooks on tests that touch no database, switched per test in one pytest run.

    ``package_root``: a directory holding another ``sa_rollback/`` to measure (see :mod:`.nodb_revs`).
    """
    from .suites import _env

    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_hot_") as tmp:
        root = Path(tmp)
        (root / "pytest.ini").write_text("[pytest]\n")
        (root / "conftest.py").write_text(_NODB_CONFTEST)
        (root / "test_nothing.py").write_text(_NODB_TESTS.format(n=tests))
        out = root / "out.json"
        env = dict(_env(""), BENCH_OUT=str(out), BENCH_PROFILED_PAIRS=str(profiled_pairs))
        if package_root is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(package_root), env["PYTHONPATH"]])
        args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra]
        proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the no-database suite failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        data = json.loads(out.read_text())
    times, calls = data["times_us"], data["calls"]
    # The run's first test does pytest's own first-test work (some 35 ms): it is left out, with its pair.
    times = {side: values[1:] for side, values in times.items()}
    pairs = min(len(times["on"]), len(times["off"]))
    return {
        "tests": tests,
        "pairs": pairs,
        "pytest_args": list(extra),
        "moved_hooks": data["moved_hooks"],
        "on_us": summary(times["on"][:pairs]),
        "off_us": summary(times["off"][:pairs]),
        "plugin_us": paired(times["on"][:pairs], times["off"][:pairs])["diff"],
        "gc_on_us": summary(data["gc_us"]["on"][:pairs]),
        "gc_off_us": summary(data["gc_us"]["off"][:pairs]),
        "calls_on": summary(calls["on"]),
        "calls_off": summary(calls["off"]),
        "plugin_calls": summary(calls["on_plugin"]),
    }


# -- the section ------------------------------------------------------------------


def run_hot_path(admin: Admin, plan: Plan, progress: Progress) -> dict[str, Any]:
    """Every hot-path figure, for both drivers where a connection is involved."""
    name = db("hot")
    build_schema(admin, name, make_schema(1))
    out: dict[str, Any] = {"drivers": {}}
    for driver in ("psycopg", "psycopg2"):
        engine = sa.create_engine(admin.db_url(name).set(drivername=f"postgresql+{driver}"))
        try:
            entry = {
                "checkout": checkout_cost(engine, plan.hot_iterations, plan.hot_rounds),
                "liveness": liveness_check_cost(engine, plan.hot_iterations * 10, plan.hot_rounds),
                "statement": statement_cost(engine, plan.hot_iterations, plan.hot_rounds),
            }
        finally:
            engine.dispose()
            from sa_rollback._state import STATE

            STATE.close_all()  # before the database is dropped
        out["drivers"][driver] = entry
        checkout = entry["checkout"]
        progress(
            f"hot path {driver}: checkout in scope +{checkout['in_scope']['plugin_us']['mean']:.1f} us, before the "
            f"first statement +{checkout['before_first_statement']['plugin_us']['mean']:.1f} us; statement "
            f"+{entry['statement']['dbapi']['plugin_us']['mean']:.1f} us (dbapi), "
            f"{entry['statement']['run_only']['plugin_us']['mean']:.1f} us (run_statement alone)"
        )
    # The timing driver's figures are the headline ones.
    out["checkout"] = out["drivers"]["psycopg"]["checkout"]
    out["statement"] = out["drivers"]["psycopg"]["statement"]
    out["nodb_test"] = nodb_test_cost(plan.hot_nodb_tests, plan.hot_profiled_pairs)
    progress(
        f"hot path: test with no database +{out['nodb_test']['plugin_us']['mean']:.2f} "
        f"± {out['nodb_test']['plugin_us']['ci95']:.2f} us over {out['nodb_test']['pairs']} pairs"
    )
    return out
