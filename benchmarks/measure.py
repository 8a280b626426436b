"""In-process measurements: paired interleaved timings, round trips, leftovers, core cost."""

from __future__ import annotations

import gc
import tempfile
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import sa_rollback

from .bodies import BODY_FUNCS, Body
from .config import BODIES, CHEAP, REFERENCES, Plan
from .db import Admin
from .roundtrips import Window, tracing
from .schema import Schema, make_schema
from .stats import paired, summary
from .strategies import STRATEGY_CLASSES, Strategy, provision_all

Progress = Callable[[str], None]


def run_one(strategy: Strategy, body: Body, schema: Schema) -> int:
    """One test: the strategy's setup, the body, the strategy's teardown; nanoseconds."""
    start = time.perf_counter_ns()
    with strategy.test() as new_session:
        body(new_session, schema)
    return time.perf_counter_ns() - start


def time_rounds(
    strategies: dict[str, Strategy], keys: tuple[str, ...], body: Body, schema: Schema, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Each round runs one test of every strategy; the order rotates from round to round.

    Rotation puts every strategy in every position equally often, so that
    neither a warm cache nor a background burst favours one of them.
    """
    for _ in range(warmup):
        for key in keys:
            run_one(strategies[key], body, schema)
    gc.collect()
    times: dict[str, list[float]] = {key: [] for key in keys}
    n = len(keys)
    for r in range(rounds):
        for i in range(n):
            key = keys[(r + i) % n]
            times[key].append(run_one(strategies[key], body, schema) / 1e6)
    return times


def cell_stats(times: dict[str, list[float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, samples in times.items():
        entry: dict[str, Any] = {"ms": summary(samples)}
        for ref in REFERENCES:
            if ref in times and ref != key:
                entry[f"vs_{ref}"] = paired(samples, times[ref])
        out[key] = entry
    return out


def count_round_trips(
    admin: Admin, schema: Schema, keys: tuple[str, ...], tests: int, driver: str = "psycopg"
) -> dict[str, dict[str, Any]]:
    """Round trips of every test of a run of ``tests`` tests, per strategy and body.

    Each strategy gets a new engine; its first test opens the connections and is
    counted apart (``first_test``). The ``tests`` tests after it are all counted:
    the mean and the maximum, not a median, so that a test that costs more every
    few runs (a driver preparing a statement, then deallocating it) shows.
    """
    counts: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_trace_") as tmp:
        for body_key in BODIES:
            body = BODY_FUNCS[body_key]
            per_body: dict[str, Any] = {}
            for key in keys:
                with tracing(Path(tmp) / f"{driver}_{body_key}_{key}") as tracer:
                    tracer.directory.mkdir()
                    # A new engine, so that the tracer sees its connections from the start.
                    strategy = STRATEGY_CLASSES[key](admin, schema, driver)
                    strategy.open()
                    tracer.attach(admin.conn)
                    try:
                        windows: list[Window] = []
                        for _ in range(1 + tests):
                            mark = tracer.mark()
                            run_one(strategy, body, schema)
                            windows.append(tracer.since(mark))
                    finally:
                        strategy.close()
                per_body[key] = trip_counts(windows[0], windows[1:])
            counts[body_key] = per_body
    return counts


def trip_counts(first: Window, windows: list[Window]) -> dict[str, Any]:
    """Exact round-trip figures of a run of tests: every count, their mean and maximum, and what was sent."""
    trips = [w.round_trips for w in windows]
    # The statements of the first test with the fewest and of the first with the most round trips.
    fewest = min(windows, key=lambda w: w.round_trips)
    most = max(windows, key=lambda w: w.round_trips)
    return {
        "tests": len(trips),
        "mean": sum(trips) / len(trips),
        "min": min(trips),
        "max": max(trips),
        "per_test": trips,
        "first_test": first.round_trips,
        "connections_opened_mean": sum(w.new_connections for w in windows) / len(windows),
        "statements": fewest.statements,
        "statements_max": most.statements,
    }


def core_scope_cost(iterations: int, reps: int) -> dict[str, Any]:
    """``rollback_scope()`` entered and left with no database touched, against an empty ``with``."""

    def loop(factory: Callable[[], AbstractContextManager[Any]]) -> float:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            with factory():
                pass
        return (time.perf_counter_ns() - start) / iterations / 1000

    scoped: list[float] = []
    empty: list[float] = []
    loop(sa_rollback.rollback_scope)
    for _ in range(reps):
        scoped.append(loop(sa_rollback.rollback_scope))
        empty.append(loop(nullcontext))
    return {
        "iterations": iterations,
        "scope_us": summary(scoped),
        "empty_with_us": summary(empty),
        "overhead_us": paired(scoped, empty)["diff"],
    }


def run_matrix(admin: Admin, plan: Plan, progress: Progress) -> dict[str, Any]:
    """Paired timings, leftovers and round trips for every schema size and body."""
    results: dict[str, Any] = {"timing": {}, "round_trips": {}, "rows_left": {}}
    keys = plan.strategies
    cheap = tuple(k for k in keys if k in CHEAP)
    for size in plan.sizes:
        schema = make_schema(size)
        started = time.perf_counter()
        provision_all(admin, schema, keys)
        progress(f"size {size}: template and {len(keys)} databases built in {time.perf_counter() - started:.1f} s")
        strategies = {key: STRATEGY_CLASSES[key](admin, schema) for key in keys}
        for strategy in strategies.values():
            strategy.open()
        timing: dict[str, Any] = {}
        try:
            for body_key in BODIES:
                body = BODY_FUNCS[body_key]
                started = time.perf_counter()
                cheap_times = time_rounds(strategies, cheap, body, schema, plan.cheap_rounds, plan.warmup)
                costly_rounds = plan.costly_rounds.get(size, 2)
                all_times = time_rounds(strategies, keys, body, schema, costly_rounds, 1)
                if body_key == "write":
                    results["rows_left"][str(size)] = {key: s.rows_left() for key, s in strategies.items()}
                    for strategy in strategies.values():
                        strategy.clean()
                cheap_stats = cell_stats(cheap_times)
                all_stats = cell_stats(all_times)
                merged = {key: cheap_stats.get(key, all_stats[key]) for key in keys}
                for key in keys:
                    merged[key] = dict(merged[key], rounds=len((cheap_times if key in cheap_stats else all_times)[key]))
                timing[body_key] = merged
                progress(
                    f"size {size} body {body_key}: {plan.cheap_rounds} cheap + {costly_rounds} full rounds in "
                    f"{time.perf_counter() - started:.1f} s; " + _headline(merged)
                )
        finally:
            for strategy in strategies.values():
                strategy.close()
        results["timing"][str(size)] = timing
        started = time.perf_counter()
        results["round_trips"][str(size)] = count_round_trips(admin, schema, keys, plan.count_tests)
        progress(f"size {size}: round trips counted in {time.perf_counter() - started:.1f} s; " + _trips(results, size))
    if plan.psycopg2_counts:
        schema = make_schema(plan.sizes[0])
        provision_all(admin, schema, cheap)
        results["round_trips_psycopg2"] = {
            str(schema.size): count_round_trips(admin, schema, cheap, plan.count_tests, driver="psycopg2")
        }
        progress("psycopg2 round trips: " + _trips({"round_trips": results["round_trips_psycopg2"]}, schema.size))
    return results


def _headline(stats: dict[str, Any]) -> str:
    parts = []
    for key, entry in stats.items():
        if key == "none":
            parts.append(f"none {entry['ms']['mean']:.2f} ms")
        else:
            parts.append(f"{key} {entry['vs_none']['diff']['mean']:+.2f}")
    return ", ".join(parts)


def _trips(results: dict[str, Any], size: int) -> str:
    write = results["round_trips"][str(size)]["write"]
    return "body (a), mean (max): " + ", ".join(
        f"{key} {entry['mean']:.2f} ({entry['max']})" for key, entry in write.items()
    )
