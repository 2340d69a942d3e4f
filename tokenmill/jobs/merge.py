"""``tokenmill merge``: partition outputs back into one results file (and one errors file), in input order.

With the input, every line is accounted for exactly once: its id has one result, or its line has one error record.
Results are held as raw lines keyed by id while merging.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenmill.jobs.files import JobPaths
from tokenmill.jobs.records import id_key, output_id_key


def _read_jsonl(path: Path):
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield line.rstrip(b"\n"), json.loads(line)


def _input_keys(input_path: Path):
    """(line_no, id key or None) for every non-blank input line."""
    with open(input_path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                yield line_no, None
                continue
            if isinstance(obj, dict):
                rid = obj.get("custom_id", obj.get("id"))
                yield line_no, (id_key(rid) if rid is not None else None)
            else:
                yield line_no, None


def merge_parts(parts: list[Path], output: Path, input_path: Path | None) -> list[str]:
    """Writes the merged results and errors; returns the problems found (empty when every id is there once)."""
    problems: list[str] = []
    results: dict[str, bytes] = {}
    order: list[str] = []
    errors: dict[int, bytes] = {}
    for part in parts:
        if not part.is_file():
            problems.append(f"{part} does not exist")
            continue
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
        order = []
        for line_no, key in _input_keys(input_path):
            in_results = key is not None and key in results and key not in order
            if in_results and line_no in errors:
                problems.append(f"line {line_no} (id {key}) has both a result and an error record")
            if in_results:
                order.append(key)
            elif line_no not in errors:
                problems.append(f"line {line_no}{f' (id {key})' if key else ''} has neither a result nor an error")
        extra = set(results) - set(order)
        problems.extend(f"id {k} is in the parts but not (once) in the input" for k in sorted(extra)[:20])
        order.extend(k for k in results if k in extra)

    with open(output, "wb") as f:
        for key in order:
            f.write(results[key] + b"\n")
    with open(JobPaths(output).errors, "wb") as f:
        for line_no in sorted(errors):
            f.write(errors[line_no] + b"\n")
    return problems
