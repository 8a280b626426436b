"""Soak test: a generated suite of many tests, serial and under xdist, judged from outside.

    python scripts/soak.py --tests 10000            # the full soak (a few minutes)
    python scripts/soak.py --tests 200 --json out.json

Every generated test first checks, through the application's engine, that all
tables are empty (nothing leaked from the previous test), then does one kind
of database work that commits, rolls back, fails, nests or uses threads. Every
500 tests a sampler records, from a plain psycopg connection outside
SQLAlchemy, the rows committed for real, the process's resident memory and
the number of server connections to the test database. The script prints and
returns those figures; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

MODELS = """
import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(unique=True)
    balance: Mapped[int] = mapped_column(default=0)


class Entry(Base):
    __tablename__ = "entries"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(sa.ForeignKey("accounts.id"))
    amount: Mapped[int]


TABLES = ["accounts", "entries"]
"""

CONFTEST = """
import json
import os
import resource
import threading

import psycopg
import pytest

pytest_plugins = ["sa_rollback"]
_count = 0
EVERY = 500


def _sample(url, label):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    plain = url.replace("postgresql+psycopg://", "postgresql://").replace("postgresql+psycopg2://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        rows = conn.execute("SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM entries)").fetchone()[0]
        db = conn.execute("SELECT current_database()").fetchone()[0]
        backends = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,)
        ).fetchone()[0]
    rss_kb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
    line = {"worker": worker, "at": label, "committed_rows": rows, "backends": backends,
            "rss_kb": rss_kb, "threads": threading.active_count()}
    with open(os.path.join(os.environ["SOAK_OUT"], f"samples-{worker}.jsonl"), "a") as out:
        out.write(json.dumps(line) + "\\n")


@pytest.fixture(autouse=True)
def _sampler(request):
    global _count
    yield
    _count += 1
    if _count % EVERY == 0:
        _sample(request.getfixturevalue("sa_rollback_url"), _count)


def pytest_sessionfinish(session):
    from sa_rollback.plugin import databases_key

    provisioned = session.config.stash[databases_key].provisioned
    if _count and provisioned is not None:
        _sample(provisioned.url_string(), f"end:{_count}")
"""

APP = """
import threading

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from models import Account, Entry

_engine = None


def engine(url):
    global _engine
    if _engine is None:
        _engine = sa.create_engine(url)
    return _engine


def assert_empty(eng):
    with eng.connect() as conn:
        left = conn.execute(sa.text("SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM entries)"))
        assert left.scalar() == 0, "rows leaked from an earlier test"


def body(kind, eng, n):
    if kind == 0:  # ORM insert, commit, select
        with Session(eng) as s:
            s.add_all([Account(name=f"a{n}-{i}") for i in range(5)])
            s.commit()
            assert len(s.scalars(sa.select(Account)).all()) == 5
    elif kind == 1:  # rollback of uncommitted work
        with Session(eng) as s:
            s.add(Account(name="x"))
            s.commit()
            s.add(Account(name="y"))
            s.flush()
            s.rollback()
            assert s.scalar(sa.select(sa.func.count()).select_from(Account)) == 1
    elif kind == 2:  # an IntegrityError, handled, then more work
        with Session(eng) as s:
            s.add(Account(name="dup"))
            s.commit()
            s.add(Account(name="dup"))
            try:
                s.commit()
            except sa.exc.IntegrityError:
                s.rollback()
            s.add(Account(name="after"))
            s.commit()
    elif kind == 3:  # nested transactions
        with Session(eng) as s:
            acc = Account(name="n")
            s.add(acc)
            s.flush()
            for i in range(3):
                nested = s.begin_nested()
                s.add(Entry(account_id=acc.id, amount=i))
                if i % 2:
                    nested.rollback()
                else:
                    nested.commit()
            s.commit()
    elif kind == 4:  # Core, raw DBAPI
        with eng.begin() as conn:
            conn.execute(sa.insert(Account).values(name="core"))
        raw = eng.raw_connection()
        raw.cursor().execute("UPDATE accounts SET balance = balance + 1")
        raw.commit()
        raw.close()
    elif kind == 5:  # threads
        factory = sessionmaker(eng)

        def work(i):
            with factory() as s:
                s.add(Account(name=f"t{i}"))
                s.commit()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elif kind == 6:  # read only
        with eng.connect() as conn:
            conn.execute(sa.select(Account)).all()
    # kind 7: no database at all
"""

TEST_FILE = """
import pytest

from app import assert_empty, body, engine

KINDS = 8


@pytest.mark.parametrize("n", range({start}, {stop}))
def test_soak(n, sa_rollback_url):
    eng = engine(sa_rollback_url)
    if n % KINDS != 7:
        assert_empty(eng)
    body(n % KINDS, eng, n)
"""


def generate(root: Path, tests: int, per_file: int = 500) -> None:
    (root / "models.py").write_text(textwrap.dedent(MODELS))
    (root / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (root / "app.py").write_text(textwrap.dedent(APP))
    for start in range(0, tests, per_file):
        stop = min(start + per_file, tests)
        (root / f"test_soak_{start:06d}.py").write_text(textwrap.dedent(TEST_FILE.format(start=start, stop=stop)))


def run(root: Path, workers: int, env: dict[str, str]) -> dict[str, Any]:
    out = root / f"out-n{workers}"
    out.mkdir()
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--sa-schema", "models:Base"]
    if workers:
        args += ["-n", str(workers)]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=root, env={**env, "SOAK_OUT": str(out)}, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    samples = [
        json.loads(line) for path in sorted(out.glob("samples-*.jsonl")) for line in path.read_text().splitlines()
    ]
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        by_worker.setdefault(sample["worker"], []).append(sample)
    report: dict[str, Any] = {
        "workers": workers,
        "exit_code": proc.returncode,
        "summary": tail[0],
        "seconds": round(seconds, 1),
        "committed_rows_max": max((s["committed_rows"] for s in samples), default=None),
        "per_worker": {},
    }
    for worker, rows in by_worker.items():
        report["per_worker"][worker] = {
            "samples": len(rows),
            "rss_mb_first_last_max": [
                round(rows[0]["rss_kb"] / 1024, 1),
                round(rows[-1]["rss_kb"] / 1024, 1),
                round(max(r["rss_kb"] for r in rows) / 1024, 1),
            ],
            "backends_first_last_max": [rows[0]["backends"], rows[-1]["backends"], max(r["backends"] for r in rows)],
            "threads_last": rows[-1]["threads"],
        }
    if proc.returncode != 0:
        report["output"] = (proc.stdout + proc.stderr)[-4000:]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=10_000, help="Number of generated tests")
    parser.add_argument("--workers", default="0,2", help="Comma-separated xdist worker counts; 0 is serial")
    parser.add_argument("--url", default=os.environ.get("SA_ROLLBACK_URL"), help="Base database URL (else embedded)")
    parser.add_argument("--json", help="Write the report to this file")
    options = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SA_ROLLBACK"))}
    if options.url:
        env["SA_ROLLBACK_URL"] = options.url
    reports = []
    with tempfile.TemporaryDirectory(prefix="sa_rollback_soak_") as tmp:
        root = Path(tmp)
        generate(root, options.tests)
        for workers in (int(w) for w in options.workers.split(",")):
            print(f"soak: {options.tests} tests, {'serial' if not workers else f'-n {workers}'} ...", flush=True)
            report = run(root, workers, env)
            print(json.dumps(report, indent=2), flush=True)
            reports.append(report)
    if options.json:
        Path(options.json).write_text(json.dumps(reports, indent=2))
    return 0 if all(r["exit_code"] == 0 and r["committed_rows_max"] == 0 for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
