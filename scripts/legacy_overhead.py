"""Connects and wall time of a generated Flask-SQLAlchemy suite, with sa_rollback and without isolation.

    python scripts/legacy_overhead.py --tests 200 --rounds 5 --url postgresql://postgres@127.0.0.1:5432/postgres

Made for the stack of pytest-flask-sqlalchemy's users (SQLAlchemy 1.4 with
Flask-SQLAlchemy 2.5, issue 15), and runs on any supported one. The suite has
``--tests`` tests over ten tables, alternately inserting (add, commit, read
back) and reading, through ``db_session`` with a ``_db`` fixture. Each round
runs it without isolation (``--sa-rollback=off``) and with sa_rollback, in
alternating order, each on a fresh clone that the plugin makes from
``schema.sql`` and drops at the end. Every run reports the connections its
pools opened (a ``connect`` listener on the ``Pool`` class) and the time from
the first test's setup to the end of the session; the script prints each run
and the medians. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

TABLES = 10

CONFTEST = """
import json
import os
import time

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event
from sqlalchemy.pool import Pool

pytest_plugins = ["sa_rollback"]

COUNTS = {"connects": 0, "tests": 0, "start": None, "cpu": None}
event.listen(Pool, "connect", lambda *args: COUNTS.__setitem__("connects", COUNTS["connects"] + 1))

app = Flask(__name__)
db = SQLAlchemy()
MODELS = [
    type(f"T{n}", (db.Model,), {
        "__tablename__": f"t{n}",
        "id": db.Column(db.Integer, primary_key=True),
        "name": db.Column(db.Text, nullable=False),
    })
    for n in range(%(tables)d)
]


@pytest.fixture(scope="session")
def _db(sa_rollback_url):
    app.config["SQLALCHEMY_DATABASE_URI"] = sa_rollback_url
    app.config["SQLALCHEMY_TRACK_MODIFICATIONS"] = False
    db.init_app(app)
    with app.app_context():
        yield db


def pytest_runtest_setup(item):
    COUNTS["tests"] += 1
    if COUNTS["start"] is None:
        COUNTS["start"] = time.perf_counter()
        COUNTS["cpu"] = time.process_time()


def pytest_sessionfinish(session):
    seconds = time.perf_counter() - COUNTS["start"]
    cpu = time.process_time() - COUNTS["cpu"]
    with open(os.environ["OVERHEAD_OUT"], "w") as out:
        json.dump({"connects": COUNTS["connects"], "tests": COUNTS["tests"], "seconds": seconds, "cpu": cpu}, out)
"""

TESTS = """
import pytest

from conftest import MODELS


@pytest.mark.parametrize("n", range(%(tests)d))
def test_generated(db_session, n):
    model = MODELS[n %% len(MODELS)]
    if n %% 2:
        db_session.add(model(name=f"row{n}"))
        db_session.commit()
        assert db_session.query(model).filter_by(name=f"row{n}").count() == 1
    else:
        assert db_session.query(model).filter_by(name="never").count() == 0
"""


def run_once(project: Path, url: str, isolated: bool) -> dict[str, Any]:
    out = project / "result.json"
    env = dict(os.environ, OVERHEAD_OUT=str(out))
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if url != "embedded":
        args += ["--sa-url", url]
    args += ["--sa-schema", "sql:schema.sql", "--sa-rollback", "on" if isolated else "off"]
    done = subprocess.run(args, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"the generated suite failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--url",
        default=os.environ.get("SA_ROLLBACK_TEST_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="A PostgreSQL server where this role may create databases (its database is not touched), "
        "or 'embedded' for sa_rollback's embedded server (the [server] extra), whose COMMIT waits for fsync",
    )
    options = parser.parse_args()
    import sqlalchemy

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "conftest.py").write_text(textwrap.dedent(CONFTEST % {"tables": TABLES}))
        (project / "test_generated.py").write_text(TESTS % {"tests": options.tests})
        (project / "schema.sql").write_text(
            "".join(f"CREATE TABLE t{n} (id serial PRIMARY KEY, name text NOT NULL);\n" for n in range(TABLES))
        )
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "sa_rollback": []}
        for round_ in range(options.rounds):
            order = [False, True] if round_ % 2 == 0 else [True, False]
            for isolated in order:
                result = run_once(project, options.url, isolated)
                name = "sa_rollback" if isolated else "off"
                runs[name].append(result)
                print(
                    f"round {round_ + 1} {name:11} {result['tests']} tests, {result['connects']} connects, "
                    f"{result['seconds']:.3f} s wall, {result['cpu']:.3f} s CPU",
                    flush=True,
                )
    print(f"SQLAlchemy {sqlalchemy.__version__}, {options.tests} tests, {options.rounds} rounds (alternating)")
    for name, results in runs.items():
        connects = sorted({r["connects"] for r in results})
        median = statistics.median(r["seconds"] for r in results)
        cpu = statistics.median(r["cpu"] for r in results)
        print(
            f"{name:11} connects per run {connects}, median wall {median:.3f} s "
            f"({1000 * median / options.tests:.2f} ms per test), median CPU of the pytest process {cpu:.3f} s"
        )
    # Paired: each round's two runs saw about the same load on the machine.
    ratios = [on["seconds"] / off["seconds"] for on, off in zip(runs["sa_rollback"], runs["off"])]
    print(f"sa_rollback / off, wall time, median of the rounds' ratios: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
