"""Source text of the small projects that the plugin tests run inside pytest."""

#: a conftest's start: Flask-SQLAlchemy's ``db``, an ``Item`` model on the suite's ``items``
#: table, and a module-scoped ``app`` fixture that keeps an app context for the whole module
FLASK_APP = """
import os
import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy

db = SQLAlchemy()


class Item(db.Model):
    __tablename__ = "items"
    id = db.Column(db.Integer, primary_key=True)
    name = db.Column(db.String, nullable=False)
    qty = db.Column(db.Integer, nullable=False, default=0)


@pytest.fixture(scope="module")
def app():
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = os.environ["INNER_URL"]
    db.init_app(app)
    with app.app_context():
        yield app
"""
