"""The server's durable state for the OpenAI Batch API: uploaded files in ``STATE_DIR/files/``, their records in one
SQLite database (``STATE_DIR/state.db``, WAL journal).

Invariants:
- a file's row exists only once its bytes are complete on disk: an upload is copied (in 1 MiB pieces, never whole in
  memory) to a temporary name, fsynced, renamed to its final name, and only then registered, in one transaction; an
  upload that breaks off leaves no row, and its temporary file is removed (or, after a crash, at the next start);
- deleting a file removes its row first, then its bytes, so a row never points at nothing;
- ids are ``file-`` + 24 hex digits; listing is by upload order (``seq``), which the ``after`` cursor follows.
Every call opens its own connection, so the store may be used from any thread.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

FILE_PURPOSES = ("batch",)  # what a client may upload: batch input (a batch's output files are the server's own)
_TMP_PREFIX = ".upload-"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    bytes INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    filename TEXT NOT NULL,
    purpose TEXT NOT NULL
);
"""


def default_state_dir() -> Path:
    """``$XDG_DATA_HOME/tokenmill/serve`` (``~/.local/share/tokenmill/serve`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tokenmill" / "serve"


def file_object(row: sqlite3.Row) -> dict:
    """A files row in the OpenAI API's ``file`` shape."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "state.db"
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        for leftover in self.files_dir.glob(f"{_TMP_PREFIX}*"):  # an upload a crash broke off
            leftover.unlink(missing_ok=True)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    # ---------------------------------------------------------------- files
    def add_file(self, src: BinaryIO, filename: str, purpose: str) -> dict:
        """Copies ``src`` (read to its end) into the store and registers it; returns its file object."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        tmp = self.files_dir / f"{_TMP_PREFIX}{file_id}"
        final = self.file_path(file_id)
        try:
            with open(tmp, "wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
                f.flush()
                os.fsync(f.fileno())
                size = f.tell()
            os.replace(tmp, final)
            with closing(self._connect()) as db, db:
                db.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                           (file_id, size, int(time.time()), filename, purpose))
        except BaseException:
            tmp.unlink(missing_ok=True)
            final.unlink(missing_ok=True)
            raise
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return file_object(row) if row is not None else None

    def list_files(self, purpose: str | None = None, after: str | None = None, limit: int = 10000,
                   order: str = "desc") -> tuple[list[dict], bool]:
        """Files in upload order (``order`` "asc" or "desc"), those past the file ``after`` only, at most ``limit``;
        returns (the files, whether more follow). An unknown ``after`` is a KeyError."""
        where, args = [], []
        if purpose is not None:
            where.append("purpose = ?")
            args.append(purpose)
        with closing(self._connect()) as db:
            if after is not None:
                row = db.execute("SELECT seq FROM files WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where.append("seq < ?" if order == "desc" else "seq > ?")
                args.append(row["seq"])
            sql = "SELECT * FROM files" + (" WHERE " + " AND ".join(where) if where else "")
            sql += f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?"
            rows = db.execute(sql, (*args, limit + 1)).fetchall()
        return [file_object(r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        """Removes the file; False if there was none."""
        with closing(self._connect()) as db, db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if gone:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)
