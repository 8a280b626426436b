"""Peak of client connections on the embedded server while an example suite runs.

    python scripts/connection_peak.py                      # examples/flask_app, -n 2
    python scripts/connection_peak.py examples/flask_app -n 4

Runs pytest on the example (extra arguments go to pytest) with a fresh embedded
server directory, polls ``pg_stat_activity`` every 10 ms over the server's socket,
and prints the largest number of client connections seen (this poller's own
excluded), with their databases and application names at that moment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

_QUERY = (
    "SELECT coalesce(datname, '-'), application_name FROM pg_stat_activity "
    "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
)


def main() -> None:
    example = sys.argv[1] if len(sys.argv) > 1 else "examples/flask_app"
    extra = sys.argv[2:] or ["-n", "2"]
    directory = Path(
        tempfile.mkdtemp(prefix="sa_rollback_peak_", dir="/var/tmp" if os.path.isdir("/var/tmp") else None)
    )
    directory.chmod(0o755)  # as root, the server's user must enter it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SA_ROLLBACK", "PYTEST_"))}
    env["SA_ROLLBACK_SERVER_DIR"] = str(directory)
    command = [sys.executable, "-m", "pytest", example, "-q", "-p", "no:cacheprovider", *extra]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: list[tuple[str, str]] = []
    try:
        while proc.poll() is None:
            try:
                with psycopg.connect(
                    host=str(directory / "pgdata"), user="postgres", dbname="postgres", autocommit=True
                ) as conn:
                    while proc.poll() is None:
                        rows = conn.execute(_QUERY).fetchall()
                        if len(rows) > len(peak):
                            peak = rows
                        time.sleep(0.01)
            except psycopg.OperationalError:
                time.sleep(0.05)  # not started yet, or stopping
        output = proc.stdout.read() if proc.stdout else ""
    finally:
        proc.wait()
        shutil.rmtree(directory, ignore_errors=True)
    print(output.strip().splitlines()[-1] if output.strip() else "(no output)")
    print(f"peak client connections: {len(peak)}")
    for database, application in sorted(peak):
        print(f"  {database}  {application or '(no application_name)'}")


if __name__ == "__main__":
    main()
