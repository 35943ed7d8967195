"""Saved conversations: one SQLite file under the XDG data dir.

Each call opens its own connection, so the UI thread and worker threads share the store
without sharing a connection; a conversation is small, so saving rewrites its messages."""
from __future__ import annotations

import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from .. import config
from .conversation import ChatMessage, Conversation

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    id INTEGER PRIMARY KEY,
    title TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL,
    system TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    finish_reason TEXT,
    model TEXT,
    created REAL NOT NULL,
    PRIMARY KEY (conversation_id, position)
);
"""


def default_path() -> Path:
    return config.data_dir() / "chats.sqlite3"


@dataclass(frozen=True)
class ConversationSummary:
    id: int
    title: str
    model: str
    updated: float
    messages: int


class ChatHistory:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.notice: str | None = None  # what the chat tells the user about the store, once
        try:
            self._create()
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):  # locked, read-only, no space: not the file's fault
                raise
            # not an SQLite file, or a damaged one: kept aside (never deleted), a new store started
            kept = self.path.with_name(f"{self.path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
            try:
                self.path.rename(kept)
            except FileNotFoundError:  # another chat moved it first
                pass
            self._create()
            self.notice = f"the saved conversations in {self.path} could not be read ({e}); that file is kept as " \
                          f"{kept.name} and a new one was started"

    def _create(self) -> None:
        with closing(self._connect()) as db, db:
            db.executescript(_SCHEMA)
            db.execute("SELECT COUNT(*) FROM conversations").fetchone()  # a damaged table fails here

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=5.0)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def save(self, conv: Conversation) -> int:
        """Insert or update ``conv`` (setting its id) and return the id."""
        conv.updated = time.time()
        with closing(self._connect()) as db, db:
            row = (conv.title, conv.model, conv.system, conv.created, conv.updated)
            if conv.id is None:
                conv.id = db.execute(
                    "INSERT INTO conversations (title, model, system, created, updated) VALUES (?, ?, ?, ?, ?)", row
                ).lastrowid
            else:
                cur = db.execute("UPDATE conversations SET title=?, model=?, system=?, created=?, updated=? WHERE id=?",
                                 (*row, conv.id))
                if cur.rowcount == 0:  # deleted meanwhile: store it again under the same id
                    db.execute("INSERT INTO conversations (id, title, model, system, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
                               (conv.id, *row))
            db.execute("DELETE FROM messages WHERE conversation_id=?", (conv.id,))
            db.executemany(
                "INSERT INTO messages (conversation_id, position, role, content, finish_reason, model, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(conv.id, i, m.role, m.content, m.finish_reason, m.model, m.created) for i, m in enumerate(conv.messages)],
            )
        return conv.id

    def load(self, conv_id: int) -> Conversation | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT id, title, model, system, created, updated FROM conversations WHERE id=?",
                             (conv_id,)).fetchone()
            if row is None:
                return None
            msgs = db.execute(
                "SELECT role, content, finish_reason, model, created FROM messages WHERE conversation_id=? ORDER BY position",
                (conv_id,),
            ).fetchall()
        cid, title, model, system, created, updated = row
        return Conversation(model=model, system=system, messages=[ChatMessage(*m) for m in msgs], id=cid, title=title,
                            created=created, updated=updated)

    def latest(self) -> Conversation | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT id FROM conversations ORDER BY updated DESC, id DESC LIMIT 1").fetchone()
        return self.load(row[0]) if row else None

    def summaries(self, limit: int = 500) -> list[ConversationSummary]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.model, c.updated, COUNT(m.position) FROM conversations c "
                "LEFT JOIN messages m ON m.conversation_id = c.id GROUP BY c.id ORDER BY c.updated DESC, c.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [ConversationSummary(*r) for r in rows]

    def delete(self, conv_id: int) -> bool:
        with closing(self._connect()) as db, db:
            return db.execute("DELETE FROM conversations WHERE id=?", (conv_id,)).rowcount > 0


class NoHistory:
    """Stands in for a ChatHistory that could not be opened (locked, read-only, no space): the
    chat runs, nothing is saved, and each save says why."""

    def __init__(self, reason: str):
        self.reason = reason
        self.notice = f"conversations are not saved this time: {reason}"

    def save(self, conv: Conversation) -> int:
        raise RuntimeError(self.reason)

    def load(self, conv_id: int) -> Conversation | None:
        return None

    def latest(self) -> Conversation | None:
        return None

    def summaries(self, limit: int = 500) -> list[ConversationSummary]:
        return []

    def delete(self, conv_id: int) -> bool:
        return False
