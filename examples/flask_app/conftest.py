"""The example's root conftest: one line enables sa_rollback, the rest is ordinary app setup.

No database configuration: sa_rollback starts an embedded PostgreSQL, gives each
xdist worker its own databases, and rolls back every test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from notes_app import create_app, db

pytest_plugins = ["sa_rollback"]


@pytest.fixture(scope="session")
def app(sa_rollback_url: str, sa_rollback_make_database: Any) -> Iterator[Flask]:
    """The application on this worker's databases, with its schema (session scope: real commits)."""
    application = create_app(
        {
            "TESTING": True,
            "SQLALCHEMY_DATABASE_URI": sa_rollback_url,
            "SQLALCHEMY_BINDS": {"audit": sa_rollback_make_database("audit")},
        }
    )
    with application.app_context():
        db.create_all()
    yield application


@pytest.fixture(scope="session")
def _db(app: Flask) -> Any:
    """pytest-flask-sqlalchemy's convention: the `db` object; `db_session` is then `db.session`."""
    return db


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def app_context(app: Flask) -> Iterator[None]:
    with app.app_context():
        yield
