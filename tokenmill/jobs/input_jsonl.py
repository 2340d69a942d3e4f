"""JSON Lines input (``jobs/inputs.InputSource`` reads its format through this): the (decompressed) stream cut into
lines, universal newlines, a BOM skipped, an over-long line one error row."""

from __future__ import annotations

from collections.abc import Iterator

from tokenmill.jobs.errors import JobFault
from tokenmill.jobs import inputs  # BLOCK and MAX_LINE_BYTES read at each call (one definition, there)
from tokenmill.jobs.inputs import BadRow, RawRow


def jsonl_lines(source) -> Iterator[tuple[int, RawRow]]:
    """Every line as (line number, its bytes), blank ones as b""; an over-long line is one BadRow."""
    stream = source.open_stream()
    line_no = 0
    rest = b""
    first = True
    skipping = False  # inside an over-long line, dropping bytes until its end
    while True:
        block = stream.read(inputs.BLOCK)
        if source.shrank():
            raise JobFault(f"input {source.display} shrank while the job was reading it (it was changed in place); "
                           f"restore it and run the same command to resume")
        if first:
            block = block.removeprefix(b"\xef\xbb\xbf")
            first = False
        if not block:
            break
        data = rest + block
        # keep a trailing \r: it may be the first half of \r\n
        cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1))
        if cut < 0:
            rest = data
            if len(rest) > inputs.MAX_LINE_BYTES and not skipping:
                line_no += 1
                yield line_no, _too_long(line_no)
                skipping = True
            if skipping:
                rest = rest[-1:] if rest.endswith(b"\r") else b""
            continue
        complete, rest = data[: cut + 1], data[cut + 1:]
        lines = complete.splitlines()
        if skipping:
            lines = lines[1:]  # the tail of the over-long line
            skipping = False
        for line in lines:
            line_no += 1
            yield line_no, line
    if rest and not skipping:
        for line in rest.splitlines():
            line_no += 1
            yield line_no, line


def _too_long(line_no: int) -> BadRow:
    return BadRow("line_too_long", f"line {line_no} is longer than {inputs.MAX_LINE_BYTES >> 20} MiB")
