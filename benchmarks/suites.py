"""Whole pytest suites, generated into a temporary directory and run in a subprocess.

The suite's application creates its engine at import time, as applications
do; each strategy differs only in its conftest. Under ``-n 2`` every worker
uses its own database, named after ``PYTEST_XDIST_WORKER``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .config import db
from .db import Admin, build_schema
from .schema import make_schema
from .stats import paired, summary

Progress = Callable[[str], None]
REPO = Path(__file__).resolve().parent.parent

_COMMON = """\
import json
import os
import time

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from benchmarks.bodies import body_nodb, body_read, body_write
from benchmarks.schema import make_schema

SCHEMA = make_schema(int(os.environ["BENCH_TABLES"]))
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
# One database per worker, made by the benchmark; or, with the plugin cloning per worker, the one
# base database, whose connections the plugin redirects to the worker's clone.
URL = os.environ["BENCH_URL"].format(worker=WORKER)
ENGINE = create_engine(URL)  # the application's engine, created at import time


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        out = os.environ.get("BENCH_LOOP_FILE")
        if out and "PYTEST_XDIST_WORKER" not in os.environ:
            with open(out, "w") as fh:
                json.dump({"loop_s": time.perf_counter() - start, "tests": session.testscollected}, fh)
"""

_FIXTURES = {
    "none": """
@pytest.fixture
def new_session():
    return lambda: Session(ENGINE)
""",
    "sa_rollback": """
@pytest.fixture
def new_session():
    return lambda: Session(ENGINE)
""",
    "recipe": """
@pytest.fixture
def new_session():
    conn = ENGINE.connect()
    trans = conn.begin()
    yield lambda: Session(bind=conn, join_transaction_mode="create_savepoint")
    trans.rollback()
    conn.close()
""",
    "truncate": """
@pytest.fixture
def new_session():
    yield lambda: Session(ENGINE)
    with ENGINE.begin() as conn:
        conn.exec_driver_sql(SCHEMA.truncate_sql())
""",
}

_ENABLE = """
pytest_plugins = ["sa_rollback"]
"""

#: sa_rollback_auto: SA_ROLLBACK_URL names the base database, and the plugin clones it per xdist worker.
_AUTO = "sa_rollback_auto"

_TESTS = """\
import os

import pytest

from benchmarks.bodies import body_nodb, body_read, body_write
from benchmarks.schema import make_schema

SCHEMA = make_schema(int(os.environ["BENCH_TABLES"]))


@pytest.mark.parametrize("i", range({write}))
def test_write(new_session, i):
    body_write(new_session, SCHEMA)


@pytest.mark.parametrize("i", range({read}))
def test_read(new_session, i):
    body_read(new_session, SCHEMA)


@pytest.mark.parametrize("i", range({nodb}))
def test_nodb(i):
    body_nodb(None, SCHEMA)
"""

_NODB_CONFTEST = """\
import json
import os
import time

import pytest

TIMES = []


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Setup, call and teardown of one test, with every hook and fixture of the plugin.
    start = time.perf_counter_ns()
    try:
        return (yield)
    finally:
        TIMES.append((time.perf_counter_ns() - start) / 1000)


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        with open(os.environ["BENCH_LOOP_FILE"], "w") as fh:
            json.dump(
                {
                    "loop_s": time.perf_counter() - start,
                    "tests": session.testscollected,
                    "mean_us": sum(TIMES) / len(TIMES),
                },
                fh,
            )
"""

_NODB_TESTS = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_nothing(i):
    assert i >= 0
"""


def suite_db(strategy: str, worker: str) -> str:
    return db(f"suite_{strategy}_{worker}")


def _write_suite(root: Path, strategy: str, tests: int) -> None:
    conftest = _COMMON + _FIXTURES["sa_rollback" if strategy == _AUTO else strategy]
    if strategy in ("sa_rollback", _AUTO):
        conftest += _ENABLE
    root.mkdir(parents=True)
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(conftest)
    # Two in five tests write, two read, one touches no database; split over files as a suite would be.
    files = 6
    per_file = tests // files
    for n in range(files):
        count = per_file + (1 if n < tests % files else 0)
        write, read = count * 2 // 5, count * 2 // 5
        text = _TESTS.format(write=write, read=read, nodb=count - write - read)
        (root / f"test_suite_{n}.py").write_text(text)


def _run_pytest(
    root: Path, env: dict[str, str], workers: int, extra: tuple[str, ...] = ()
) -> tuple[float, dict[str, Any]]:
    loop_file = root / "loop.json"
    env = dict(env, BENCH_LOOP_FILE=str(loop_file))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *extra]
    if workers:
        args += ["-n", str(workers)]
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"generated suite failed in {root}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    loop = json.loads(loop_file.read_text()) if loop_file.exists() else {}
    return wall, loop


def _env(url: str, tables: int = 0) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SA_ROLLBACK"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["BENCH_URL"] = url
    env["BENCH_TABLES"] = str(tables)
    return env


def _suite_env(admin: Admin, strategy: str, template: str, workers: int, tables: int) -> dict[str, str]:
    """Fresh databases for one suite run (not timed), and the environment that points the suite at them."""
    if strategy == _AUTO:
        base = suite_db(strategy, "base")
        admin.recreate(base, template)
        url = admin.db_url(base).render_as_string(hide_password=False)
        return dict(_env(url, tables), SA_ROLLBACK_URL=url)
    for worker in ["main"] if not workers else [f"gw{i}" for i in range(workers)]:
        admin.recreate(suite_db(strategy, worker), template)
    placeholder = suite_db(strategy, "xworkerx")
    url = admin.db_url(placeholder).render_as_string(hide_password=False)
    return _env(url.replace(placeholder, placeholder.replace("xworkerx", "{worker}")), tables)


def _drop_plugin_clones(admin: Admin) -> None:
    """Clones the plugin made of the auto variant's base database, should one outlive its run."""
    base = suite_db(_AUTO, "base")
    rows = admin.conn.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE %s", (base.replace("_", r"\_") + r"\_sar\_%",)
    ).fetchall()
    for (name,) in rows:
        admin.drop(name, force=True)


def run_suites(
    admin: Admin,
    strategies: tuple[str, ...],
    tests: int,
    tables: int,
    worker_counts: tuple[int, ...],
    reps: int,
    progress: Progress,
) -> dict[str, Any]:
    """Wall time of the generated suite per strategy, serial and with xdist, interleaved."""
    schema = make_schema(tables)
    template = db("suite_template")
    build_schema(admin, template, schema)
    walls: dict[str, dict[str, list[float]]] = {s: {str(w): [] for w in worker_counts} for s in strategies}
    loops: dict[str, list[float]] = {s: [] for s in strategies}
    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_suite_") as tmp:
        for strategy in strategies:
            _write_suite(Path(tmp) / strategy, strategy, tests)
        for rep in range(reps):
            # Each strategy's serial and -n 2 runs sit next to each other, so that their ratio sees the
            # same background load; the strategy order rotates from one repetition to the next.
            shift = rep % len(strategies)
            for strategy in strategies[shift:] + strategies[:shift]:
                for workers in worker_counts:
                    env = _suite_env(admin, strategy, template, workers, tables)
                    wall, loop = _run_pytest(Path(tmp) / strategy, env, workers)
                    walls[strategy][str(workers)].append(wall)
                    if not workers and loop:
                        loops[strategy].append(loop["loop_s"])
                    label = f"-n {workers}" if workers else "serial"
                    progress(f"suite rep {rep + 1}/{reps} {strategy:<12} {label:<7} {wall:6.2f} s wall")
    if _AUTO in strategies:
        _drop_plugin_clones(admin)
    out: dict[str, Any] = {"tests": tests, "tables": tables, "reps": reps, "strategies": {}}
    for strategy in strategies:
        entry: dict[str, Any] = {}
        for workers in worker_counts:
            entry[f"wall_s_{'serial' if not workers else f'n{workers}'}"] = summary(walls[strategy][str(workers)])
        if loops[strategy]:
            entry["test_loop_s_serial"] = summary(loops[strategy])
        serial, parallel = walls[strategy].get("0"), walls[strategy].get("2")
        if serial and parallel:
            entry["speedup_n2"] = summary([a / b for a, b in zip(serial, parallel)])
        for workers in worker_counts:
            if strategy != "none" and "none" in walls:
                label = "serial" if not workers else f"n{workers}"
                entry[f"vs_none_{label}_s"] = paired(walls[strategy][str(workers)], walls["none"][str(workers)])
        out["strategies"][strategy] = entry
    return out


#: Output capture and log capture off: they cost the same with and without the plugin, and
#: removing them shrinks each test, and with it the run-to-run noise, by about a third.
LEAN_ARGS = ("-s", "-p", "no:logging")


def run_nodb_suites(tests: int, reps: int, progress: Progress, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Per-test cost of the plugin on tests that touch no database: plugin loaded or not, runs alternating.

    Each run reports the mean time of one test's whole protocol (setup, call,
    teardown); the overhead is the mean of the differences between the two runs
    of each pair. ``extra`` is added to pytest's arguments. The in-process
    measurement of ``hotpath.nodb_test_cost`` is the precise one; this one
    checks it on whole runs, where run-to-run noise is of the size of the effect.
    """
    # "imported": sa_rollback.plugin (and so SQLAlchemy) imported, not registered. A suite that uses a
    # database has those objects in memory anyway, and each garbage collection walks them: the
    # difference to it is what the plugin's hooks cost.
    means: dict[str, list[float]] = {"plain": [], "imported": [], "plugin": []}
    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_nodb_") as tmp:
        for variant in means:
            root = Path(tmp) / variant
            root.mkdir()
            (root / "pytest.ini").write_text("[pytest]\n")
            conftest = _NODB_CONFTEST
            if variant == "plugin":
                conftest += '\npytest_plugins = ["sa_rollback"]\n'
            elif variant == "imported":
                conftest += "\nimport sa_rollback.plugin  # noqa: F401\n"
            (root / "conftest.py").write_text(conftest)
            (root / "test_nothing.py").write_text(_NODB_TESTS.format(n=tests))
        env = _env("")
        for rep in range(reps):
            order = ("plain", "imported", "plugin") if rep % 2 == 0 else ("plugin", "imported", "plain")
            for variant in order:
                wall, loop = _run_pytest(Path(tmp) / variant, env, 0, extra)
                means[variant].append(loop["mean_us"])
                progress(
                    f"no-db suite{' ' + ' '.join(extra) if extra else ''} rep {rep + 1}/{reps} {variant:<8} "
                    f"{tests} tests: mean test {loop['mean_us']:6.1f} us, {wall:.2f} s wall"
                )
    return {
        "tests": tests,
        "reps": reps,
        "pytest_args": list(extra),
        "plain_us_per_test": summary(means["plain"]),
        "plugin_us_per_test": summary(means["plugin"]),
        "plugin_overhead_us_per_test": paired(means["plugin"], means["plain"])["diff"],
        "imported_us_per_test": summary(means["imported"]),
        "hooks_us_per_test": paired(means["plugin"], means["imported"])["diff"],
        "run_means_us": means,
    }
