"""Async engines: the request body under four strategies, on asyncpg and psycopg async, paired in one run.

``python -m benchmarks --only async`` runs only this section.

Groups: each async driver under a loop shared by all tests (pytest-asyncio's
module or session loop scope) and under a loop per test (its default function
scope), and the sync body on sync psycopg as the sync path's reference. Within
a group the design is the one of ``compare_revs`` and the hot path: a round
runs one block of ``aio_tests`` tests of every strategy, in an order that
rotates from round to round, and a difference between two strategies is taken
between their blocks of the same round, then averaged over the rounds (mean
and 95% confidence interval). Wall time, and CPU time of the thread that runs
the loop: the loop, the drivers and SQLAlchemy all run in it, so CPU time
leaves out only the network and server wait and the time other processes
hold the CPU.

Round trips are counted exactly for every test of a run of ``aio_count`` tests
per strategy, on new engines, after two warm-up tests (see
:mod:`.roundtrips`: libpq's trace for psycopg, a tap on the socket for asyncpg).
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Callable

import psycopg

from .aio_strategies import (
    AIO_CLASSES,
    AIO_DRIVERS,
    AIO_STRATEGIES,
    AsyncStrategy,
    SyncStrategy,
    aio_db_name,
    body_request,
    sync_body_request,
)
from .config import Plan, db
from .db import Admin, build_schema, libpq_dsn
from .measure import trip_counts
from .roundtrips import Window, tracing
from .schema import Schema, make_schema
from .stats import paired, summary

Progress = Callable[[str], None]
#: the strategies every other one is compared with
AIO_REFERENCES: tuple[str, ...] = ("none", "recipe", "sa_rollback")
#: timed in rounds of their own with every strategy, fewer of them (as in the sync matrix)
COSTLY: tuple[str, ...] = ("truncate",)
STYLES: dict[str, str] = {
    "shared": "one loop for all tests (module or session loop scope)",
    "fresh": "a loop per test (function loop scope)",
}
#: one block: (wall ns, CPU ns)
Took = tuple[int, int]


def _clock() -> Took:
    return time.perf_counter_ns(), time.thread_time_ns()


def _since(start: Took) -> Took:
    return time.perf_counter_ns() - start[0], time.thread_time_ns() - start[1]


async def _one_async(strategy: AsyncStrategy, schema: Schema, fresh: bool) -> None:
    async with strategy.test(fresh) as new_session:
        await body_request(new_session, schema)


def _one_fresh(strategy: AsyncStrategy, schema: Schema) -> None:
    """One test on a loop of its own, made and closed around it as pytest-asyncio does per test."""
    with strategy.outside_loop(), asyncio.Runner() as runner:
        runner.run(_one_async(strategy, schema, True))


def _one_sync(strategy: SyncStrategy, schema: Schema) -> None:
    with strategy.test() as new_session:
        sync_body_request(new_session, schema)


class Group:
    """How to run blocks and single tests of one group, and where its loop lives."""

    def __init__(self, admin: Admin, schema: Schema, driver: str, style: str):
        self.admin, self.schema, self.driver, self.style = admin, schema, driver, style
        self.runner: asyncio.Runner | None = None

    def make(self, key: str) -> Any:
        if self.driver == "sync":
            return SyncStrategy(self.admin, self.schema, key)
        return AIO_CLASSES[key](self.admin, self.schema, self.driver)

    @contextmanager
    def running(self, strategies: list[Any]) -> Iterator[None]:
        for strategy in strategies:
            strategy.open()
        if self.style == "shared":
            self.runner = asyncio.Runner()
        try:
            yield
        finally:
            if self.runner is not None:
                for strategy in strategies:
                    self.runner.run(strategy.dispose())
                # Closing the loop rolls back and closes sa_rollback's connection of this loop.
                self.runner.close()
                self.runner = None
            for strategy in strategies:
                if self.driver == "sync":
                    strategy.close()
                elif self.style == "fresh":
                    strategy.drop_engine()

    def block(self, strategy: Any, n: int) -> Took:
        schema = self.schema
        if self.driver == "sync":
            start = _clock()
            for _ in range(n):
                _one_sync(strategy, schema)
            return _since(start)
        if self.style == "fresh":
            start = _clock()
            for _ in range(n):
                _one_fresh(strategy, schema)
            return _since(start)

        async def run() -> Took:
            start = _clock()
            for _ in range(n):
                await _one_async(strategy, schema, False)
            return _since(start)

        assert self.runner is not None
        return self.runner.run(run())

    def one_counted(self, strategy: Any, count: Callable[[], AbstractContextManager[Any]]) -> None:
        """One test inside ``count()``, which marks the trace before it and reads it after."""
        if self.driver == "sync":
            with count():
                _one_sync(strategy, self.schema)
        elif self.style == "fresh":
            with count():
                _one_fresh(strategy, self.schema)
        else:

            async def run() -> None:
                with count():
                    await _one_async(strategy, self.schema, False)

            assert self.runner is not None
            self.runner.run(run())


def block_order(keys: tuple[str, ...], r: int) -> tuple[str, ...]:
    """The order of round ``r``: rotated by ``r``, and reversed every other cycle of rotations.

    Rotation alone puts every strategy in every position equally often, but
    always after the same neighbour; a block that follows a long, idle one
    (TRUNCATE waits tens of milliseconds per test) starts with cold caches.
    Reversing every other cycle makes each strategy follow each other one
    equally often (for three strategies, the six rounds of two cycles are the
    six orders).
    """
    n = len(keys)
    rotated = keys[r % n :] + keys[: r % n]
    return rotated[::-1] if (r // n) % 2 else rotated


def _paired_rounds(group: Group, strategies: dict[str, Any], keys: tuple[str, ...], tests: int, rounds: int) -> Any:
    wall: dict[str, list[float]] = {key: [] for key in keys}
    cpu: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in block_order(keys, r):
            gc.collect()
            took = group.block(strategies[key], tests)
            wall[key].append(took[0] / tests / 1e6)
            cpu[key].append(took[1] / tests / 1e6)
    out: dict[str, Any] = {}
    for key in keys:
        entry: dict[str, Any] = {"wall_ms": summary(wall[key]), "cpu_ms": summary(cpu[key]), "rounds": rounds}
        for ref in AIO_REFERENCES:
            if ref in keys and ref != key:
                entry[f"vs_{ref}"] = {
                    "wall_ms": paired(wall[key], wall[ref])["diff"],
                    "cpu_ms": paired(cpu[key], cpu[ref])["diff"],
                }
        out[key] = entry
    return out


def time_group(group: Group, keys: tuple[str, ...], tests: int, rounds: int, costly_rounds: int) -> dict[str, Any]:
    """Paired blocks, as the sync matrix does them: the cheap strategies among themselves for ``rounds``
    rounds, then all of them, TRUNCATE included, for ``costly_rounds`` rounds, where TRUNCATE's figures come
    from. TRUNCATE's blocks are a hundred times longer, and would weigh on whichever block follows them."""
    strategies = {key: group.make(key) for key in keys}
    cheap = tuple(key for key in keys if key not in COSTLY)
    with group.running(list(strategies.values())):
        for key in keys:
            group.block(strategies[key], max(2, tests // 4))  # warm-up: pools, caches, prepared statements
        out = _paired_rounds(group, strategies, cheap, tests, rounds)
        full = _paired_rounds(group, strategies, keys, tests, costly_rounds)
    for key in keys:
        if key not in out:
            out[key] = full[key]
    out = {key: out[key] for key in keys}
    out["rows_left"] = {key: s.rows_left() for key, s in strategies.items()}
    return out


def count_group(group: Group, keys: tuple[str, ...], tests: int) -> dict[str, Any]:
    """Round trips of every one of ``tests`` tests per strategy, on new engines, after two warm-up tests."""
    counts: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_aio_") as tmp:
        for key in keys:
            windows = _count_one(group, key, tests, Path(tmp) / f"{group.driver}_{group.style}_{key}")
            # The first test opens the engine's connections; the second can still prepare statements.
            counts[key] = trip_counts(windows[0], windows[2:])
    return counts


def _count_one(group: Group, key: str, tests: int, directory: Path) -> list[Window]:
    strategy = group.make(key)
    windows: list[Window] = []
    with tracing(directory) as tracer:
        directory.mkdir()
        tracer.attach(group.admin.conn)

        @contextmanager
        def count() -> Iterator[None]:
            mark = tracer.mark()
            yield
            windows.append(tracer.since(mark))

        with group.running([strategy]):
            for _ in range(2 + tests):
                group.one_counted(strategy, count)
    return windows


def _clean(admin: Admin, schema: Schema, key: str) -> None:
    with psycopg.connect(libpq_dsn(admin.db_url(aio_db_name(key))), autocommit=True) as conn:
        conn.execute(schema.truncate_sql())


def run_async(admin: Admin, plan: Plan, progress: Progress) -> dict[str, Any]:
    """Paired timings and exact round trips of every group; what the baseline left is cleaned after each."""
    from sa_rollback._state import STATE

    schema = make_schema(plan.aio_tables)
    template = db("aio_template")
    build_schema(admin, template, schema)
    for key in AIO_STRATEGIES:
        admin.recreate(aio_db_name(key), template)
    groups = [(driver, style) for style in STYLES for driver in AIO_DRIVERS] + [("sync", "sync")]
    results: dict[str, Any] = {
        "tables": plan.aio_tables,
        "tests_per_block": plan.aio_tests,
        "rounds": plan.aio_rounds,
        "costly_rounds": plan.aio_costly_rounds,
        "counted_tests": plan.aio_count,
        "groups": {},
    }
    try:
        for driver, style in groups:
            group = Group(admin, schema, driver, style)
            started = time.perf_counter()
            timing = time_group(group, AIO_STRATEGIES, plan.aio_tests, plan.aio_rounds, plan.aio_costly_rounds)
            _clean(admin, schema, "none")
            trips = count_group(group, AIO_STRATEGIES, plan.aio_count)
            _clean(admin, schema, "none")
            name = f"{driver}/{style}"
            results["groups"][name] = {"driver": driver, "style": style, "timing": timing, "round_trips": trips}
            sar = timing["sa_rollback"]
            progress(
                f"async {name}: {plan.aio_rounds} rounds of {plan.aio_tests} tests in "
                f"{time.perf_counter() - started:.1f} s; no isolation {timing['none']['wall_ms']['mean']:.2f} ms, "
                f"sa_rollback {sar['vs_none']['wall_ms']['mean']:+.3f} ms "
                f"(CPU {sar['vs_none']['cpu_ms']['mean']:+.3f}), "
                "round trips " + ", ".join(f"{k} {trips[k]['mean']:.2f}" for k in AIO_STRATEGIES)
            )
    finally:
        STATE.close_all()
    return results
