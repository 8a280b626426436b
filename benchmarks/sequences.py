"""What ``reset_sequences`` costs a test: paired against the same test without it, and against TRUNCATE.

One command reproduces the figures::

    python -m benchmarks.sequences                      # 5, 20 and 100 tables
    python -m benchmarks.sequences --url postgresql://postgres@127.0.0.1:5436/postgres --rounds 200

For each schema size it makes a database of N tables with a ``serial`` key
(``sa_rollback_bench_seq_N``, dropped at the end) and times, per test:

* ``write``: one ``INSERT`` through an engine, committed (one sequence moves);
* ``read``: one ``SELECT`` (no sequence moves);

each inside ``rollback_scope()`` (A) and ``rollback_scope(reset_sequences=True)`` (B),
alternating A and B in one loop, so that both see the same machine. The
paired difference B - A is what the setting costs. ``truncate`` is the
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


def measure(url: sa.URL, tables: int, rounds: int, truncate_rounds: int) -> dict[str, float]:
    engine = sa.create_engine(url)
    insert = sa.text("INSERT INTO t0 (x) VALUES (1)")
    select = sa.text("SELECT count(*) FROM t0")

    def write() -> None:
        with engine.begin() as conn:
            conn.execute(insert)

    def read() -> None:
        with engine.connect() as conn:
            conn.execute(select).scalar()

    def scoped(body: Callable[[], None], reset: bool) -> Callable[[], None]:
        def run() -> None:
            with sa_rollback.rollback_scope(reset_sequences=reset):
                body()

        return run

    out: dict[str, float] = {}
    for name, body in (("write", write), ("read", read)):
        plain, resetting = scoped(body, False), scoped(body, True)
        for _ in range(20):  # warm up: connections, plans
            plain()
            resetting()
        a: list[float] = []
        b: list[float] = []
        for i in range(rounds):
            if i % 2:
                a.append(_timed(plain))
                b.append(_timed(resetting))
            else:
                b.append(_timed(resetting))
                a.append(_timed(plain))
        out[f"{name}_a"] = statistics.fmean(a)
        out[f"{name}_b"] = statistics.fmean(b)
        out[f"{name}_delta"] = statistics.fmean(y - x for x, y in zip(a, b))
        out[f"{name}_delta_median"] = statistics.median(y - x for x, y in zip(a, b))
    truncate = sa.text("TRUNCATE " + ", ".join(f"t{i}" for i in range(tables)) + " RESTART IDENTITY")

    def truncating() -> None:
        write()
        with engine.begin() as conn:
            conn.execute(truncate)

    truncating()
    out["truncate"] = statistics.fmean(_timed(truncating) for _ in range(truncate_rounds))
    engine.dispose()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=DEFAULT_URL, help="server (its database is only used to connect)")
    parser.add_argument("--driver", default="psycopg", choices=("psycopg", "psycopg2"))
    parser.add_argument("--tables", default="5,20,100")
    parser.add_argument("--rounds", type=int, default=400, help="A/B pairs per body and size")
    parser.add_argument("--truncate-rounds", type=int, default=40)
    args = parser.parse_args(argv)
    admin = sa.make_url(args.url)
    print(f"reset_sequences, per test, means in ms ({args.driver}, {args.rounds} A/B pairs):")
    print("| tables | write: A | write: B | B - A (median) | read: B - A (median) | TRUNCATE ... RESTART IDENTITY |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for tables in (int(n) for n in args.tables.split(",")):
        name = f"sa_rollback_bench_seq_{tables}"
        url = make_database(admin, name, tables).set(drivername=f"postgresql+{args.driver}")
        try:
            r = measure(url, tables, args.rounds, args.truncate_rounds)
        finally:
            drop_database(admin, name)
        print(
            f"| {tables} | {r['write_a']:.3f} | {r['write_b']:.3f} | {r['write_delta']:.3f} "
            f"({r['write_delta_median']:.3f}) | {r['read_delta']:.3f} ({r['read_delta_median']:.3f}) "
            f"| {r['truncate']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
