"""The plugin's hot paths in CPU instructions, counted by valgrind: exact where timings are noise.

``python -m benchmarks.instructions [REV ...]`` (each REV a git revision or a
directory holding ``sa_rollback/``, as for :mod:`benchmarks.compare_revs`;
default: the working tree)

On a shared machine, microseconds per test vary from run to run by more than
the plugin costs. The number of instructions a process executes does not
depend on the load, so it is counted instead (``valgrind --tool=cachegrind
--cache-sim=no``; the hardware counters are not available in most virtual
machines). Python's start-up and pytest's collection cost the same for every
size of suite, so each figure is a difference between two runs of different
sizes, divided by the difference in size:

* ``nodb``: a pytest suite of trivial parametrized tests, with
  ``pytest_plugins = ["sa_rollback"]`` and without it (``-s -p no:logging``,
  as the benchmark's lean variant), 100 and 1100 tests: instructions per test.
  A third run imports the plugin module (so SQLAlchemy too) without
  registering it: a suite that uses a database has SQLAlchemy's objects in
  memory anyway, and every garbage collection of the run walks them. The
  difference to it is what the plugin's per-test hooks cost;
* ``checkout``: ``engine.connect().close()`` against the server of
  ``--url``, inside a scope after its first statement and outside any scope,
  1000 and 6000 times: instructions per checkout.

Each run takes some 30 to 90 s under valgrind. ``PYTHONHASHSEED`` is fixed,
so that two runs of the same code count within a few thousand instructions.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare_revs import REPO, materialize

DEFAULT_URL = os.environ.get("SA_ROLLBACK_BENCH_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_CONFTEST = (
    "import os\n\n"
    'if os.environ["BENCH_PLUGIN"] == "import":\n'
    "    import sa_rollback.plugin  # noqa: F401\n"
    'pytest_plugins = ["sa_rollback"] if os.environ["BENCH_PLUGIN"] == "1" else []\n'
)
_TESTS = (
    "import os\n\nimport pytest\n\n\n"
    '@pytest.mark.parametrize("i", range(int(os.environ["BENCH_N"])))\n'
    "def test_nothing(i):\n    assert i >= 0\n"
)
_CHECKOUTS = """\
import os
import sys

import sqlalchemy as sa

import sa_rollback

mode, n = sys.argv[1], int(sys.argv[2])
engine = sa.create_engine(os.environ["BENCH_URL"])


def checkout():
    engine.connect().close()


for _ in range(50):
    checkout()
if mode == "outside":
    for _ in range(n):
        checkout()
else:
    with sa_rollback.rollback_scope():
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        for _ in range(n):
            checkout()
"""


def count(args: list[str], cwd: Path, env: dict[str, str]) -> int:
    """Instructions executed by ``python ARGS`` under cachegrind."""
    proc = subprocess.run(
        ["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    found = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"valgrind {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def per_unit(args: list[str], sizes: tuple[int, int], cwd: Path, env: dict[str, str], size_var: str = "") -> float:
    counts = []
    for size in sizes:
        if size_var:
            counts.append(count(args, cwd, dict(env, **{size_var: str(size)})))
        else:
            counts.append(count([*args, str(size)], cwd, env))
    return (counts[1] - counts[0]) / (sizes[1] - sizes[0])


def measure(package: Path, url: str, work: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "SA_ROLLBACK"))}
    env.update(PYTHONHASHSEED="0", PYTHONPATH=os.pathsep.join([str(package), str(REPO)]))
    suite = work / "suite"
    suite.mkdir(exist_ok=True)
    (suite / "pytest.ini").write_text("[pytest]\n")
    (suite / "conftest.py").write_text(_CONFTEST)
    (suite / "test_nothing.py").write_text(_TESTS)
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-s", "-p", "no:logging"]
    out: dict[str, float] = {}
    for plugin in ("0", "import", "1"):
        out[f"nodb_plugin_{plugin}"] = per_unit(
            pytest_args, (100, 1100), suite, dict(env, BENCH_PLUGIN=plugin), size_var="BENCH_N"
        )
    script = work / "checkouts.py"
    script.write_text(_CHECKOUTS)
    checkout_env = dict(env, BENCH_URL=url)
    for mode in ("outside", "in_scope"):
        out[f"checkout_{mode}"] = per_unit([str(script), mode], (1000, 6000), work, checkout_env)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "revs", nargs="*", default=[str(REPO)], help="git revisions or directories (default: this tree)"
    )
    parser.add_argument("--url", default=DEFAULT_URL.replace("postgresql://", "postgresql+psycopg://", 1))
    args = parser.parse_args(argv)
    print(
        "| revision | no-database test, plugin off | package imported, plugin off | plugin on | plugin's share "
        "| of which its per-test hooks | checkout outside a scope | in a scope | plugin's share in a scope |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rev in args.revs:
        with tempfile.TemporaryDirectory(prefix="sa_rollback_bench_ir_") as tmp:
            source = materialize(rev, Path(tmp) / "pkg")
            r = measure(source.path, args.url, Path(tmp))
        print(
            f"| `{rev}` | {r['nodb_plugin_0']:,.0f} | {r['nodb_plugin_import']:,.0f} | {r['nodb_plugin_1']:,.0f} "
            f"| +{r['nodb_plugin_1'] - r['nodb_plugin_0']:,.0f} | +{r['nodb_plugin_1'] - r['nodb_plugin_import']:,.0f} "
            f"| {r['checkout_outside']:,.0f} "
            f"| {r['checkout_in_scope']:,.0f} | +{r['checkout_in_scope'] - r['checkout_outside']:,.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
