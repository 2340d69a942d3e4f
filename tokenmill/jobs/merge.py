"""``tokenmill merge``: partition outputs back into one results file (and one errors file), in input order.

With the input, every line is accounted for exactly once: its id has one result, or its line has one error record.
Results are held as raw lines keyed by id while merging. A part that does not exist is a set-up error (exit 2)
found before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.jobs.files import JobPaths, write_lines_atomic
from tokenmill.jobs.records import id_key
from tokenmill.jobs.results import output_id_key


def _read_jsonl(path: Path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line.rstrip(b"\n"), json.loads(line)


def _input_keys(input_path: Path):
    """(line_no, id key or None) for every non-blank input line (any input format ``tokenmill run`` reads)."""
    from tokenmill.jobs.inputs import InputSource, InputSpec
    from tokenmill.jobs.records import JobError, decode_line

    with InputSource(InputSpec(str(input_path))) as source:
        for line_no, raw in source.iter_lines():
            if isinstance(raw, bytes) and not raw.strip():
                continue
            try:
                obj = decode_line(raw, line_no)
            except JobError:
                yield line_no, None
                continue
            rid = obj.get("custom_id", obj.get("id"))
            yield line_no, (id_key(rid) if rid is not None else None)


def merge_parts(parts: list[Path], output: Path, input_path: Path | None) -> list[str]:
    """Writes the merged results and errors; returns the problems found (empty when every id is there once)."""
    from tokenmill.jobs.errors import JobSetupError

    missing = [str(p) for p in parts + ([input_path] if input_path else []) if not p.is_file()]
    if missing:
        raise JobSetupError(f"{', '.join(missing)}: no such file; nothing was written")
    problems: list[str] = []
    results: dict[str, bytes] = {}
    order: list[str] = []
    errors: dict[int, bytes] = {}
    for part in parts:
        for raw, rec in _read_jsonl(part):
            key = output_id_key(rec)
            if key in results:
                problems.append(f"id {key} appears more than once ({part})")
                continue
            results[key] = raw
            order.append(key)
        err_path = JobPaths(part).errors
        if err_path.is_file():
            for raw, rec in _read_jsonl(err_path):
                if rec["line"] in errors:
                    problems.append(f"line {rec['line']} has more than one error record ({err_path})")
                errors[rec["line"]] = raw

    if input_path is not None:
        order, placed = [], set()
        for line_no, key in _input_keys(input_path):
            in_results = key is not None and key in results and key not in placed
            if in_results and line_no in errors:
                problems.append(f"line {line_no} (id {key}) has both a result and an error record")
            if in_results:
                order.append(key)
                placed.add(key)
            elif line_no not in errors:
                problems.append(f"line {line_no}{f' (id {key})' if key else ''} has neither a result nor an error")
        extra = set(results) - placed
        problems.extend(f"id {k} is in the parts but not (once) in the input" for k in sorted(extra)[:20])
        order.extend(k for k in results if k in extra)

    write_lines_atomic(output, (results[key] for key in order))
    err_path = JobPaths(output).errors
    if errors:
        write_lines_atomic(err_path, (errors[line_no] for line_no in sorted(errors)))
    else:
        err_path.unlink(missing_ok=True)
    return problems
