"""Views that commit, as real applications do."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, abort, jsonify, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from . import db
from .models import AuditEntry, Note, Notebook

bp = Blueprint("notes", __name__)


def audit(action: str) -> None:
    db.session.add(AuditEntry(action=action))


@bp.post("/notebooks")
def create_notebook() -> Any:
    title = request.get_json()["title"]
    notebook = Notebook(title=title)
    db.session.add(notebook)
    try:
        db.session.commit()
    except IntegrityError:
        db.session.rollback()
        return jsonify(error=f"notebook {title!r} exists"), 409
    audit(f"created notebook {title}")
    db.session.commit()
    return jsonify(id=notebook.id, title=notebook.title), 201


@bp.get("/notebooks")
def list_notebooks() -> Any:
    rows = db.session.scalars(select(Notebook).order_by(Notebook.title)).all()
    return jsonify([{"id": n.id, "title": n.title, "notes": len(n.notes)} for n in rows])


@bp.post("/notebooks/<int:notebook_id>/notes")
def add_note(notebook_id: int) -> Any:
    notebook = db.session.get(Notebook, notebook_id) or abort(404)
    note = Note(notebook=notebook, body=request.get_json()["body"])
    db.session.add(note)
    audit(f"added note to {notebook.title}")
    db.session.commit()
    return jsonify(id=note.id), 201


@bp.delete("/notebooks/<int:notebook_id>")
def delete_notebook(notebook_id: int) -> Any:
    notebook = db.session.get(Notebook, notebook_id) or abort(404)
    db.session.delete(notebook)
    audit(f"deleted notebook {notebook.title}")
    db.session.commit()
    return "", 204


@bp.get("/audit")
def audit_log() -> Any:
    return jsonify([e.action for e in db.session.scalars(select(AuditEntry).order_by(AuditEntry.id))])
