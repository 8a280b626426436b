"""Compare two revisions of sa_rollback, paired, in one run.

``python -m benchmarks.compare_revs REV_A REV_B`` (or ``python benchmarks/compare_revs.py``)

Each REV is a git revision of this repository, or a directory that holds a
``sa_rollback`` package (a scratch copy with a prototype). The ``sa_rollback``
package of each is copied into a temporary directory (``git archive``: a pure
Python package needs no build), and one worker process per revision imports it
from there, ahead of the installed one; the benchmark code is this tree's, for
both. Each worker has its own engine and database (a clone of a generated
schema) and stays warm for the whole run.

The controller then runs blocks of tests alternately, A B, B A, A B, ...: a
block is ``--tests`` tests of one body, each in its own rollback scope, as the
plugin would run them. The difference B - A of each round's two blocks is
averaged over the rounds, for the wall time and for the worker's CPU time (which
leaves out the network wait and the time other processes hold the CPU, so it
shows a change to the statement path most precisely). Last, each worker counts
the round trips of ``--count`` tests of each body from libpq's trace: the mean
and the maximum, every test counted. ``--pytest-nodb PAIRS`` adds pairs of
pytest runs of 2000 tests that touch no database, with the plugin of each
revision loaded.

Two switches change what every test of a side does: ``--reset-sequences`` (both
sides' scopes put the sequences back), and ``--b-in-data-scope``: B's tests run
inside a scope that stays open for the whole run and holds 10 committed rows,
as in a module whose fixture requests ``sa_rollback_module_scope``. Given the
same revision twice, it measures what a test inside a data scope costs over a
top-level one::

    python -m benchmarks.compare_revs HEAD HEAD --b-in-data-scope
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.stats import paired, summary

REPO = Path(__file__).resolve().parent.parent
BODIES = ("write", "read")


@dataclass
class Source:
    """One side of the comparison: where its sa_rollback package was copied, and what it is."""

    spec: str
    label: str
    path: Path


def _git(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=REPO, stdout=stdout, stderr=subprocess.PIPE, check=False)


def materialize(spec: str, into: Path) -> Source:
    """Copy the ``sa_rollback`` package of a directory or a git revision into ``into``."""
    into.mkdir(parents=True)
    directory = Path(spec)
    if (directory / "sa_rollback" / "__init__.py").is_file():
        # The whole tree: the package has subpackages (sa_rollback.databases).
        shutil.copytree(
            directory.resolve() / "sa_rollback", into / "sa_rollback", ignore=shutil.ignore_patterns("__pycache__")
        )
        return Source(spec, f"dir {directory.resolve()}", into)
    found = _git("rev-parse", "--verify", "--quiet", f"{spec}^{{commit}}")
    if found.returncode != 0:
        raise SystemExit(f"{spec!r} is neither a git revision of {REPO} nor a directory holding sa_rollback/")
    sha = found.stdout.decode().strip()
    archive = into / "sa_rollback.tar"
    with archive.open("wb") as fh:
        made = _git("archive", "--format=tar", sha, "sa_rollback", stdout=fh)
    if made.returncode != 0:
        raise SystemExit(f"git archive {sha} sa_rollback failed: {made.stderr.decode().strip()}")
    with tarfile.open(archive) as tar:
        try:
            tar.extractall(into, filter="data")
        except TypeError:  # Python before 3.11.4 has no filter, and git archive writes no links out of the tree
            tar.extractall(into)
    archive.unlink()
    subject = _git("log", "-1", "--format=%h %s", sha).stdout.decode().strip()
    return Source(spec, subject[:72], into)


class Worker:
    """A process that runs test bodies on one revision of sa_rollback, on command."""

    def __init__(
        self,
        source: Source,
        url: str,
        tables: int,
        driver: str,
        cwd: Path,
        reset_sequences: bool = False,
        in_data_scope: bool = False,
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SA_ROLLBACK"))}
        # The revision's package first; this tree only for the benchmark code. The working directory is
        # neither, since python -m puts it ahead of PYTHONPATH.
        env["PYTHONPATH"] = os.pathsep.join([str(source.path), str(REPO)])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.compare_revs",
                "--worker",
                url,
                str(tables),
                driver,
                str(int(reset_sequences)),
                str(int(in_data_scope)),
            ],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.source = source
        self.info = self.ask({"cmd": "info"})
        if not Path(self.info["sa_rollback"]).resolve().is_relative_to(source.path.resolve()):
            raise SystemExit(f"worker for {source.spec} imported {self.info['sa_rollback']}, not its copy")

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        stdin.write(json.dumps(message) + "\n")
        stdin.flush()
        line = stdout.readline()
        if not line:
            raise SystemExit(f"the worker for {self.source.spec} ended (exit {self.proc.wait()}); see its errors above")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise SystemExit(f"the worker for {self.source.spec} failed:\n{answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask({"cmd": "quit"})
            except SystemExit:
                pass
            self.proc.wait(timeout=30)


def compare(
    workers: tuple[Worker, Worker], bodies: tuple[str, ...], tests: int, rounds: int, count: int, progress: Any
) -> dict[str, Any]:
    a, b = workers
    for worker in workers:
        for body in bodies:
            worker.ask({"cmd": "time", "body": body, "tests": tests})  # warm-up
    blocks: dict[str, dict[str, dict[str, list[float]]]] = {
        body: {side: {"wall": [], "cpu": []} for side in ("a", "b")} for body in bodies
    }
    for r in range(rounds):
        for body in bodies:
            order = ((a, "a"), (b, "b")) if (r + bodies.index(body)) % 2 == 0 else ((b, "b"), (a, "a"))
            for worker, side in order:
                took = worker.ask({"cmd": "time", "body": body, "tests": tests})
                blocks[body][side]["wall"].append(took["wall_ns"] / tests / 1e3)
                blocks[body][side]["cpu"].append(took["cpu_ns"] / tests / 1e3)
        if (r + 1) % max(1, rounds // 5) == 0:
            progress(f"round {r + 1}/{rounds}")
    out: dict[str, Any] = {"tests_per_block": tests, "rounds": rounds, "bodies": {}}
    for body in bodies:
        entry: dict[str, Any] = {}
        for clock in ("wall", "cpu"):
            series_a, series_b = blocks[body]["a"][clock], blocks[body]["b"][clock]
            entry[clock] = {
                "a_us": summary(series_a),
                "b_us": summary(series_b),
                "b_minus_a_us": paired(series_b, series_a)["diff"],
            }
        entry["round_trips"] = {
            side: worker.ask({"cmd": "count", "body": body, "tests": count}) for worker, side in ((a, "a"), (b, "b"))
        }
        out["bodies"][body] = entry
    return out


def pytest_nodb(sources: tuple[Source, Source], tests: int, pairs: int, tmp: Path, progress: Any) -> dict[str, Any]:
    """A pytest run of ``tests`` tests that touch no database, with the plugin, on each revision, alternating.

    Each run imports the revision's copy of sa_rollback (first on ``PYTHONPATH``)
    and reports the mean time of one test's whole protocol (setup, call,
    teardown, with every hook and fixture of the plugin); B - A is taken
    between the two runs of a pair, then averaged over the pairs.
    """
    from benchmarks.suites import _NODB_CONFTEST, _NODB_TESTS, _run_pytest

    root = tmp / "nodb_suite"
    root.mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "conftest.py").write_text(_NODB_CONFTEST + '\npytest_plugins = ["sa_rollback"]\n')
    (root / "test_nothing.py").write_text(_NODB_TESTS.format(n=tests))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SA_ROLLBACK"))}
    means: dict[str, list[float]] = {"a": [], "b": []}
    for pair in range(pairs):
        for side in "ab" if pair % 2 == 0 else "ba":
            source = sources["ab".index(side)]
            env = dict(base, PYTHONPATH=str(source.path))
            _, loop = _run_pytest(root, env, 0, ("-s", "-p", "no:logging"))
            means[side].append(loop["mean_us"])
        progress(f"pytest no-db pair {pair + 1}/{pairs}: A {means['a'][-1]:.1f} us, B {means['b'][-1]:.1f} us")
    return {
        "tests": tests,
        "pairs": pairs,
        "a_us": summary(means["a"]),
        "b_us": summary(means["b"]),
        "b_minus_a_us": paired(means["b"], means["a"])["diff"],
    }


def _fmt(stat: dict[str, Any], signed: bool = False) -> str:
    return f"{stat['mean']:{'+' if signed else ''}.1f} ± {stat['ci95']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    a, b = result["a"], result["b"]
    lines = [
        f"A = `{a['spec']}` ({a['label']}); B = `{b['spec']}` ({b['label']}).",
        f"Server {result['server']}, driver {result['driver']}, {result['tables']} tables"
        f"{', reset_sequences on' if result.get('reset_sequences') else ''}"
        f"{'; B inside a data scope that holds 10 rows' if result.get('b_in_data_scope') else ''}; "
        f"{result['rounds']} rounds of blocks of {result['tests_per_block']} tests per body and side, alternating "
        "A B / B A. Times in µs per test: mean ± half-width of the 95% confidence interval.",
        "",
        "| body | wall A | wall B | wall B - A | CPU A | CPU B | CPU B - A | round trips A | round trips B |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for body, entry in result["bodies"].items():
        wall, cpu, trips = entry["wall"], entry["cpu"], entry["round_trips"]
        cells = [
            _fmt(wall["a_us"]),
            _fmt(wall["b_us"]),
            _fmt(wall["b_minus_a_us"], True),
            _fmt(cpu["a_us"]),
            _fmt(cpu["b_us"]),
            _fmt(cpu["b_minus_a_us"], True),
            *(f"{trips[s]['mean']:.2f} (max {trips[s]['max']})" for s in ("a", "b")),
        ]
        lines.append(f"| {body} | " + " | ".join(cells) + " |")
    nodb = result.get("pytest_nodb")
    if nodb:
        lines += [
            "",
            f"pytest, {nodb['tests']} tests that touch no database, plugin loaded, `-s -p no:logging`, "
            f"{nodb['pairs']} pairs of runs: mean test protocol A {_fmt(nodb['a_us'])} µs, B {_fmt(nodb['b_us'])} µs, "
            f"B - A {_fmt(nodb['b_minus_a_us'], True)} µs.",
        ]
    return "\n".join(lines)


# -- the worker -------------------------------------------------------------------------------


def worker_main(
    url: str, tables: int, driver: str, reset: bool, in_data_scope: bool, stdin: IO[str], stdout: IO[str]
) -> None:
    import traceback

    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    import sa_rollback
    from benchmarks.bodies import BODY_FUNCS
    from benchmarks.roundtrips import tracing
    from benchmarks.schema import make_schema

    schema = make_schema(tables)
    engine = sa.create_engine(sa.make_url(url).set(drivername=f"postgresql+{driver}"))

    def new_session() -> Session:
        return Session(engine)

    def one_test(body: str) -> None:
        with sa_rollback.rollback_scope(reset_sequences=reset) if reset else sa_rollback.rollback_scope():
            BODY_FUNCS[body](new_session, schema)

    # A module's data scope: open for the whole run, its fixture's rows committed in it.
    outer = sa_rollback.rollback_scope("module data", reset_sequences=reset) if in_data_scope else None
    if outer is not None:
        outer.__enter__()
        BODY_FUNCS["write"](new_session, schema)

    def handle(message: dict[str, Any]) -> dict[str, Any]:
        cmd = message["cmd"]
        if cmd == "info":
            return {"sa_rollback": sa_rollback.__file__, "pid": os.getpid()}
        if cmd == "time":
            body, n = message["body"], message["tests"]
            wall, cpu = time.perf_counter_ns(), time.thread_time_ns()
            for _ in range(n):
                one_test(body)
            return {"wall_ns": time.perf_counter_ns() - wall, "cpu_ns": time.thread_time_ns() - cpu}
        if cmd == "count":
            with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_cmp_") as tmp, tracing(Path(tmp)) as tracer:
                one_test(message["body"])  # the shared connection exists, and is traced from here on
                trips = []
                for _ in range(message["tests"]):
                    mark = tracer.mark()
                    one_test(message["body"])
                    trips.append(tracer.since(mark).round_trips)
            if message["body"] != "nodb" and not any(trips):
                raise RuntimeError(
                    "no round trip traced: this revision keeps its shared connections somewhere "
                    "benchmarks.roundtrips does not look (sa_rollback._state.STATE.physicals)"
                )
            return {"per_test": trips, "mean": sum(trips) / len(trips), "max": max(trips), "min": min(trips)}
        raise ValueError(f"unknown command {cmd!r}")

    for line in stdin:
        message = json.loads(line)
        if message["cmd"] == "quit":
            stdout.write("{}\n")
            stdout.flush()
            break
        try:
            answer = handle(message)
        except Exception:
            answer = {"error": traceback.format_exc()}
        stdout.write(json.dumps(answer) + "\n")
        stdout.flush()
    if outer is not None:
        outer.close()
    engine.dispose()


# -- the controller ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1], int(argv[2]), argv[3], argv[4:5] == ["1"], argv[5:6] == ["1"], sys.stdin, sys.stdout)
        return 0
    from benchmarks.config import URL_ENV, db, server_url, set_tag
    from benchmarks.db import build_schema, session_admin
    from benchmarks.schema import make_schema

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_revs", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev_a", help="A: a git revision, or a directory holding sa_rollback/")
    parser.add_argument("rev_b", help="B: the same")
    parser.add_argument("--url", help=f"Server URL (default: ${URL_ENV} or postgresql://postgres@127.0.0.1:5432)")
    parser.add_argument("--driver", choices=("psycopg", "psycopg2"), default="psycopg", help="DBAPI driver")
    parser.add_argument("--tables", type=int, default=5, help="Tables of the generated schema (default: 5)")
    parser.add_argument("--bodies", default=",".join(BODIES), help="Test bodies (default: write,read)")
    parser.add_argument("--tests", type=int, default=50, help="Tests per block (default: 50)")
    parser.add_argument("--rounds", type=int, default=40, help="Rounds of A and B blocks (default: 40)")
    parser.add_argument("--count", type=int, default=30, help="Tests whose round trips are counted (default: 30)")
    parser.add_argument("--tag", default="cmp", help="Word in the database names (concurrent runs)")
    parser.add_argument("--json", type=Path, help="Also write the results to this file")
    parser.add_argument(
        "--pytest-nodb",
        type=int,
        default=0,
        metavar="PAIRS",
        help="Also run a pytest suite of 2000 tests that touch no database, with the plugin, on each "
        "revision, for this many pairs of runs (default: 0, not run)",
    )
    parser.add_argument(
        "--reset-sequences", action="store_true", help="Every test's scope puts the sequences back (reset_sequences)"
    )
    parser.add_argument(
        "--b-in-data-scope",
        action="store_true",
        help="B's tests run inside a scope that stays open and holds data, as a module's data scope does "
        "(compare a revision with itself: the cost of a test in a module data scope over a top-level one)",
    )
    args = parser.parse_args(argv)
    bodies = tuple(b for b in args.bodies.split(",") if b)
    if not bodies or any(b not in ("write", "read", "nodb") for b in bodies):
        parser.error("--bodies takes write, read and nodb, separated by commas")
    begin = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - begin:6.1f} s] {message}", file=sys.stderr, flush=True)

    set_tag(args.tag)
    url = server_url(args.url)
    with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_revs_") as tmp, session_admin(url) as admin:
        sources = (materialize(args.rev_a, Path(tmp) / "a"), materialize(args.rev_b, Path(tmp) / "b"))
        schema = make_schema(args.tables)
        workers: list[Worker] = []
        try:
            for side, source in zip("ab", sources):
                name = db(f"revs_{side}")
                build_schema(admin, name, schema)
                db_url = admin.db_url(name).render_as_string(hide_password=False)
                nested = args.b_in_data_scope and side == "b"
                workers.append(
                    Worker(source, db_url, args.tables, args.driver, Path(tmp), args.reset_sequences, nested)
                )
                progress(f"{side.upper()}: {source.label}: {workers[-1].info['sa_rollback']}")
            result = compare((workers[0], workers[1]), bodies, args.tests, args.rounds, args.count, progress)
            if args.pytest_nodb:
                result["pytest_nodb"] = pytest_nodb(sources, 2000, args.pytest_nodb, Path(tmp), progress)
        finally:
            for worker in workers:
                worker.close()
    result.update(
        a=vars(sources[0]) | {"path": str(sources[0].path)},
        b=vars(sources[1]) | {"path": str(sources[1].path)},
        server=f"{url.host}:{url.port or 5432}",
        driver=args.driver,
        tables=args.tables,
        reset_sequences=args.reset_sequences,
        b_in_data_scope=args.b_in_data_scope,
    )
    text = markdown(result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
