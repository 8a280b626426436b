"""A small run of the benchmark package, so that it cannot rot.

It runs ``python -m benchmarks --smoke`` in a subprocess (sa_rollback's
listeners are process-wide) on databases of its own, named after the run, and
checks the shape and sanity of what it wrote. It checks no speed: the benchmark
measures, it does not judge. An unreachable server makes it fail, like the rest
of the suite.
"""

from __future__ import annotations

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
    for heading in ("Per-test time", "Round trips per test", "Whole suite", "no database", "Provisioning"):
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
            assert _finite_positive(entry["ms"]["median"]), (body, key)
            assert entry["rounds"] >= 2
            assert entry["ms"]["p25"] <= entry["ms"]["median"] <= entry["ms"]["p75"]
            if key != "none":
                assert math.isfinite(entry["vs_none"]["diff"]["median"])
                assert _finite_positive(entry["vs_none"]["ratio"]["median"])


def test_round_trips_are_exact_counts(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    (size,) = results["round_trips"]
    trips = results["round_trips"][size]
    for body in ("write", "read"):
        for key in STRATEGIES:
            count = trips[body][key]["round_trips"]
            assert isinstance(count, int) and count > 0, (body, key, count)
    for key in STRATEGIES:
        assert isinstance(trips["nodb"][key]["round_trips"], int)
    # No database touched: the transactional strategies send nothing; TRUNCATE still truncates.
    assert trips["nodb"]["none"]["round_trips"] == 0
    assert trips["nodb"]["sa_rollback"]["round_trips"] == 0
    assert trips["nodb"]["truncate"]["round_trips"] > 0
    statements = trips["write"]["sa_rollback"]["statements"]
    assert len(statements) == trips["write"]["sa_rollback"]["round_trips"]
    assert any(s.startswith("INSERT") for s in statements)


def test_leftovers_show_what_isolates(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    (left,) = results["rows_left"].values()
    assert left["none"] > 0, "the leaky baseline keeps the rows it committed"
    for key in ("recipe", "sa_rollback", "truncate", "drop_create", "template_db"):
        assert left[key] == 0, key


def test_suites_and_costs_are_measured(smoke: tuple[dict[str, Any], Path]) -> None:
    results, _ = smoke
    for key, entry in results["suites"]["strategies"].items():
        assert _finite_positive(entry["wall_s_serial"]["median"]), key
    for key in ("pytest", "pytest_lean"):
        pytest_level = results["nodb"][key]
        assert _finite_positive(pytest_level["plain_us_per_test"]["median"]), key
        assert _finite_positive(pytest_level["plugin_us_per_test"]["median"]), key
    assert _finite_positive(results["nodb"]["core"]["scope_us"]["median"])
    for entry in results["provisioning"]["databases"].values():
        assert _finite_positive(entry["clone_from_template_ms"]["median"])
        assert _finite_positive(entry["create_all_ms"]["median"])


def test_databases_cleaned_up(smoke: tuple[dict[str, Any], Path]) -> None:
    dsn = libpq_dsn(make_url(ADMIN_URL).database or "postgres")
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"sa\\_rollback\\_bench\\_{TAG}\\_%",)
        ).fetchall()
    assert rows == []
