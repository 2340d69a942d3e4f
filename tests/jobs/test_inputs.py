"""The input layer without a model: formats, compression, line ends, BOM, refusals, tables, stdin, held-open file."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tokenmill.jobs import inputs
from tokenmill.jobs.errors import JobSetupError
from tokenmill.jobs.inputs import EMBED_FIELDS, RUN_FIELDS, BadRow, InputSource, InputSpec, parse_columns

ROWS = [{"id": f"r{i}", "prompt": f"prompt number {i}"} for i in range(5)]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


def rows_of(path, fields=RUN_FIELDS, **spec) -> list[tuple[int, object]]:
    with InputSource(InputSpec(str(path), **spec), fields) as src:
        out = [(n, r if isinstance(r, BadRow) else json.loads(r)) for n, r in src.iter_lines()
               if not (isinstance(r, bytes) and not r.strip())]
        assert src.num_lines >= len(out)
        return out


def expected():
    return [(i + 1, r) for i, r in enumerate(ROWS)]


@pytest.mark.parametrize("name,compress", [
    ("in.jsonl", lambda b: b),
    ("in.jsonl.gz", gzip.compress),
    ("in.jsonl.bz2", bz2.compress),
    ("in.jsonl.xz", lzma.compress),
    ("in.jsonl.zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
    ("no_suffix_but_gzip.jsonl", gzip.compress),  # detected by content, not by name
])
def test_jsonl_plain_and_compressed_read_the_same_rows(tmp_path, name, compress):
    p = tmp_path / name
    p.write_bytes(compress(JSONL))
    assert rows_of(p) == expected()


@pytest.mark.parametrize("sep", [b"\n", b"\r\n", b"\r"])
def test_line_ends_and_bom(tmp_path, sep):
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + sep.join(json.dumps(r).encode() for r in ROWS) + sep)
    assert rows_of(p) == expected()


def test_line_numbers_count_blank_lines_and_mixed_ends(tmp_path):
    p = tmp_path / "in.jsonl"
    r = [json.dumps(x).encode() for x in ROWS]
    p.write_bytes(r[0] + b"\r\n\n" + r[1] + b"\r\r" + r[2] + b"\n   \n" + r[3] + b"\r" + r[4])  # no final newline
    assert [n for n, _ in rows_of(p)] == [1, 3, 5, 7, 8]


def test_a_line_split_across_read_blocks_and_an_over_long_line(tmp_path, monkeypatch):
    monkeypatch.setattr(inputs, "BLOCK", 7)  # lines and \r\n pairs straddle block boundaries
    p = tmp_path / "in.jsonl"
    p.write_bytes(b"\r\n".join(json.dumps(x).encode() for x in ROWS))
    assert rows_of(p) == expected()
    monkeypatch.setattr(inputs, "MAX_LINE_BYTES", 64)
    long = json.dumps({"id": "long", "prompt": "x" * 500}).encode()
    p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + long + b"\n" + json.dumps(ROWS[1]).encode() + b"\n")
    got = rows_of(p)
    assert got[0] == (1, ROWS[0]) and got[2] == (3, ROWS[1])
    assert got[1][0] == 2 and isinstance(got[1][1], BadRow) and got[1][1].code == "line_too_long"


@pytest.mark.parametrize("data,what", [
    ("é,é\n".encode("utf-16"), "UTF-16"),
    ('{"id": 1}\n'.encode("utf-16-le"), "UTF-16"),
    ('{"id": 1}\n'.encode("utf-32"), "UTF-32"),
    (b"PK\x03\x04rest of a zip", "zip"),
    (b"%PDF-1.7\n", "PDF"),
    (b"SQLite format 3\x00....", "SQLite"),
    (gzip.compress(b"PK\x03\x04a zip inside gzip"), "zip"),
])
def test_unreadable_formats_are_refused_up_front_in_one_line(tmp_path, data, what):
    p = tmp_path / "in.jsonl"
    p.write_bytes(data)
    with pytest.raises(JobSetupError) as e:
        InputSource(InputSpec(str(p)))
    assert what in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(JobSetupError, match="does not exist"):
        InputSource(InputSpec(str(tmp_path / "nope.jsonl")))
    with pytest.raises(JobSetupError, match="is a directory"):
        InputSource(InputSpec(str(tmp_path)))
    import os

    os.mkfifo(tmp_path / "pipe")  # what `tokenmill run <(...)` passes: refused before it is opened (no hang)
    with pytest.raises(JobSetupError, match="not a regular file .* pipe it to -"):
        InputSource(InputSpec(str(tmp_path / "pipe")))


def test_csv_with_column_mapping_types_and_bad_records(tmp_path):
    p = tmp_path / "in.csv"
    p.write_bytes(
        "\ufeffdoc,question,max_tokens,temperature,stop,extra\n"
        'a,"Hello, world",5,0.5,"[""x"", ""y""]",ignored\n'
        "b,Second,,,,\n"
        ",,,,,\n"
        'c,"multi\nline prompt",3,0,.,\n'.encode())
    cols = parse_columns("id=doc,prompt=question", RUN_FIELDS)
    got = rows_of(p, columns=cols)
    assert got == [
        (1, {"id": "a", "prompt": "Hello, world", "max_tokens": 5, "temperature": 0.5, "stop": ["x", "y"]}),
        (2, {"id": "b", "prompt": "Second"}),
        (4, {"id": "c", "prompt": "multi\nline prompt", "max_tokens": 3, "temperature": 0.0, "stop": "."}),
    ]
    with pytest.raises(JobSetupError, match="no column 'nope'"):
        InputSource(InputSpec(str(p), columns=parse_columns("prompt=nope", RUN_FIELDS)))
    with pytest.raises(JobSetupError, match="needs an id column"):
        InputSource(InputSpec(str(p)))  # columns are doc / question: nothing maps without --columns
    with pytest.raises(JobSetupError, match="unknown field"):
        parse_columns("prmopt=question", RUN_FIELDS)


def test_tsv_gz_by_name(tmp_path):
    p = tmp_path / "in.tsv.gz"
    p.write_bytes(gzip.compress(b"id\ttext\n1\tfirst text\n2\tsecond\n"))
    assert rows_of(p, EMBED_FIELDS) == [(1, {"id": "1", "text": "first text"}), (2, {"id": "2", "text": "second"})]


def test_parquet_by_content_with_native_types(tmp_path):
    p = tmp_path / "data.bin"  # detected by its magic, not its name
    table = pa.table({"id": [1, 2, 3], "messages": [json.dumps([{"role": "user", "content": "hi"}]), None, None],
                      "prompt": [None, "plain", "third"], "max_tokens": [None, 7, None],
                      "temperature": [None, None, float("nan")]})
    pq.write_table(table, p)
    got = rows_of(p)
    assert got[0] == (1, {"id": 1, "messages": [{"role": "user", "content": "hi"}]})
    assert got[1] == (2, {"id": 2, "prompt": "plain", "max_tokens": 7})
    assert got[2][0] == 3 and isinstance(got[2][1], BadRow) and got[2][1].code == "invalid_sampling"


def test_stdin_is_spooled_and_hashed(tmp_path, monkeypatch):
    class FakeStdin(io.TextIOWrapper):
        def isatty(self):
            return False

    monkeypatch.setattr(sys, "stdin", FakeStdin(io.BytesIO(JSONL)))
    spool = tmp_path / "out.stdin"
    with InputSource(InputSpec("-"), spool=spool) as src:
        assert [json.loads(r) for _, r in src.iter_lines()] == ROWS
        assert src.identity()["path"] == "-" and src.identity()["sha256"] == hashlib.sha256(JSONL).hexdigest()
    assert spool.read_bytes() == JSONL


def test_the_input_is_read_through_the_held_open_file(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_bytes(JSONL)
    with InputSource(InputSpec(str(p))) as src:
        p.unlink()  # deleted (or replaced by rename) after the job opened it: both passes still read it
        assert len(list(src.iter_lines())) == 5
        assert len(list(src.iter_lines())) == 5
        assert src.identity()["size"] == len(JSONL)
