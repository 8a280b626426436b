"""Routes that commit, the way FastAPI services do: one session per request, commit at the end."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .db import get_session
from .models import Note

app = FastAPI()
Session = Annotated[AsyncSession, Depends(get_session)]


class NoteIn(BaseModel):
    title: str


class NoteOut(BaseModel):
    id: int
    title: str
    done: bool


def _out(note: Note) -> NoteOut:
    return NoteOut(id=note.id, title=note.title, done=note.done)


@app.post("/notes", status_code=201)
async def create_note(body: NoteIn, session: Session) -> NoteOut:
    note = Note(title=body.title)
    session.add(note)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(409, f"a note titled {body.title!r} exists") from None
    return _out(note)


@app.get("/notes")
async def list_notes(session: Session) -> list[NoteOut]:
    notes = (await session.scalars(select(Note).order_by(Note.title))).all()
    return [_out(note) for note in notes]


@app.post("/notes/{note_id}/done")
async def finish_note(note_id: int, session: Session) -> NoteOut:
    note = await session.get(Note, note_id)
    if note is None:
        raise HTTPException(404, "no such note")
    note.done = True
    await session.commit()
    return _out(note)
