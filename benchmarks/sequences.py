"""What ``reset_sequences`` costs a test: paired against the same test without it, and against TRUNCATE.

One command reproduces the figures::

    python -m benchmarks.sequences                      # 5, 20 and 100 tables
    python -m benchmarks.sequences --url postgresql://postgres@127.0.0.1:5436/postgres --rounds 200

For each schema size it makes a database of N tables with a ``serial`` key
(``sa_rollback_bench_seq_N`` and ``..._N_b``, dropped at the end) and times, per test:

* ``write``: one ``INSERT`` through an engine, committed (one sequence moves);
* ``read``: one ``SELECT`` (no sequence moves);

each inside ``rollback_scope()`` (A) and ``rollback_scope(reset_sequences=True)`` (B),
alternating A and B in one loop, so that both see the same machine. The
paired difference B - A is what the setting costs in a suite where every test
resets sequences. B runs on a second, identical database, so that A's frames,
which move its sequences, never come between two B's. C is B on A's database,
always right after an A: what a test that resets sequences costs after one
that does not (it must read every position anew). ``truncate`` is the
Django-style alternative: the same insert without a scope, then ``TRUNCATE``
of every table ``RESTART IDENTITY``. Means in milliseconds; it measures, it
asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import psycopg
import sqlalchemy as sa
from psycopg import sql

import sa_rollback

DEFAULT_URL = os.environ.get("SA_ROLLBACK_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _dsn(url: sa.URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def make_database(admin: sa.URL, name: str, tables: int) -> sa.URL:
    with psycopg.connect(_dsn(admin), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = admin.set(database=name)
    with psycopg.connect(_dsn(url), autocommit=True) as conn:
        conn.execute("; ".join(f"CREATE TABLE t{i} (id serial PRIMARY KEY, x int)" for i in range(tables)))
    return url


def drop_database(admin: sa.URL, name: str) -> None:
    with psycopg.connect(_dsn(admin), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _timed(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1000.0


def measure(urls: tuple[sa.URL, sa.URL], tables: int, rounds: int, truncate_rounds: int) -> dict[str, float]:
    """A and C run on the first database, B on the second, so that A's frames never come between two B's."""
    engines = [sa.create_engine(url) for url in urls]
    insert = sa.text("INSERT INTO t0 (x) VALUES (1)")
    select = sa.text("SELECT count(*) FROM t0")

    def write(engine: sa.Engine) -> None:
        with engine.begin() as conn:
            conn.execute(insert)

    def read(engine: sa.Engine) -> None:
        with engine.connect() as conn:
            conn.execute(select).scalar()

    def scoped(body: Callable[[sa.Engine], None], engine: sa.Engine, reset: bool) -> Callable[[], None]:
        def run() -> None:
            with sa_rollback.rollback_scope(reset_sequences=reset):
                body(engine)

        return run

    out: dict[str, float] = {}
    for name, body in (("write", write), ("read", read)):
        plain = scoped(body, engines[0], False)
        resetting = scoped(body, engines[1], True)
        after_plain = scoped(body, engines[0], True)
        for _ in range(20):  # warm up: connections, plans
            plain()
            resetting()
            after_plain()
        a: list[float] = []
        b: list[float] = []
        c: list[float] = []
        for i in range(rounds):
            # C always right after A, on A's database: it finds no positions it can reuse
            if i % 2:
                a.append(_timed(plain))
                c.append(_timed(after_plain))
                b.append(_timed(resetting))
            else:
                b.append(_timed(resetting))
                a.append(_timed(plain))
                c.append(_timed(after_plain))
        out[f"{name}_a"] = statistics.fmean(a)
        out[f"{name}_b"] = statistics.fmean(b)
        out[f"{name}_delta"] = statistics.fmean(y - x for x, y in zip(a, b))
        out[f"{name}_delta_median"] = statistics.median(y - x for x, y in zip(a, b))
        out[f"{name}_mixed_delta"] = statistics.fmean(y - x for x, y in zip(a, c))
        out[f"{name}_mixed_delta_median"] = statistics.median(y - x for x, y in zip(a, c))
    truncate = sa.text("TRUNCATE " + ", ".join(f"t{i}" for i in range(tables)) + " RESTART IDENTITY")

    def truncating() -> None:
        write(engines[0])
        with engines[0].begin() as conn:
            conn.execute(truncate)

    truncating()
    out["truncate"] = statistics.fmean(_timed(truncating) for _ in range(truncate_rounds))
    for engine in engines:
        engine.dispose()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="server (its database is only used to connect)")
    parser.add_argument("--driver", default="psycopg", choices=("psycopg", "psycopg2"))
    parser.add_argument("--tables", default="5,20,100")
    parser.add_argument("--rounds", type=int, default=400, help="rounds of A, B and C per body and size")
    parser.add_argument("--truncate-rounds", type=int, default=40)
    args = parser.parse_args(argv)
    admin = sa.make_url(args.url)
    print(f"reset_sequences, per test, means in ms ({args.driver}, {args.rounds} rounds):")
    print(
        "| tables | write: A | write: B | B - A (median) | read: B - A (median) "
        "| write: C - A (median) | read: C - A (median) | TRUNCATE ... RESTART IDENTITY |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for tables in (int(n) for n in args.tables.split(",")):
        names = [f"sa_rollback_bench_seq_{tables}", f"sa_rollback_bench_seq_{tables}_b"]
        try:
            urls = [make_database(admin, name, tables).set(drivername=f"postgresql+{args.driver}") for name in names]
            r = measure((urls[0], urls[1]), tables, args.rounds, args.truncate_rounds)
        finally:
            for name in names:
                drop_database(admin, name)
        print(
            f"| {tables} | {r['write_a']:.3f} | {r['write_b']:.3f} | {r['write_delta']:.3f} "
            f"({r['write_delta_median']:.3f}) | {r['read_delta']:.3f} ({r['read_delta_median']:.3f}) "
            f"| {r['write_mixed_delta']:.3f} ({r['write_mixed_delta_median']:.3f}) "
            f"| {r['read_mixed_delta']:.3f} ({r['read_mixed_delta_median']:.3f}) "
            f"| {r['truncate']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
