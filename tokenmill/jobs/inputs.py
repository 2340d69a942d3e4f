"""The job's input: which file (or stdin), which format, and its rows as (line number, JSON bytes).

Formats:
- JSON Lines, plain or compressed (gzip, zstd, bzip2, xz: detected by the file's magic bytes, whatever its name).
  Lines end with ``\\n``, ``\\r\\n`` or a lone ``\\r`` (universal newlines, so "line N" is the line an editor shows);
  a UTF-8 byte order mark at the start is skipped; blank lines are counted but skipped.
- CSV / TSV (by the name's ``.csv`` / ``.tsv`` before any compression suffix, or ``--input-format csv``) and
  Parquet (by its magic): one row per request, columns mapped to fields (``id``, ``prompt`` / ``messages`` or
  ``text``, and optionally the per-line sampling fields) by name or by ``--columns field=column,...``. A row becomes
  the equivalent JSON line, so it is validated exactly like one; its "line" is its row number (1 = first data row).
- ``-``: standard input, copied to a spool file first (the job reads its input twice and may resume).

UTF-16/32 and known binary formats (zip, PDF, SQLite, ...) are refused up front in one line.

The formats' readers live beside this module: ``input_jsonl.py`` (JSON Lines), ``input_tables.py`` (CSV / TSV and
Parquet: the header check and each row as the JSON line it stands for).

Invariant: an ``InputSource`` holds its file open for its whole life and every pass reads that open file, so an
input deleted (or replaced by rename) while the job runs does not change what the job reads.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenmill.jobs.errors import JobFault, JobSetupError

INPUT_FORMATS = ("auto", "jsonl", "csv", "parquet")
MAX_LINE_BYTES = 64 << 20  # a longer line is an error record (no prompt that long fits any model)
BLOCK = 1 << 20

RUN_FIELDS = ("id", "prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "continuation",
              "lora")
EMBED_FIELDS = ("id", "text")

_COMPRESSION_MAGIC = [(b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bzip2"),
                      (b"\xfd7zXZ\x00", "xz")]
_COMPRESSION_SUFFIXES = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_REFUSED_MAGIC = [
    (b"\xff\xfe\x00\x00", "UTF-32 text"), (b"\x00\x00\xfe\xff", "UTF-32 text"), (b"\xff\xfe", "UTF-16 text"),
    (b"\xfe\xff", "UTF-16 text"), (b"PK\x03\x04", "a zip archive (or .xlsx / .docx)"), (b"%PDF", "a PDF document"),
    (b"\x7fELF", "an executable"), (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"), (b"SQLite format 3\x00", "an SQLite database"),
    (b"ARROW1", "an Arrow IPC file"), (b"Obj\x01", "an Avro file"), (b"ORC", "an ORC file"),
]


@dataclass(frozen=True)
class BadRow:
    """A row that could not even be read as text (an over-long line, a broken CSV record): becomes an error record."""

    code: str
    message: str


RawRow = bytes | BadRow


@dataclass(frozen=True)
class InputSpec:
    """What the user asked for: a path or ``-``, a format (``auto`` sniffs it) and a column mapping for tables."""

    path: str
    format: str = "auto"
    columns: tuple[tuple[str, str], ...] = ()  # (field, column) pairs

    @property
    def is_stdin(self) -> bool:
        return self.path == "-"


def parse_columns(text: str | None, fields: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``"id=doc_id,prompt=question"`` -> (("id", "doc_id"), ("prompt", "question")); raises JobSetupError."""
    if not text:
        return ()
    pairs = []
    for item in text.split(","):
        field, sep, column = item.partition("=")
        field, column = field.strip(), column.strip()
        if not sep or not field or not column:
            raise JobSetupError(f"--columns expects field=column pairs separated by commas, got {item!r}")
        if field not in fields:
            raise JobSetupError(f"--columns: unknown field {field!r}; fields: {', '.join(fields)}")
        pairs.append((field, column))
    return tuple(pairs)


def _sniff(head: bytes) -> str | None:
    """A refusal reason for ``head`` (the first bytes after decompression), or None."""
    for magic, what in _REFUSED_MAGIC:
        if head.startswith(magic):
            return what
    probe = head[:64]
    if len(probe) >= 8 and (not any(probe[1::2]) or not any(probe[0::2])):
        return "UTF-16 text (every other byte is zero)"
    return None


class InputSource:
    """An opened input (see the module docstring). ``spool`` is where stdin is copied (the caller owns it)."""

    def __init__(self, spec: InputSpec, fields: tuple[str, ...] = RUN_FIELDS, spool: Path | None = None) -> None:
        if spec.format not in INPUT_FORMATS:
            raise JobSetupError(f"--input-format must be one of {', '.join(INPUT_FORMATS)}, got {spec.format!r}")
        self.spec = spec
        self.fields = fields
        self.num_lines = 0  # lines (or rows) seen by the last complete pass
        digest = hashlib.sha256()
        if spec.is_stdin:
            if spool is None:
                raise JobSetupError("reading stdin needs a spool file")
            if sys.stdin.isatty():
                raise JobSetupError("INPUT is - but stdin is a terminal; pipe the input in (… | tokenmill run - -o …)")
            self.path = spool
            self.display = "stdin"
            tmp = spool.with_name(f".{spool.name}.tmp")
            with open(tmp, "wb") as out:
                while block := sys.stdin.buffer.read(BLOCK):
                    digest.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, spool)
        else:
            self.path = Path(spec.path)
            self.display = spec.path
            if self.path.is_dir():
                raise JobSetupError(f"input {spec.path} is a directory, expected a file")
            if not self.path.exists():
                raise JobSetupError(f"input file {spec.path} does not exist")
            if not self.path.is_file():  # a pipe (shell process substitution, /dev/stdin): read once, never resumed
                raise JobSetupError(f"input {spec.path} is not a regular file (a pipe?); a job reads its input more "
                                    f"than once: pipe it to - (… | tokenmill run - -o …) or write it to a file")
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise JobSetupError(f"cannot read input {self.display}: {e.strerror}") from None
        st = os.fstat(self._file.fileno())
        if not spec.is_stdin:
            while block := self._file.read(BLOCK):
                digest.update(block)
        self.size, self.mtime, self.sha256 = st.st_size, st.st_mtime, digest.hexdigest()
        self.compression = self._detect_compression()
        self.format = self._detect_format()
        if self.format == "parquet" and self.compression:
            raise JobSetupError(f"input {self.display}: a compressed Parquet file; Parquet compresses itself, "
                                f"decompress the file first")
        head = self.open_stream().read(4096)
        if self.format != "parquet":
            reason = _sniff(head)
            if reason:
                raise JobSetupError(f"input {self.display} is {reason}; tokenmill reads UTF-8 JSON Lines (optionally "
                                    f"gzip/zstd/bzip2/xz compressed), CSV or Parquet")
        self.header = None  # a table's column names
        if self.format != "jsonl":
            from tokenmill.jobs.input_tables import table_columns  # (the format modules import this one)

            self.header = table_columns(self)

    # ---------------------------------------------------------------- identity and format
    def identity(self) -> dict:
        """What the manifest records: a resume must read the same bytes."""
        return {"path": "-" if self.spec.is_stdin else str(self.path.resolve()), "size": self.size,
                "mtime": self.mtime, "sha256": self.sha256, "format": self.format, "compression": self.compression}

    def _detect_compression(self) -> str | None:
        self._file.seek(0)
        head = self._file.read(8)
        return next((name for magic, name in _COMPRESSION_MAGIC if head.startswith(magic)), None)

    def _detect_format(self) -> str:
        if self.spec.format != "auto":
            return self.spec.format
        self._file.seek(0)
        if self._file.read(4) == b"PAR1":
            return "parquet"
        return "csv" if self.base_name().endswith((".csv", ".tsv")) else "jsonl"

    def base_name(self) -> str:
        """The input's name without a compression suffix, lower case ("" for stdin)."""
        name = "" if self.spec.is_stdin else self.path.name.lower()
        for suffix in _COMPRESSION_SUFFIXES:
            name = name.removesuffix(suffix)
        return name

    def open_stream(self):
        """A fresh binary stream of the (decompressed) content from the start of the held-open file."""
        self._file.seek(0)
        f = self._file
        try:
            if self.compression == "gzip":
                return gzip.GzipFile(fileobj=f, mode="rb")
            if self.compression == "bzip2":
                return bz2.BZ2File(f, "rb")
            if self.compression == "xz":
                return lzma.LZMAFile(f, "rb")
            if self.compression == "zstd":
                import zstandard

                return zstandard.ZstdDecompressor().stream_reader(f, closefd=False, read_across_frames=True)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise JobSetupError(f"input {self.display}: cannot decompress ({self.compression}): {e}") from None
        return _Uncloseable(f)

    # ---------------------------------------------------------------- rows
    def iter_lines(self) -> Iterator[tuple[int, RawRow]]:
        """Every row as (line number, raw JSON bytes or BadRow), blank lines included (as b""); sets num_lines."""
        from tokenmill.jobs.input_jsonl import jsonl_lines
        from tokenmill.jobs.input_tables import csv_rows, parquet_rows

        rows = {"jsonl": jsonl_lines, "csv": csv_rows, "parquet": parquet_rows}[self.format](self)
        n = 0
        try:
            for n, row in rows:
                yield n, row
        except (OSError, EOFError, lzma.LZMAError, ValueError) as e:  # a corrupt compressed stream, a torn Parquet
            raise JobFault(f"input {self.display} could not be read past line {n}: {e}") from None
        self.num_lines = n

    def raw_file(self):
        """The held-open file itself, at its start (Parquet reads it by offsets)."""
        self._file.seek(0)
        return self._file

    def shrank(self) -> bool:
        """Whether the file is now shorter than when it was opened (changed in place under the job)."""
        return os.fstat(self._file.fileno()).st_size < self.size

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Uncloseable(io.RawIOBase):
    """The held-open input file as a stream whose close() leaves the file open."""

    def __init__(self, f) -> None:
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._f.readinto(b)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)
