"""The server's durable state for the OpenAI Batch API: uploaded files in ``STATE_DIR/files/``, their records and
the batches in one SQLite database (``STATE_DIR/state.db``, WAL journal); each batch's job files in
``STATE_DIR/batches/<id>/``.

Invariants:
- a file's row exists only once its bytes are complete on disk: an upload is copied (in 1 MiB pieces, never whole in
  memory) to a temporary name, fsynced, renamed to its final name, and only then registered, in one transaction; an
  upload that breaks off leaves no row, and its temporary file is removed (or, after a crash, at the next start);
- deleting a file removes its row first, then its bytes, so a row never points at nothing;
- ids are ``file-`` + 24 hex digits; listing is by upload order (``seq``), which the ``after`` cursor follows;
- a batch's status changes in one transaction with its timestamp (``<status>_at``), and only from the statuses the
  caller names, so a cancel racing a completion never produces a status that went backwards;
- a file that an unfinished batch reads cannot be deleted.
Every call opens its own connection, so the store may be used from any thread.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import BinaryIO

from tokenmill.jobs.files import JobPaths
from tokenmill.jobs.state import request_counts, try_read_status

FILE_PURPOSES = ("batch",)  # what a client may upload: batch input (a batch's output files are the server's own)
OUTPUT_PURPOSE = "batch_output"
BATCH_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
COMPLETION_WINDOW_S = {"24h": 24 * 3600}
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
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    input_file_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    metadata TEXT,
    model TEXT,
    status TEXT NOT NULL,
    total INTEGER NOT NULL DEFAULT 0,
    completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0,
    output_file_id TEXT,
    error_file_id TEXT,
    errors TEXT,
    usage TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER, failed_at INTEGER, expired_at INTEGER,
    cancelling_at INTEGER, cancelled_at INTEGER
);
"""
_STATUS_TIME = {s: f"{s}_at" for s in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
                                        "cancelled")}


def default_state_dir() -> Path:
    """``$XDG_DATA_HOME/tokenmill/serve`` (``~/.local/share/tokenmill/serve`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "tokenmill" / "serve"


def file_object(row: sqlite3.Row) -> dict:
    """A files row in the OpenAI API's ``file`` shape."""
    return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
            "filename": row["filename"], "purpose": row["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


def batch_object(row: sqlite3.Row) -> dict:
    """A batches row in the OpenAI API's ``batch`` shape."""
    errors = json.loads(row["errors"]) if row["errors"] else None
    obj = {"id": row["id"], "object": "batch", "endpoint": row["endpoint"],
           "errors": {"object": "list", "data": errors} if errors else None,
           "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
           "status": row["status"], "output_file_id": row["output_file_id"], "error_file_id": row["error_file_id"],
           "created_at": row["created_at"], "expires_at": row["expires_at"]}
    obj.update({col: row[col] for col in _STATUS_TIME.values()})
    obj["request_counts"] = {"total": row["total"], "completed": row["completed"], "failed": row["failed"]}
    obj["metadata"] = json.loads(row["metadata"]) if row["metadata"] else None
    obj["model"] = row["model"]
    obj["usage"] = json.loads(row["usage"]) if row["usage"] else None
    return obj


def with_live_counts(batch: dict, state: dict | None) -> dict:
    """A running batch with the request counts of its job's state file (``state``; the store has them once it
    ends)."""
    if state is None or batch["status"] not in ("in_progress", "finalizing", "cancelling"):
        return batch
    counts = request_counts(state)
    counts["total"] = max(batch["request_counts"]["total"], counts["total"])  # (a resume: the store's total, from the
    # first validation pass, until this run's pass is done)
    return {**batch, "request_counts": counts}


class FileInUse(Exception):
    pass


class StateStore:
    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir)
        self.files_dir = self.dir / "files"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.dir / "state.db"
        with closing(self._connect()) as db, db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {r["name"] for r in db.execute("PRAGMA table_info(batches)")}
            if "usage" not in columns:  # a state dir from before batches had usage
                db.execute("ALTER TABLE batches ADD COLUMN usage TEXT")
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
        """Removes the file; False if there was none; ``FileInUse`` (with the batch id) while an unfinished batch
        reads it."""
        with closing(self._connect()) as db, db:
            user = db.execute(f"SELECT id FROM batches WHERE input_file_id = ? AND status IN "
                              f"({','.join('?' * len(UNFINISHED))})", (file_id, *UNFINISHED)).fetchone()
            if user is not None:
                raise FileInUse(user["id"])
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if gone:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(gone)

    def register_file(self, src: Path, filename: str, purpose: str, db: sqlite3.Connection) -> str:
        """A file the server wrote (a batch's output or errors) as a file of the store, linked (not copied) when the
        file system allows; the row is inserted on ``db``, inside the caller's transaction. Returns its id."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        final = self.file_path(file_id)
        try:
            os.link(src, final)
        except OSError:
            tmp = self.files_dir / f"{_TMP_PREFIX}{file_id}"
            shutil.copyfile(src, tmp)
            os.replace(tmp, final)
        db.execute("INSERT INTO files (id, bytes, created_at, filename, purpose) VALUES (?, ?, ?, ?, ?)",
                   (file_id, final.stat().st_size, int(time.time()), filename, purpose))
        return file_id

    # ---------------------------------------------------------------- batches
    def batch_dir(self, batch_id: str) -> Path:
        return self.dir / "batches" / batch_id

    def batch_output(self, batch_id: str) -> Path:
        """Where a batch's job writes its results (its state file, errors and manifest beside it)."""
        return self.batch_dir(batch_id) / "output.jsonl"

    def batch_state(self, batch_id: str) -> dict | None:
        """The state file of the batch's job, or None before it has one."""
        return try_read_status(JobPaths(self.batch_output(batch_id)).state)

    def add_batch(self, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None,
                  model: str | None) -> dict:
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        with closing(self._connect()) as db, db:
            db.execute("INSERT INTO batches (id, input_file_id, endpoint, completion_window, metadata, model, status, "
                       "created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, 'validating', ?, ?)",
                       (batch_id, input_file_id, endpoint, completion_window,
                        json.dumps(metadata) if metadata else None, model, now,
                        now + COMPLETION_WINDOW_S[completion_window]))
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> dict | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return batch_object(row) if row is not None else None

    def list_batches(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Batches newest first, those created before the batch ``after`` only, at most ``limit``; returns (the
        batches, whether more follow). An unknown ``after`` is a KeyError."""
        with closing(self._connect()) as db:
            where, args = "", []
            if after is not None:
                row = db.execute("SELECT seq FROM batches WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                where, args = " WHERE seq < ?", [row["seq"]]
            rows = db.execute(f"SELECT * FROM batches{where} ORDER BY seq DESC LIMIT ?", (*args, limit + 1)).fetchall()
        return [batch_object(r) for r in rows[:limit]], len(rows) > limit

    def unfinished_batches(self) -> list[dict]:
        """Batches not in a final status, oldest first (the order they run in)."""
        with closing(self._connect()) as db:
            rows = db.execute(f"SELECT * FROM batches WHERE status IN ({','.join('?' * len(UNFINISHED))}) "
                              f"ORDER BY seq", UNFINISHED).fetchall()
        return [batch_object(r) for r in rows]

    def set_batch_status(self, batch_id: str, status: str, only_from: tuple[str, ...], **fields) -> bool:
        """Moves a batch to ``status`` (setting its timestamp, and ``fields``: counts, file ids, errors) if its
        status is one of ``only_from``; returns whether it did. ``files``: {column: (path, filename)}, each registered
        as a ``batch_output`` file in the same transaction, its id set in that column."""
        files = fields.pop("files", {})
        with closing(self._connect()) as db, db:
            row = db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
            if row is None or row["status"] not in only_from:
                return False
            for column, (path, filename) in files.items():
                fields[column] = self.register_file(path, filename, OUTPUT_PURPOSE, db)
            for column in ("errors", "usage"):
                if column in fields:
                    fields[column] = json.dumps(fields[column]) if fields[column] else None
            if status in _STATUS_TIME:
                fields[_STATUS_TIME[status]] = int(time.time())
            sets = ", ".join(f"{k} = ?" for k in ["status", *fields])
            db.execute(f"UPDATE batches SET {sets} WHERE id = ?", (status, *fields.values(), batch_id))
        return True

    def set_batch_counts(self, batch_id: str, total: int, completed: int, failed: int) -> None:
        with closing(self._connect()) as db, db:
            db.execute("UPDATE batches SET total = ?, completed = ?, failed = ? WHERE id = ?",
                       (total, completed, failed, batch_id))
