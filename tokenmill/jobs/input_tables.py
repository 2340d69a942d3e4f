"""Table inputs, CSV / TSV and Parquet (``jobs/inputs.InputSource`` reads those formats through this): the header
checked against the fields (``--columns`` mapping), and each row encoded as the JSON line it stands for, so it is
validated exactly like one."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterator

from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs import inputs  # MAX_LINE_BYTES read at each call (one definition, there)
from tokenmill.jobs.inputs import BadRow, RawRow

_INT_FIELDS = ("max_tokens", "seed")
_FLOAT_FIELDS = ("temperature", "top_p")
_TEXT_FIELDS = ("prompt", "text")


def table_columns(source) -> list[str]:
    """The table's column names; raises JobSetupError when a needed field has no column."""
    if source.format == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.ParquetFile(source.raw_file()).schema_arrow.names
        except Exception as e:  # pyarrow raises ArrowInvalid & co for a broken file
            raise JobSetupError(f"input {source.display} is not a readable Parquet file: {e}") from None
    else:
        reader = csv.reader(_csv_text(source), dialect=_dialect(source))
        try:
            names = next(reader, [])
        except csv.Error as e:
            raise JobSetupError(f"input {source.display}: cannot read the CSV header: {e}") from None
    mapping = dict(source.spec.columns)
    for field, column in mapping.items():
        if column not in names:
            raise JobSetupError(f"--columns {field}={column}: input {source.display} has no column {column!r} "
                                f"(columns: {', '.join(names[:20])})")
    present = {f for f in source.fields if mapping.get(f, f) in names}
    needs = "text" if "text" in source.fields else "prompt or messages"
    if "id" not in present or not present & {"prompt", "messages", "text"}:
        raise JobSetupError(f"input {source.display} has columns {', '.join(names[:20])}; it needs an id column and "
                            f"a {needs} column: name them so or map them with --columns id=COL,...")
    return names

def _column_of(source) -> dict[str, str]:
    mapping = dict(source.spec.columns)
    return {f: mapping.get(f, f) for f in source.fields if mapping.get(f, f) in source.header}

def _dialect(source):
    return csv.excel_tab if source.base_name().endswith(".tsv") else csv.excel

def _csv_text(source):
    return io.TextIOWrapper(source.open_stream(), encoding="utf-8-sig", errors="surrogateescape", newline="")

def csv_rows(source) -> Iterator[tuple[int, RawRow]]:
    csv.field_size_limit(inputs.MAX_LINE_BYTES)
    cols = _column_of(source)
    reader = csv.reader(_csv_text(source), dialect=_dialect(source))
    header = next(reader, None)
    if header is None:
        return
    index = {name: i for i, name in enumerate(header)}
    row_no = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            row_no += 1
            yield row_no, BadRow("invalid_csv", f"line {row_no}: not a valid CSV record: {e}")
            continue
        row_no += 1
        if not any(v.strip() for v in values):
            yield row_no, b""
            continue
        row = {f: values[index[c]] for f, c in cols.items() if index[c] < len(values)}
        yield row_no, _encode_row(row, from_text=True, line_no=row_no)

def parquet_rows(source) -> Iterator[tuple[int, RawRow]]:
    import pyarrow.parquet as pq

    cols = _column_of(source)
    f = pq.ParquetFile(source.raw_file())
    row_no = 0
    for batch in f.iter_batches(batch_size=1024, columns=sorted(set(cols.values()))):
        data = {f: batch.column(c).to_pylist() for f, c in cols.items()}
        for i in range(batch.num_rows):
            row_no += 1
            yield row_no, _encode_row({f: v[i] for f, v in data.items()}, from_text=False, line_no=row_no)


def _encode_row(row: dict, from_text: bool, line_no: int) -> RawRow:
    """A table row -> the JSON line it stands for. Missing values (None, NaN, empty cells of non-text fields) are left
    out; CSV cells are strings, so numbers and JSON values (messages, a stop list) are parsed from them."""
    out = {}
    for field, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value) and field not in _FLOAT_FIELDS):
            continue
        if from_text and field not in _TEXT_FIELDS and field != "id":
            if value.strip() == "":
                continue
            value = _parse_cell(field, value)
        elif not from_text and field in ("messages", "stop") and isinstance(value, str) and value.lstrip()[:1] in "[{":
            value = _json_or_text(value)
        out[field] = value
    try:
        return json.dumps(out, ensure_ascii=False, default=str, allow_nan=False).encode("utf-8", "surrogateescape")
    except ValueError:  # a NaN / infinite float left in a sampling field
        bad = next(f for f, v in out.items() if isinstance(v, float) and not math.isfinite(v))
        return BadRow("invalid_sampling", f"line {line_no}: {bad} must be a finite number, got {out[bad]!r}")


def _parse_cell(field: str, text: str):
    s = text.strip()
    if field in _INT_FIELDS:
        try:
            return int(s)
        except ValueError:
            return text
    if field in _FLOAT_FIELDS:
        try:
            return float(s)
        except ValueError:
            return text
    if field in ("messages", "stop") and s[:1] in "[{\"":
        return _json_or_text(s)
    return text


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s
