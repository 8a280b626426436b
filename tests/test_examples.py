"""The examples run with zero database configuration, serially and under xdist."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import _servers as servers

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
#: each example, and how many tests it has
COUNTS = {"flask_app": 13, "fastapi_app": 6}


@pytest.fixture(scope="module")
def server_dir() -> Iterator[Path]:
    """The embedded server's data directory for this module: cold for the first run, warm for the next.

    Not under pytest's tmp_path: as root the server's user must traverse the directory (see _servers).
    """
    with servers.server_dir() as path:
        yield path


@pytest.mark.parametrize("example", sorted(COUNTS))
@pytest.mark.parametrize("extra", [(), ("-n", "2")], ids=["serial", "xdist"])
def test_example_passes_with_zero_configuration(example: str, extra: tuple[str, ...], server_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SA_ROLLBACK", "PYTEST_"))}
    env["SA_ROLLBACK_SERVER_DIR"] = str(server_dir)  # the suite never writes into the user's ~/.cache/sa_rollback
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLES / example), "-q", "-p", "no:cacheprovider", *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{COUNTS[example]} passed" in output, output
