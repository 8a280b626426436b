"""A small Flask-SQLAlchemy 3 application: notes, plus an audit log in a second database."""

from __future__ import annotations

import os
from typing import Any, Optional

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


def create_app(config: Optional[dict[str, Any]] = None) -> Flask:
    """The application factory: one app (and one engine per database) per call."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "postgresql://localhost/notes")
    app.config["SQLALCHEMY_BINDS"] = {"audit": os.environ.get("AUDIT_DATABASE_URL", "postgresql://localhost/audit")}
    app.config.update(config or {})
    db.init_app(app)

    from . import views

    app.register_blueprint(views.bp)
    return app
