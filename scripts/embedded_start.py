"""Embedded server start-up, as the plugin does it: cold (a new data directory) and warm (an existing one).

    python scripts/embedded_start.py            # 5 repetitions
    python scripts/embedded_start.py --reps 10

Each sample is a fresh Python process that calls ``sa_rollback.databases.embedded_server``
(finding the wheel's binaries, initdb when the directory is new, starting the server) and runs
``SELECT 1`` through the plugin's admin connection; the clock starts after SQLAlchemy and
the plugin are imported (any test run pays for those).
The process then exits, which stops the server (as the last process of a run does), so
the next warm sample starts it again from its data directory. Prints the medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_SAMPLE = """
import json, sys, time
from pathlib import Path
from sa_rollback.databases import Janitor, embedded_server  # SQLAlchemy: paid by any test run anyway
start = time.perf_counter()
server = embedded_server(Path(sys.argv[1]))
with Janitor(server.admin_url) as janitor:
    janitor.conn.execute("SELECT 1")
print(json.dumps({"ready_s": time.perf_counter() - start}))
"""


def sample(data_dir: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", _SAMPLE, str(data_dir)], capture_output=True, text=True, timeout=300, check=True
    )
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["ready_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5, help="Repetitions of each (default: %(default)s)")
    reps = parser.parse_args().reps
    cold: list[float] = []
    warm: list[float] = []
    for rep in range(reps):
        root = Path(tempfile.mkdtemp(prefix="sa_rollback_start_"))
        root.chmod(0o755)  # as root, the server runs as an unprivileged user who must enter it
        try:
            cold.append(sample(root))
            warm.append(sample(root))
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print(f"rep {rep + 1}/{reps}: cold {cold[-1]:.2f} s, warm {warm[-1]:.2f} s", file=sys.stderr)
    print(
        f"embedded server ready (import of the wheel + start + first query), median of {reps}: "
        f"cold {statistics.median(cold):.2f} s (min {min(cold):.2f}), "
        f"warm {statistics.median(warm):.2f} s (min {min(warm):.2f})"
    )


if __name__ == "__main__":
    main()
