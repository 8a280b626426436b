"""``python -m benchmarks [--quick | --smoke] [--url URL] [--out DIR]``: run the benchmark, write the results."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import PLANS, URL_ENV, server_url, set_tag
from .db import session_admin

SECTIONS = ("matrix", "async", "hotpath", "suites", "nodb", "provisioning")
RESULTS = Path(__file__).resolve().parent / "results"


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick", help="A short run (under a minute)")
    mode.add_argument("--smoke", action="store_const", dest="mode", const="smoke", help="A few seconds, for the tests")
    parser.add_argument(
        "--profile-hot-path",
        action="store_true",
        help="Only the plugin's cost per checkout, per statement and per test with no database "
        "(same as --only hotpath; writes into results/hot_path unless --out is given)",
    )
    parser.add_argument("--url", help=f"Server URL (default: ${URL_ENV} or postgresql://postgres@127.0.0.1:5432)")
    parser.add_argument("--out", type=Path, help=f"Directory of the results (default: {RESULTS})")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="Also put results.md between the results markers of benchmarks/README.md "
        "(with --only async alone: between its async markers)",
    )
    parser.add_argument("--tag", default="", help="Put this word into the database names (concurrent runs)")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="Run only this section (repeatable; default: all)"
    )
    args = parser.parse_args(argv)
    plan = PLANS[args.mode or "full"]
    set_tag(args.tag)
    sections = ("hotpath",) if args.profile_hot_path else tuple(args.only or SECTIONS)
    # A single-section run writes beside the full run's results, not over them.
    alone = "hot_path" if sections == ("hotpath",) else ("async" if sections == ("async",) else "")
    out = args.out or (RESULTS / alone if alone else RESULTS)
    begin = time.perf_counter()
    # A plain SIGTERM would skip the finally blocks that drop the benchmark's databases.
    signal.signal(signal.SIGTERM, _terminate)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - begin:6.1f} s] {message}", flush=True)

    # Imported here so that --help works without a database driver configured.
    from sa_rollback._state import STATE

    from . import hotpath, machine, measure, provisioning, suites
    from .report import ASYNC_MARKERS, RESULTS_MARKERS, update_readme, write_all

    results: dict[str, Any] = {
        "meta": {
            "mode": plan.mode,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "plan": dataclasses.asdict(plan),
            "sections": list(sections),
        }
    }
    progress(f"benchmark mode {plan.mode}: {', '.join(sections)}")
    with session_admin(server_url(args.url)) as admin:
        results["meta"]["machine"] = machine.describe(admin)
        try:
            if "matrix" in sections:
                results.update(measure.run_matrix(admin, plan, progress))
        finally:
            # sa_rollback keeps one physical connection per database; close them before the drops.
            STATE.close_all()
        if "async" in sections:
            from . import aio

            results["async"] = aio.run_async(admin, plan, progress)
        if "hotpath" in sections:
            results["hot_path"] = hotpath.run_hot_path(admin, plan, progress)
        if "nodb" in sections:
            core = measure.core_scope_cost(plan.core_iterations, plan.core_reps)
            progress(f"core rollback_scope() enter + exit: {core['overhead_us']['mean']:.2f} us over an empty with")
            results["nodb"] = {
                "pytest": suites.run_nodb_suites(plan.nodb_tests, plan.nodb_reps, progress),
                "pytest_lean": suites.run_nodb_suites(plan.nodb_tests, plan.nodb_lean_reps, progress, suites.LEAN_ARGS),
                "core": core,
            }
        if "suites" in sections:
            results["suites"] = suites.run_suites(
                admin,
                plan.suite_strategies,
                plan.suite_size,
                plan.suite_table_count,
                plan.suite_workers,
                plan.suite_reps,
                progress,
            )
        if "provisioning" in sections:
            prov: dict[str, Any] = {
                "databases": provisioning.database_costs(admin, plan.provision_sizes, plan.provision_reps, progress)
            }
            if plan.embedded_server:
                prov["embedded_server"] = provisioning.embedded_server(2, progress)
            results["provisioning"] = prov
    results["meta"]["duration_s"] = time.perf_counter() - begin
    for path in write_all(results, out):
        progress(f"wrote {path}")
    if args.update_readme:
        # The async section alone has its own place in benchmarks/README.md.
        markers = ASYNC_MARKERS if alone == "async" else RESULTS_MARKERS
        progress(f"wrote {update_readme(out / 'results.md', markers=markers)}")
    for target in results.get("targets", []):
        progress(f"target {'met' if target['met'] else 'MISSED'}: {target['target']}: {target['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
