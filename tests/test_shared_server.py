"""One server shared by runs, shards and hosts: leases, old templates, a role without superuser.

Every database here is made from bases named after this process's run id, and
dropped at the end of the module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from sa_rollback import SaRollbackWarning
from sa_rollback.databases import Janitor, Mark, drop_dead_clones
from sa_rollback.databases._lease import Lease
from sa_rollback.databases._provision import prune_templates
from sa_rollback.errors import DatabaseSetupError

from .conftest import ADMIN_URL, libpq_dsn

RUN = uuid.uuid4().hex[:8]
BASES: list[str] = []
USERS_SQL = "CREATE TABLE users (id integer PRIMARY KEY, name text);"


def admin() -> psycopg.Connection:
    return psycopg.connect(libpq_dsn("postgres"), autocommit=True)


def janitor() -> Janitor:
    return Janitor(make_url(ADMIN_URL))


def new_base(suffix: str) -> str:
    name = f"sa_rollback_selftest_{RUN}_{suffix}"
    BASES.append(name)
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def made_from(base: str, kind: str = "clone") -> dict[str, Mark]:
    with warnings.catch_warnings(), janitor() as j:
        warnings.simplefilter("ignore", SaRollbackWarning)
        return {name: mark for name, mark in j.marked() if mark.kind == kind and mark.base == base}


def of_base(base: str, names: list[str]) -> list[str]:
    """The names of ``base``'s databases: a sweep also drops what concurrent runs' killed shards left."""
    return [name for name in names if name.startswith(f"{base}_sar_")]


@pytest.fixture(scope="module", autouse=True)
def _drop_everything() -> Iterator[None]:
    yield
    with warnings.catch_warnings(), janitor() as j:
        warnings.simplefilter("ignore", SaRollbackWarning)
        for name, mark in j.marked():
            if mark.base in BASES:
                j.drop(name)
        for base in BASES:
            j.conn.execute(j.conn.compose("DROP DATABASE IF EXISTS {} WITH (FORCE)", base))


def test_a_clone_is_dropped_when_its_runs_lease_is_free_whatever_host_or_pid_it_names() -> None:
    base = new_base("lease")
    live_run, dead_run = f"{RUN}live", f"{RUN}dead"
    # The same host name and a pid that does not exist here: another container with host networking.
    foreign = {"host": Mark.clone(base, live_run).host, "pid": 2**22 + 7}
    lease = Lease(make_url(ADMIN_URL), live_run)  # the live run, as seen from here: it holds its lease
    try:
        with janitor() as j:
            for run in (live_run, dead_run):
                mark = Mark("clone", base=base, run=run, time=int(time.time()), **foreign)  # type: ignore[arg-type]
                mark = Mark(**{**mark.__dict__, "lease": Mark.clone(base, run).lease})
                j.create(f"{base}_sar_{run}", mark)
            dropped = of_base(base, drop_dead_clones(j, base))
        assert dropped == [f"{base}_sar_{dead_run}"]
        assert set(made_from(base)) == {f"{base}_sar_{live_run}"}
    finally:
        lease.close()
    with janitor() as j:
        assert of_base(base, drop_dead_clones(j, base)) == [f"{base}_sar_{live_run}"]  # its run is gone now


def test_a_sweep_whose_session_the_server_ends_goes_on_with_a_new_one(monkeypatch: pytest.MonkeyPatch) -> None:
    base = new_base("ended")
    dead = [f"{base}_sar_{RUN}dead{i}" for i in range(2)]
    with janitor() as j:
        for name in dead:
            j.create(name, Mark.clone(base, name.rsplit("_", 1)[1]))
        first_pid = j.conn.execute("SELECT pg_backend_pid()")[0][0]
        drop = Janitor.drop
        ended: list[str] = []

        def drop_after_the_server_ends_the_session(self: Janitor, name: str) -> bool:
            if not ended:  # what a failover, an admin's pg_terminate_backend or a server restart does
                ended.append(name)
                with admin() as other:
                    other.execute("SELECT pg_terminate_backend(%s)", (first_pid,))
            return drop(self, name)

        monkeypatch.setattr(Janitor, "drop", drop_after_the_server_ends_the_session)
        dropped = of_base(base, drop_dead_clones(j, base))
        assert ended and dropped == [name for name in dead if name not in ended]
        assert j.conn.execute("SELECT pg_backend_pid()")[0][0] != first_pid  # a new session, usable
        monkeypatch.undo()
        assert of_base(base, drop_dead_clones(j, base)) == ended  # the next sweep takes the one left


def test_old_templates_are_pruned_keeping_the_newest_and_those_in_use() -> None:
    base = new_base("tpl")
    now = int(time.time())
    names = [f"{base}_sar_tpl_{i}" for i in range(6)]
    building_run = f"{RUN}build"
    with janitor() as j:
        for age, name in enumerate(names):
            run = building_run if age == 4 else f"{RUN}r{age}"
            mark = Mark.template(base, f"fp{age}", run, ready=age != 4)
            j.create(name, Mark(**{**mark.__dict__, "time": now - 100 * age}))
    held = psycopg.connect(libpq_dsn(names[5]), autocommit=True)  # someone is cloning the oldest one
    lease = Lease(make_url(ADMIN_URL), building_run)  # a live run is still building names[4]
    try:
        with janitor() as j:
            dropped = prune_templates(j, base, current=names[0], keep=3)
    finally:
        held.close()
        lease.close()
    # Kept: the current one and the next two newest (keep=3), the one being built, the one in use.
    assert dropped == [names[3]]
    assert set(made_from(base, "template")) == set(names) - {names[3]}


def test_a_role_with_createdb_only_runs_shards_and_recovers_a_killed_ones_clones(pytester: pytest.Pytester) -> None:
    role = f"sa_rollback_selftest_{RUN}_createdb"
    base = new_base("role")
    with admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CREATEDB NOSUPERUSER").format(sql.Identifier(role)))
        conn.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(sql.Identifier(base), sql.Identifier(role)))
    try:
        url = make_url(ADMIN_URL).set(drivername="postgresql+psycopg", username=role, database=base)
        project = Project(pytester, url.render_as_string(hide_password=False))
        killed = project.start("killed", "-k", "hold", host="host-a")
        project.wait_ready("killed")
        killed.kill_group()
        left = set(made_from(base))
        assert len(left) == 2 and all(mark.host == "host-a" for mark in made_from(base).values())
        result = project.run("next", "-k", "group_a", "-n", "0", host="host-b")
        assert result.returncode == 0, result.output
        assert made_from(base) == {}
        assert made_from(base, "template")  # kept for the next run
        with admin() as conn:
            owners = conn.execute(
                "SELECT DISTINCT pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE %s", (base + "_sar%",)
            ).fetchall()
        assert owners == [(role,)]
    finally:
        with janitor() as j, warnings.catch_warnings():
            warnings.simplefilter("ignore", SaRollbackWarning)
            for name, mark in j.marked():
                if mark.base == base:
                    j.drop(name)
            j.conn.execute(j.conn.compose("DROP DATABASE IF EXISTS {} WITH (FORCE)", base))
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


GROUP = """
import os

import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("i", range(4))
def test_same_keys(db_session, i):
    # Every shard inserts the same primary keys: each must be in a database of its own.
    for key in (1, 2, 3):
        db_session.execute(sa.text("INSERT INTO users (id, name) VALUES (:id, 'x')"), {"id": key})
    db_session.commit()
    name = db_session.execute(sa.text("SELECT current_database()")).scalar()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["OUT_DIR"], f"db-{worker}.txt"), "a") as out:
        out.write(name + "\\n")
"""

HOLD = """
import os
import time

import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("i", range(2))  # one per worker
def test_hold(db_session, i):
    db_session.execute(sa.text("INSERT INTO users (id, name) VALUES (1, 'x')"))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    open(os.path.join(os.environ["OUT_DIR"], f"ready-{worker}"), "w").close()
    time.sleep(60)
"""


class Shard:
    def __init__(self, proc: subprocess.Popen[str], out: Path) -> None:
        self.proc = proc
        self.out = out

    def kill_group(self) -> None:
        """SIGKILL to the run and its workers, as the OOM killer or a CI runner that gives up."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    @property
    def output(self) -> str:
        return (self.out / "log.txt").read_text(errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def databases(self) -> set[str]:
        return {line for path in self.out.glob("db-*.txt") for line in path.read_text().split()}


class Project:
    """An inner suite of three groups and a held test, run as shards: each run an `-n 2` pytest process."""

    def __init__(self, pytester: pytest.Pytester, url: str) -> None:
        self.path = pytester.path
        pytester.makeconftest('pytest_plugins = ["sa_rollback"]\n')
        pytester.makefile(".sql", schema=USERS_SQL)
        pytester.makepyfile(test_group_a=GROUP, test_group_b=GROUP, test_group_c=GROUP, test_hold=HOLD)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SA_ROLLBACK", "PYTEST_XDIST"))}
        self.env.update(SA_ROLLBACK_URL=url, SA_ROLLBACK_SCHEMA="sql:schema.sql")
        self.shards: dict[str, Shard] = {}

    def start(self, name: str, *args: str, host: str = "") -> Shard:
        out = self.path / f"out-{name}"
        out.mkdir()
        env = dict(self.env, OUT_DIR=str(out))
        if host:
            env["SA_ROLLBACK_HOSTNAME"] = host
        with open(out / "log.txt", "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", *args],
                cwd=self.path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        self.shards[name] = Shard(proc, out)
        return self.shards[name]

    def run(self, name: str, *args: str, host: str = "") -> Shard:
        shard = self.start(name, *args, host=host)
        shard.proc.wait(timeout=120)
        return shard

    def wait_ready(self, name: str) -> None:
        shard = self.shards[name]
        deadline = time.monotonic() + 90
        while not all((shard.out / f"ready-{w}").exists() for w in ("gw0", "gw1")):
            assert shard.proc.poll() is None, shard.output
            assert time.monotonic() < deadline, shard.output
            time.sleep(0.05)


def test_three_shards_with_two_workers_each_share_one_server_safely(pytester: pytest.Pytester) -> None:
    base = new_base("shards")
    project = Project(
        pytester, make_url(ADMIN_URL).set(drivername="postgresql+psycopg", database=base).render_as_string(False)
    )
    started = time.monotonic()
    shards = [project.start(group, "-k", group) for group in ("group_a", "group_b", "group_c")]
    for shard in shards:
        shard.proc.wait(timeout=120)
        assert shard.returncode == 0, shard.output
        assert "4 passed" in shard.output, shard.output
    builds = sum(shard.output.count("sa_rollback: built template") for shard in shards)
    assert builds == 1, [shard.output for shard in shards]
    used = [shard.databases() for shard in shards]
    assert all(len(names) == 2 for names in used), used  # one clone per worker
    assert not (used[0] & used[1] or used[0] & used[2] or used[1] & used[2]), used
    assert made_from(base) == {}
    concurrent = time.monotonic() - started

    # Cancelled (SIGTERM to the run) and killed (SIGKILL to its process group), at once.
    cancelled = project.start("cancelled", "-k", "hold", host="host-t")
    killed = project.start("killed", "-k", "hold", host="host-k")
    project.wait_ready("cancelled")
    project.wait_ready("killed")
    with admin() as conn:
        leases = conn.execute(
            "SELECT application_name FROM pg_stat_activity WHERE application_name LIKE 'sa_rollback lease %'"
        ).fetchall()
    runs = {row[0] for row in leases}
    assert len(leases) >= 2 and all(sum(1 for row in leases if row[0] == run) == 1 for run in runs)  # one a run
    killed.kill_group()
    cancelled.proc.send_signal(signal.SIGTERM)
    assert cancelled.proc.wait(timeout=60) == 2, cancelled.output
    left = made_from(base)
    # The cancelled run's are gone. The killed one's lease is free now, so any run on this server
    # may drop its clones, a concurrent suite's included: here or in the next run, they go.
    assert {mark.host for mark in left.values()} <= {"host-k"} and len(left) <= 2, left

    after = project.run("after", "-k", "group_a", "-n", "0", host="host-z")
    assert after.returncode == 0, after.output
    assert made_from(base) == {}  # the killed shard's clones, dropped by a run on another "host"
    assert after.output.count("sa_rollback: built template") == 0
    print(f"three concurrent shards: {concurrent:.1f} s")


def test_no_connection_left_is_told_apart_with_the_arithmetic() -> None:
    # SQLSTATE 53300, from a role's CONNECTION LIMIT: the same message family as max_connections.
    role = f"sa_rollback_selftest_{RUN}_limited"
    with admin() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN CONNECTION LIMIT 1").format(sql.Identifier(role)))
    url = make_url(ADMIN_URL).set(username=role)
    try:
        with Janitor(url), pytest.raises(DatabaseSetupError) as caught, Janitor(url):
            pass
        text = str(caught.value)
        assert f"no connection left for user {role}" in text and "too many connections" in text
        assert "shards x (workers x databases + 1)" in text and "max_connections" in text
        assert "unreachable" not in text and "Start the server" not in text
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
