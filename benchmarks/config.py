"""What a run measures: the presets of ``--quick``, ``--smoke`` and the full run."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from sqlalchemy.engine import URL, make_url

#: Every database the benchmark creates starts with this; it never touches any other one.
DB_PREFIX = "sa_rollback_bench_"
DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
URL_ENV = "SA_ROLLBACK_BENCH_URL"

#: The six isolation strategies, in report order.
STRATEGIES: tuple[str, ...] = ("none", "recipe", "sa_rollback", "truncate", "drop_create", "template_db")
LABELS: dict[str, str] = {
    "none": "1. no isolation",
    "recipe": "2. SQLAlchemy recipe",
    "sa_rollback": "3. sa_rollback",
    "truncate": "4. TRUNCATE",
    "drop_create": "5. drop_all/create_all",
    "template_db": "6. database from template",
    "sa_rollback_auto": "3'. sa_rollback, plugin clones per worker",
}
#: the strategies every other one is compared with, by paired differences
REFERENCES: tuple[str, ...] = ("none", "recipe", "sa_rollback")
#: Cheap enough to run hundreds of times per cell; the others get fewer paired rounds.
CHEAP: tuple[str, ...] = ("none", "recipe", "sa_rollback")
COSTLY: tuple[str, ...] = ("truncate", "drop_create", "template_db")

BODIES: tuple[str, ...] = ("write", "read", "nodb")
BODY_LABELS: dict[str, str] = {
    "write": "(a) insert 10 + commit + select",
    "read": "(b) read-only",
    "nodb": "(c) no database",
}


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run does."""

    mode: str
    sizes: tuple[int, ...]
    cheap_rounds: int
    #: rounds of the costly strategies, per schema size
    costly_rounds: dict[int, int]
    warmup: int
    #: tests counted per strategy and body (after a first one that opens the connections), every one of them
    count_tests: int
    suite_size: int
    suite_table_count: int
    suite_reps: int
    suite_strategies: tuple[str, ...]
    suite_workers: tuple[int, ...]
    nodb_tests: int
    nodb_reps: int
    #: runs of the lower-noise variant (capture and logging off)
    nodb_lean_reps: int
    core_iterations: int
    core_reps: int
    provision_sizes: tuple[int, ...]
    provision_reps: int
    embedded_server: bool
    #: hot path: iterations per block, rounds of paired blocks, tests of the no-database run, pairs profiled
    hot_iterations: int = 400
    hot_rounds: int = 30
    hot_nodb_tests: int = 20000
    hot_profiled_pairs: int = 50
    psycopg2_counts: bool = True
    #: async section: tables of the schema, tests per block, rounds of the cheap strategies' blocks, rounds
    #: of every strategy's blocks (TRUNCATE's figures), tests whose round trips are counted
    aio_tables: int = 5
    aio_tests: int = 15
    aio_rounds: int = 12
    aio_costly_rounds: int = 6
    aio_count: int = 10
    strategies: tuple[str, ...] = field(default=STRATEGIES)


PLANS: dict[str, Plan] = {
    "full": Plan(
        mode="full",
        sizes=(5, 20, 100),
        cheap_rounds=400,
        costly_rounds={5: 30, 20: 20, 100: 10},
        warmup=20,
        count_tests=30,
        suite_size=600,
        suite_table_count=20,
        suite_reps=3,
        suite_strategies=("none", "recipe", "sa_rollback", "truncate", "sa_rollback_auto"),
        suite_workers=(0, 2),
        nodb_tests=2000,
        nodb_reps=8,
        nodb_lean_reps=16,
        core_iterations=20000,
        core_reps=7,
        provision_sizes=(20, 100),
        provision_reps=5,
        embedded_server=True,
    ),
    "quick": Plan(
        mode="quick",
        sizes=(5, 20),
        cheap_rounds=60,
        costly_rounds={5: 3, 20: 3},
        warmup=5,
        count_tests=12,
        suite_size=100,
        suite_table_count=20,
        suite_reps=1,
        suite_strategies=("none", "sa_rollback"),
        suite_workers=(0, 2),
        nodb_tests=500,
        nodb_reps=1,
        nodb_lean_reps=1,
        core_iterations=5000,
        core_reps=3,
        provision_sizes=(20,),
        provision_reps=1,
        embedded_server=False,
        hot_iterations=200,
        hot_rounds=10,
        hot_nodb_tests=2000,
        hot_profiled_pairs=20,
        psycopg2_counts=False,
        aio_tests=10,
        aio_rounds=6,
        aio_costly_rounds=2,
        aio_count=6,
    ),
    "smoke": Plan(
        mode="smoke",
        sizes=(5,),
        cheap_rounds=12,
        costly_rounds={5: 2},
        warmup=2,
        count_tests=6,
        suite_size=12,
        suite_table_count=5,
        suite_reps=1,
        suite_strategies=("none", "sa_rollback"),
        suite_workers=(0,),
        nodb_tests=50,
        nodb_reps=1,
        nodb_lean_reps=1,
        core_iterations=1000,
        core_reps=2,
        provision_sizes=(5,),
        provision_reps=1,
        embedded_server=False,
        hot_iterations=50,
        hot_rounds=3,
        hot_nodb_tests=200,
        hot_profiled_pairs=5,
        psycopg2_counts=False,
        aio_tests=3,
        aio_rounds=2,
        aio_costly_rounds=2,
        aio_count=3,
    ),
}


def server_url(override: str | None = None) -> URL:
    """The admin URL (any database on the server; the benchmark only creates its own)."""
    raw = override or os.environ.get(URL_ENV) or DEFAULT_URL
    url = make_url(raw)
    if url.drivername in ("postgresql", "postgresql+psycopg2"):
        # Round trips are counted through psycopg 3's libpq trace; timing uses the same driver.
        url = url.set(drivername="postgresql+psycopg")
    return url


_tag = ""


def set_tag(tag: str) -> None:
    """Put ``tag`` into every database name, so that concurrent runs (a smoke test, say) never collide."""
    global _tag
    if tag and not tag.replace("_", "").isalnum():
        raise ValueError(f"the tag {tag!r} must be letters, digits and underscores")
    _tag = f"{tag.lower()}_" if tag else ""


def db(name: str) -> str:
    """The name of one of the benchmark's databases."""
    return check_name(f"{DB_PREFIX}{_tag}{name}")


def check_name(name: str) -> str:
    """Refuse to create or drop a database that is not the benchmark's own."""
    if not name.startswith(DB_PREFIX) or not name.replace("_", "").isalnum() or len(name) > 63:
        raise ValueError(f"refusing to touch database {name!r}: the benchmark only owns {DB_PREFIX}*")
    return name
