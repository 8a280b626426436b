"""The per-test cost of a test that uses no database, for two revisions, run by run in turn.

``python -m benchmarks.nodb_revs REV_A REV_B [--runs 8] [--tests 12000]`` (each REV a git
revision or a directory holding ``sa_rollback/``, as for :mod:`benchmarks.compare_revs`)

Each run is the hot-path harness of :func:`benchmarks.hotpath.nodb_test_cost`: one pytest
run whose per-test hooks are switched on and off from one test to the next, so that its
figure is a paired difference within the run. A run's figure moves with the machine's load
and with where the process's memory happens to lie, by more than the revisions differ; so
the revisions take turns, run after run, and each is reported as the mean of its runs'
figures, with the mean over rounds of the difference between the two.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.compare_revs import materialize
from benchmarks.hotpath import nodb_test_cost
from benchmarks.stats import paired, summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs=2, metavar="REV")
    parser.add_argument("--runs", type=int, default=8, help="runs of each revision (default: 8)")
    parser.add_argument("--tests", type=int, default=12000, help="tests per run (default: 12000)")
    args = parser.parse_args(argv)
    revisions = args.revisions
    figures: list[list[float]] = [[], []]  # by position: the two may be the same revision
    with tempfile.TemporaryDirectory(prefix="sa_rollback_nodb_revs_") as tmp:
        roots = [materialize(rev, Path(tmp) / f"rev{i}").path for i, rev in enumerate(revisions)]
        for round_ in range(args.runs):
            # The order alternates from round to round, so that neither is always first.
            for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                result = nodb_test_cost(args.tests, 2, package_root=roots[side])
                figures[side].append(result["plugin_us"]["mean"])
                print(f"run {round_ + 1} {revisions[side]}: +{figures[side][-1]:.2f} us per test", file=sys.stderr)
    for rev, values in zip(revisions, figures):
        s = summary(values)
        print(f"{rev}: +{s['mean']:.2f} ± {s['ci95']:.2f} us per test (mean of {s['n']} runs)")
    diff = paired(figures[1], figures[0])["diff"]
    print(f"{revisions[1]} - {revisions[0]}: {diff['mean']:+.2f} ± {diff['ci95']:.2f} us per test")


if __name__ == "__main__":
    main()
