"""What the outside-connection check adds to a test's rollback, and what an unrequested sa_queries costs.

    python scripts/outside_check_cost.py                      # both drivers, 127.0.0.1:5432
    python scripts/outside_check_cost.py --url postgresql://user@host/postgres --rounds 9

Creates a scratch database, then times read-only rollback scopes (one ``SELECT 1`` each, the
cheapest test there is) with the check off and on, alternating in rounds so that load on the
machine falls on both alike. Prints the median per scope, the round trips per scope, and the cost
of the one attribute read that sa_queries adds to each statement when nobody asked for it.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import sqlalchemy as sa

import sa_rollback
from sa_rollback import _queries
from sa_rollback._outside import OUTSIDE
from sa_rollback._state import STATE
from sa_rollback._stats import STATS
from sa_rollback.databases import Janitor, Mark


def per_scope(engine: sa.Engine, scopes: int) -> float:
    """Median seconds of one read-only scope."""
    times = []
    for _ in range(scopes):
        started = time.perf_counter()
        with sa_rollback.RollbackScope(check_deferred=False), engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(url: sa.URL, rounds: int, scopes: int) -> None:
    database = str(url.database)
    engine = sa.create_engine(url)
    per_scope(engine, 200)  # warm up: connections, statement caches
    off: list[float] = []
    on: list[float] = []
    for _ in range(rounds):
        OUTSIDE.watch(None)
        off.append(per_scope(engine, scopes))
        OUTSIDE.watch(lambda: (database,))
        on.append(per_scope(engine, scopes))
    STATS.reset()
    per_scope(engine, 100)
    trips = STATS.round_trips / 100
    OUTSIDE.watch(None)
    engine.dispose()
    STATE.close_all()
    added = (statistics.median(on) - statistics.median(off)) * 1e3
    print(
        f"{url.drivername}: off {statistics.median(off) * 1e3:.3f} ms, on {statistics.median(on) * 1e3:.3f} ms "
        f"per scope (+{added:.3f} ms); {trips:g} round trips of sa_rollback's own per scope with the check on"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="a server's admin URL")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--scopes", type=int, default=1000, help="scopes per round and setting")
    args = parser.parse_args()
    admin = sa.make_url(args.url)
    name = f"sa_rollback_outside_cost_{time.time_ns() % 10**8}"
    with Janitor(admin) as janitor:
        janitor.create(name, Mark("base"))
    try:
        for driver in ("psycopg", "psycopg2"):
            measure(admin.set(drivername=f"postgresql+{driver}", database=name), args.rounds, args.scopes)
    finally:
        with Janitor(admin) as janitor:
            janitor.drop(name)
    read = timeit.timeit("_queries.active is not None", globals={"_queries": _queries}, number=1_000_000)
    print(f"sa_queries unrequested: {read * 1e3:.0f} ns per statement (one module attribute read)")


if __name__ == "__main__":
    main()
