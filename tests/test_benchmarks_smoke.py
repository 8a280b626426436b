"""A small run of the benchmark package, so that it cannot rot.

It runs ``python -m benchmarks --smoke`` in a subprocess (sa_rollback's
listeners are process-wide) on databases of its own, named after the run, and
checks the shape and sanity of what it wrote. It checks no speed: the benchmark
measures, it does not judge. An unreachable server makes it fail, like the rest
of the suite.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

from .conftest import ADMIN_URL, RUN_ID, WORKER, libpq_dsn

REPO = Path(__file__).resolve().parent.parent
#: in the benchmark's database names: concurrent runs of the suite never share one (one process
#: of a run runs the benchmark, below)
TAG = f"smoke_{RUN_ID}"
STRATEGIES = ("none", "recipe", "sa_rollback", "truncate", "drop_create", "template_db")
BODIES = ("write", "read", "nodb")
ASYNC_GROUPS = ("asyncpg/shared", "psycopg/shared", "asyncpg/fresh", "psycopg/fresh", "sync/sync")
ASYNC_STRATEGIES = ("none", "recipe", "truncate", "sa_rollback")


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    # Under xdist the module's tests can land on two workers: the first runs the benchmark, the
    # other waits for it and reads its results from the run's shared temporary directory.
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if WORKER != "main" else base
    out = shared / "benchmarks-smoke"
    with open(shared / "benchmarks-smoke.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "results.json").exists():
            out.mkdir(exist_ok=True)
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks", "--smoke", "--tag", TAG, "--out", str(out), "--url", ADMIN_URL],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=600,  # a guard against a hang, not a speed check: a loaded machine takes 80 s
            )
            (out / "stdout.txt").write_text(proc.stdout)
            assert proc.returncode == 0, f"benchmark smoke run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert "round trips counted" in (out / "stdout.txt").read_text(), "the run prints its progress"
    return json.loads((out / "results.json").read_text()), out


def test_outputs_written(smoke: tuple[dict[str, Any], Path]) -> None:
    results, out = smoke
    text = (out / "results.md").read_text()
    headings = ("Per-test time", "Round trips per test", "Async engines", "Hot path", "Whole suite", "no database")
    for heading in (*headings, "Provisioning"):
        assert heading in text
    machine = results["meta"]["machine"]
    assert machine["nproc"] >= 1 and machine["postgresql"] and machine["sqlalchemy"]
    assert {t["target"] for t in results["targets"]}, "the targets are reported"
    assert all(isinstance(t["met"], bool) for t in results["targets"])


def test_paired_timings_are_sane(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    (size,) = results["timing"]
    for body in BODIES:
        cell = results["timing"][size][body]
        assert set(cell) == set(STRATEGIES)
        for key, entry in cell.items():
            assert _finite_positive(entry["ms"]["mean"]), (body, key)
            assert entry["rounds"] >= 2
            assert entry["ms"]["min"] <= entry["ms"]["mean"] <= entry["ms"]["max"]
            assert entry["ms"]["ci95"] >= 0
            for ref in ("none", "recipe", "sa_rollback"):
                if key != ref:
                    assert math.isfinite(entry[f"vs_{ref}"]["diff"]["mean"]), (body, key, ref)


def test_round_trips_are_exact_counts(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    (size,) = results["round_trips"]
    trips = results["round_trips"][size]
    for body in BODIES:
        for key in STRATEGIES:
            entry = trips[body][key]
            # Every test of the run is counted, one exact integer each.
            assert len(entry["per_test"]) == entry["tests"] >= 6, (body, key)
            assert all(isinstance(n, int) for n in entry["per_test"]), (body, key)
            assert entry["mean"] == sum(entry["per_test"]) / entry["tests"]
            assert entry["max"] == max(entry["per_test"])
            if body != "nodb":
                assert entry["min"] > 0, (body, key)
    # No database touched: the transactional strategies send nothing; TRUNCATE still truncates.
    assert trips["nodb"]["none"]["max"] == 0
    assert trips["nodb"]["sa_rollback"]["max"] == 0
    assert trips["nodb"]["truncate"]["min"] > 0
    sar = trips["write"]["sa_rollback"]
    assert len(sar["statements"]) == sar["min"]
    assert len(sar["statements_max"]) == sar["max"]
    assert any(s.startswith("INSERT") for s in sar["statements"])


def test_leftovers_show_what_isolates(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    (left,) = results["rows_left"].values()
    assert left["none"] > 0, "the leaky baseline keeps the rows it committed"
    for key in ("recipe", "sa_rollback", "truncate", "drop_create", "template_db"):
        assert left[key] == 0, key


def test_async_rows_are_paired_and_counted(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    section = results["async"]
    assert tuple(section["groups"]) == ASYNC_GROUPS
    for name, group in section["groups"].items():
        timing, trips = group["timing"], group["round_trips"]
        for key in ASYNC_STRATEGIES:
            entry = timing[key]
            assert entry["rounds"] == section["rounds"] >= 2, (name, key)
            for clock in ("wall_ms", "cpu_ms"):
                assert _finite_positive(entry[clock]["mean"]), (name, key, clock)
                assert entry[clock]["n"] == entry["rounds"]
                for ref in ("none", "recipe", "sa_rollback"):
                    if key != ref:
                        assert math.isfinite(entry[f"vs_{ref}"][clock]["mean"]), (name, key, ref)
            count = trips[key]
            assert len(count["per_test"]) == count["tests"] == section["counted_tests"], (name, key)
            assert all(isinstance(n, int) and n > 0 for n in count["per_test"]), (name, key)
            # A loop per test gets a new connection per test, for every strategy; a shared loop none. Except
            # sa_rollback on psycopg async: it runs on the sync shared connection, which no loop owns.
            shared = name.startswith("psycopg/") and key == "sa_rollback"
            fresh = group["style"] == "fresh" and not shared
            assert count["connections_opened_mean"] == (1 if fresh else 0), (name, key)
        # Only the baseline leaks; the rows are cleaned after each group.
        assert timing["rows_left"]["none"] > 0, name
        assert all(timing["rows_left"][key] == 0 for key in ASYNC_STRATEGIES[1:]), name
        statements = trips["sa_rollback"]["statements"]
        assert statements[0] == "BEGIN" and any("INSERT" in s for s in statements), (name, statements)
        assert "ROLLBACK" in statements[-1], (name, statements)
    assert any("async overhead" in t["target"] for t in results["targets"])


def test_asyncpg_tap_counts_what_the_driver_sends(tmp_path: Path) -> None:
    """asyncpg has no libpq trace: the socket tap must see every round trip, a prepare's Flush included."""
    asyncpg = pytest.importorskip("asyncpg")
    from benchmarks.roundtrips import tracing

    async def run() -> list[tuple[int, list[str]]]:
        windows = []
        with tracing(tmp_path) as tracer:
            conn = await asyncpg.connect(libpq_dsn(make_url(ADMIN_URL).database or "postgres"))
            try:
                for step in (
                    lambda: conn.execute("SELECT 1"),  # a simple query: one Query message
                    lambda: conn.fetchval("SELECT $1::int + 1", 1),  # prepare (Flush), then bind and run (Sync)
                    lambda: conn.fetchval("SELECT $1::int + 1", 2),  # the statement is cached: one Sync
                ):
                    mark = tracer.mark()
                    await step()
                    window = tracer.since(mark)
                    windows.append((window.round_trips, window.statements))
            finally:
                await conn.close()
        return windows

    simple, first, cached = asyncio.run(run())
    assert simple == (1, ["SELECT 1"])
    assert first[0] == 2 and first[1][0].startswith("(prepare) SELECT $1::int + 1"), first
    assert cached == (1, ["SELECT $1::int + 1"])


def test_hot_path_is_measured_and_counted(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    hot = results["hot_path"]
    for driver in ("psycopg", "psycopg2"):
        entry = hot["drivers"][driver]
        calls = entry["checkout"]["calls"]
        # Exact counts: outside a scope the listeners return at once; inside, the plugin's code runs.
        assert calls["outside"]["sa_rollback_calls"] < calls["in_scope"]["sa_rollback_calls"]
        assert calls["in_scope"]["sa_rollback_calls"] < calls["before_first_statement"]["sa_rollback_calls"]
        for stat in (entry["checkout"]["in_scope"]["plugin_us"], entry["statement"]["dbapi"]["plugin_us"]):
            assert math.isfinite(stat["mean"]) and stat["n"] >= 2
        assert entry["statement"]["dbapi"]["extra_calls"] > 0
        assert _finite_positive(entry["liveness"]["dead_us"]["n"])
    nodb = hot["nodb_test"]
    assert nodb["pairs"] >= 50 and math.isfinite(nodb["plugin_us"]["mean"])
    assert nodb["moved_hooks"], "the plugin's per-test hooks were found and switched"
    assert nodb["plugin_calls"]["mean"] > 0 and nodb["calls_on"]["mean"] > nodb["calls_off"]["mean"]


def test_compare_revs_on_two_copies_of_this_tree(tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    script = REPO / "benchmarks" / "compare_revs.py"
    options = ["--url", ADMIN_URL, "--tag", f"cmp_{RUN_ID}", "--rounds", "2", "--tests", "2", "--count", "6"]
    options += ["--pytest-nodb", "1"]
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), str(REPO), *options, "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"compare_revs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "| write |" in proc.stdout and "| read |" in proc.stdout
    result = json.loads(out.read_text())
    for body in ("write", "read"):
        entry = result["bodies"][body]
        assert entry["cpu"]["b_minus_a_us"]["n"] == 2
        # The same code on both sides sends the same statements.
        assert entry["round_trips"]["a"]["per_test"] == entry["round_trips"]["b"]["per_test"]
        assert len(entry["round_trips"]["a"]["per_test"]) == 6 and entry["round_trips"]["a"]["min"] > 0
    # The pytest-level comparison ran a suite of tests that touch no database on each side.
    assert result["pytest_nodb"]["pairs"] == 1 and result["pytest_nodb"]["b_minus_a_us"]["n"] == 1
    assert "pytest, 2000 tests that touch no database" in proc.stdout
    with psycopg.connect(libpq_dsn(make_url(ADMIN_URL).database or "postgres"), autocommit=True) as conn:
        left = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", ("sa\\_rollback\\_bench\\_smokecmp\\_%",)
        ).fetchall()
    assert left == []


def test_a_test_in_a_data_scope_sends_the_round_trips_of_a_top_level_one(tmp_path: Path) -> None:
    """Its SAVEPOINT replaces the BEGIN; psycopg's prepared statements cost no round trip of their own."""
    out = tmp_path / "nested.json"
    script = REPO / "benchmarks" / "compare_revs.py"
    options = ["--url", ADMIN_URL, "--tag", f"nest_{RUN_ID}", "--rounds", "1", "--tests", "2", "--count", "12"]
    proc = subprocess.run(
        [sys.executable, str(script), str(REPO), str(REPO), *options, "--b-in-data-scope", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"compare_revs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(out.read_text())
    assert result["b_in_data_scope"]
    for body, trips in (("write", 5), ("read", 4)):
        counted = result["bodies"][body]["round_trips"]
        assert counted["a"]["per_test"] == counted["b"]["per_test"] == [trips] * 12


def test_suites_and_costs_are_measured(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    for key, entry in results["suites"]["strategies"].items():
        assert _finite_positive(entry["wall_s_serial"]["mean"]), key
    for key in ("pytest", "pytest_lean"):
        pytest_level = results["nodb"][key]
        assert _finite_positive(pytest_level["plain_us_per_test"]["mean"]), key
        assert _finite_positive(pytest_level["plugin_us_per_test"]["mean"]), key
    assert _finite_positive(results["nodb"]["core"]["scope_us"]["mean"])
    for entry in results["provisioning"]["databases"].values():
        assert _finite_positive(entry["clone_from_template_ms"]["mean"])
        assert _finite_positive(entry["create_all_ms"]["mean"])


def test_databases_cleaned_up(smoke: tuple[dict[str, Any], Path]) -> None:
    dsn = libpq_dsn(make_url(ADMIN_URL).database or "postgres")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"sa\\_rollback\\_bench\\_{TAG}\\_%",)
        ).fetchall()
    assert rows == []


def test_nodb_revs_times_two_copies_of_this_tree() -> None:
    """``benchmarks.nodb_revs`` on two directory copies (subpackages included) of this tree."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.nodb_revs", str(REPO), str(REPO), "--runs", "2", "--tests", "60"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and lines[2].startswith(f"{REPO} - {REPO}: "), proc.stdout
    assert all(" us per test" in line for line in lines), proc.stdout
