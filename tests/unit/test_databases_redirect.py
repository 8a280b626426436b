"""The redirect's matching of host, port and database name; no server needed."""

from __future__ import annotations

import pytest
from sqlalchemy.engine import make_url

from sa_rollback.databases._listeners import _Redirect


@pytest.mark.parametrize(
    ("configured", "cparams"),
    [
        ("postgresql://u@localhost:5432/app", {"host": "127.0.0.1", "port": 5432, "dbname": "app"}),
        ("postgresql://u@/app?host=/run/pg", {"host": "/run/pg", "dbname": "app"}),
        ("postgresql://u@db.example:6543/app", {"host": "db.example", "port": "6543", "dbname": "app"}),
    ],
)
def test_redirect_matches_host_port_and_name(configured: str, cparams: dict[str, object]) -> None:
    redirect = _Redirect()
    url = make_url(configured)
    redirect._installed = True  # route table only; no listener in this process
    redirect.add(url, "app", "app_clone")
    params = dict(cparams)
    redirect._on_connect(None, None, [], params)
    assert params["dbname"] == "app_clone"
    other = dict(cparams, dbname="other")
    redirect._on_connect(None, None, [], other)
    assert other["dbname"] == "other"
    elsewhere = dict(cparams, port="1")
    redirect._on_connect(None, None, [], elsewhere)
    assert elsewhere["dbname"] == "app"
