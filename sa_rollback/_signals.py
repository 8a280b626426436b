"""SIGTERM as an orderly interrupt, while the plugin is active.

CI systems cancel a job, or end one that ran out of time, with SIGTERM. Python's
default for it is to die at once: no ``finally``, no session finish, so the
run's test databases stay on the server and the embedded server is left to its
watchdog. Turned into ``KeyboardInterrupt``, it ends the run as Ctrl-C does:
pytest reports it, and every clean-up runs. Only when nobody else handles
SIGTERM: a handler of the user's, or of another plugin, is left as it is.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Callable, Optional

import pytest

#: puts the SIGTERM handler back at the end of the run (None: the plugin installed none)
restore_key = pytest.StashKey[Optional[Callable[[], None]]]()


class Terminated(KeyboardInterrupt):
    """The run got SIGTERM (a cancelled or timed-out CI job): it ends as after Ctrl-C."""


def _on_sigterm(signum: int, frame: Optional[FrameType]) -> None:
    # A second SIGTERM, while the clean-up runs, ends the process at once, as it would have.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated("SIGTERM: sa_rollback ends the run in order and drops its databases")


def install() -> Optional[Callable[[], None]]:
    """Handle SIGTERM if nothing else does; returns what puts things back (None: nothing was changed)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return None

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    signal.signal(signal.SIGTERM, _on_sigterm)
    return restore
