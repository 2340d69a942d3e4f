"""The job skeleton every job kind shares (``tokenmill run``, ``tokenmill embed``, a ``--ray`` driver of either):
output checks and lock, the input, the manifest, resume bookkeeping, error records, faults, the completion steps, and
``JobRun``, the run every kind plugs its own steps into.

Order of a job: check OUTPUT (before anything is created) -> lock -> open the input -> (--overwrite: delete the old
files) -> check / write the manifest -> repair torn tails, collect what is done -> pass 1 (error records) -> the
kind's own work loop -> complete: rewrite OUTPUT in input order, drop an empty errors file and the stdin spool,
state "completed".

Faults while the job runs (a full disk, an unwritable output, an input changed under the job, an engine exception)
become one ``JobFault`` (exit 3): the appenders are closed with what fits, the state file says "failed" with the
details when it can still be written, and the same command resumes.
"""

from __future__ import annotations

import abc
import errno
import shutil
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokenmill.jobs.errors import EXIT_OK, EXIT_ROWS_FAILED, JobFault, JobSetupError
from tokenmill.jobs.files import (
    CorruptFileError,
    JobLock,
    JobLockedError,
    JobPaths,
    JsonlAppender,
    read_keys,
    repair_torn_tail,
)
from tokenmill.jobs.inputs import InputSource, InputSpec
from tokenmill.jobs.progress import EXIT_SIGNAL, say
from tokenmill.jobs.records import JobError
from tokenmill.jobs.state import StateFile


@dataclass
class JobIO:
    """What every job command takes besides its model and kind-specific options."""

    input: str | Path  # a path, or "-" for stdin
    output: Path
    input_format: str = "auto"
    columns: tuple = ()  # (field, column) pairs for CSV / Parquet inputs
    progress_interval: float | None = None  # seconds between progress lines when stderr is not a terminal
    gpu_hourly_rate: float | None = None
    num_gpus: int = 1
    quiet: bool = False
    overwrite: bool = False

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(str(self.input), self.input_format, tuple(self.columns))


def check_output(output: Path) -> None:
    """OUTPUT must be a file path in an existing, writable directory; checked before any file is created."""
    if output.is_dir():
        raise JobSetupError(f"output {output} is a directory; give a file path (e.g. {output}/results.jsonl)")
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        raise JobSetupError(f"output directory {parent} does not exist")
    probe = parent / f".tokenmill-write-test-{id(output)}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise JobSetupError(f"output directory {parent} is not writable: {e.strerror}") from None


def refuse_ray_leftovers(paths: JobPaths, overwrite: bool) -> None:
    """A single-machine start on the output of an unfinished ``--ray`` job would run its committed shards again."""
    shards = paths.output.with_name(paths.output.name + ".shards")
    if shards.is_dir() and not overwrite:
        raise JobSetupError(f"{shards} holds the committed shards of an unfinished --ray job: resume it with --ray, "
                            f"or pass --overwrite to start afresh")


def run_locked(output: Path, body: Callable[[JobPaths], int]) -> int:
    """``body(paths)`` under OUTPUT's job lock (one job per output at a time); the lock file goes when it ends."""
    paths = JobPaths(output)
    try:
        lock = JobLock(paths.lock)
    except JobLockedError as e:
        raise JobSetupError(f"{e} ({output}); wait for it or stop it first") from None
    except OSError as e:
        raise JobSetupError(f"cannot create the lock file {paths.lock}: {e.strerror}") from None
    try:
        return body(paths)
    finally:
        lock.release()


def open_input(spec: InputSpec, paths: JobPaths, fields: tuple[str, ...]) -> InputSource:
    try:
        return InputSource(spec, fields, spool=paths.stdin)
    except OSError as e:
        raise JobSetupError(f"cannot read input {spec.path}: {e.strerror}") from None


def remove_job_files(paths: JobPaths, extra: tuple[Path, ...] = ()) -> None:
    """--overwrite: the earlier job's files (not the lock, which this job holds; not a stdin spool just written)."""
    shards = paths.output.with_name(paths.output.name + ".shards")  # an unfinished --ray job's shards
    for p in [paths.output, paths.errors, paths.manifest, paths.state, shards, *extra]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def done_keys(path: Path, key) -> set:
    """Keys of the records already written to ``path``, after cutting a torn last line."""
    try:
        repair_torn_tail(path)
        return read_keys(path, key)
    except CorruptFileError as e:
        raise JobSetupError(f"{e}: the file was damaged outside tokenmill. Delete that line (its row runs again on "
                            f"resume) or pass --overwrite to start afresh") from None


class ErrorRecords:
    """The errors file of a job: records for lines not already written, of this partition only."""

    def __init__(self, paths: JobPaths, in_partition: Callable[[int], bool] = lambda line_no: True) -> None:
        self.done_lines = done_keys(paths.errors, lambda r: int(r["line"]))
        self.appender = JsonlAppender(paths.errors)
        self.in_partition = in_partition
        self.count = len(self.done_lines)

    def __call__(self, line_no: int, err: JobError) -> None:
        if self.in_partition(line_no) and line_no not in self.done_lines:
            self.appender.write(err.to_record(line_no))
            self.count += 1


def fault_message(e: BaseException, output: Path) -> str:
    """One line for a fault that stopped a job part way."""
    resume = "what was written is intact; run the same command again to resume"
    if isinstance(e, JobFault):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on the device{where}; {resume} once space is freed"
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"the output can no longer be written{where}: {e.strerror}; {resume} once it is writable"
        return f"I/O error{where}: {e.strerror}; {resume}"
    return f"the engine failed ({type(e).__name__}: {e}); {resume} (details in {JobPaths(output).state})"


@contextmanager
def faults_as_job_fault(output: Path, state: StateFile, snapshot: Callable[[], dict], closers: list):
    """Turns any exception in the block into a JobFault after closing ``closers`` (``abandon()``) and marking the
    state file failed (best effort: the disk may be full)."""
    try:
        yield
    except (JobSetupError, KeyboardInterrupt):
        for c in closers:
            c.abandon()
        raise
    except Exception as e:
        for c in closers:
            c.abandon()
        message = fault_message(e, output)
        try:
            state.write({**snapshot(), "state": "failed", "message": message,
                         "traceback": traceback.format_exc(limit=20)}, force=True)
        except OSError:
            pass
        raise JobFault(message) from e


def complete_outputs(paths: JobPaths, errors: ErrorRecords, source: InputSource) -> None:
    """The completion steps that touch files: an errors file only if it holds records, in line order; the stdin
    spool removed."""
    from tokenmill.jobs.files import rewrite_in_order

    errors.appender.close()
    if paths.errors.exists():
        if paths.errors.stat().st_size == 0:
            paths.errors.unlink()
        else:
            rewrite_in_order(paths.errors, lambda r: int(r["line"]))
    if source.spec.is_stdin:
        paths.stdin.unlink(missing_ok=True)


def stop_interrupted(signum: int, state: StateFile, snapshot: dict, closers: list, message: str) -> int:
    """After SIGINT / SIGTERM: close the outputs (durable), mark the state interrupted, say ``message``; returns the
    exit code (130 / 143)."""
    for c in closers:
        c.close()
    code = EXIT_SIGNAL[signum]
    state.write({**snapshot, "state": "interrupted", "message": f"stopped by signal {code - 128}"}, force=True)
    say(f"{message} Run the same command again to resume.")
    return code


@contextmanager
def job_input(opts: JobIO, paths: JobPaths, fields: tuple[str, ...], manifest_of: Callable[[dict], dict],
              extra: tuple[Path, ...] = (), ray: bool = False):
    """The prologue every job kind shares, under the lock: a single-machine job refuses an unfinished --ray job's
    output (unless --overwrite), open the input, delete the earlier job's files for --overwrite (and ``extra``), check the manifest
    built by ``manifest_of(input identity)`` against the old one and write it. Yields the open InputSource."""
    from tokenmill.jobs.manifest import check_manifest, write_manifest

    if not ray:
        refuse_ray_leftovers(paths, opts.overwrite)
    with open_input(opts.input_spec, paths, fields) as source:
        if opts.overwrite:
            remove_job_files(paths, extra)
        manifest = manifest_of(source.identity())
        check_manifest(paths, manifest, lambda m: note(opts.quiet, m))
        write_manifest(paths, manifest)
        yield source


def summary_tail(opts: JobIO, paths: JobPaths, failed: int, billed: int, throughput: float, wall: float,
                 unit: str) -> list[str]:
    """The summary's last lines every job kind shares: the cost line (with --gpu-hourly-rate) and failed rows."""
    lines = []
    if opts.gpu_hourly_rate is not None:
        from tokenmill.jobs.cost import cost_line

        lines.append(cost_line(billed, opts.gpu_hourly_rate, throughput, wall, unit))
    if failed:
        lines.append(failed_line(failed, paths))
    return lines


def finish(state: StateFile, snapshot: dict, lines: list[str], quiet: bool, failed: int) -> int:
    """Marks the job completed (the summary's first line as its message), prints the summary; returns the exit
    code."""
    import sys

    state.write({**snapshot, "state": "completed", "eta_s": 0, "message": lines[0]}, force=True)
    if not quiet:
        print("\n".join(lines), file=sys.stderr, flush=True)
    return exit_code(failed)


def exit_code(num_failed: int) -> int:
    return EXIT_ROWS_FAILED if num_failed else EXIT_OK


def failed_line(num_failed: int, paths: JobPaths) -> str:
    return f"  {num_failed} rows failed: their error records are in {paths.errors}" if num_failed else ""


def note(quiet: bool, msg: str) -> None:
    if not quiet:
        say(msg)


class JobRun(abc.ABC):
    """One run of a job, whatever its kind: ``run()`` is the template, a kind fills the steps.

    Under ``faults_as_job_fault`` (any exception: one JobFault, the state file "failed"): the state says "validating
    input" -> ``validate()`` (pass 1 and its error records; returns the scan) -> ``work(scanned)`` (the kind's loop
    over the rows not done: 0, or a signal's exit code after ``stopped``) -> ``complete(scanned)`` (OUTPUT whole and
    in order; returns what the summary reports) -> ``summary_lines(result)`` printed and the state "completed".
    ``close()`` runs at the end whatever happened (an engine's worker processes, a cluster's actors).

    Shared state: ``opts``, ``paths``, ``source`` (the open input), ``stop``, ``state``, ``errors`` (the kind makes
    it: a partition filters it), ``t_start`` (the job's clock), ``total`` / ``done`` (rows of the job, and done).
    """

    def __init__(self, opts: JobIO, paths: JobPaths, source: InputSource, stop, t_start: float | None = None) -> None:
        self.opts, self.paths, self.source, self.stop = opts, paths, source, stop
        self.t_start = time.perf_counter() if t_start is None else t_start
        self.state = StateFile(paths.state)
        self.errors: ErrorRecords | None = None
        self.total = self.done = 0

    def run(self) -> int:
        try:
            with faults_as_job_fault(self.opts.output, self.state, self.snapshot, self.closers()):
                self.state.write({**self.snapshot(), "message": "validating input"}, force=True)
                scanned = self.validate()
                code = self.work(scanned)
                if code:
                    return code
                result = self.complete(scanned)
            return finish(self.state, self.final_snapshot(), self.summary_lines(result), self.opts.quiet,
                          self.errors.count)
        finally:
            self.close()

    # ---------------------------------------------------------------- the kind's steps
    @abc.abstractmethod
    def snapshot(self) -> dict:
        """The state file's content now (``jobs/state.py``)."""

    @abc.abstractmethod
    def postfix(self) -> str:
        """The progress bar's rates and ETA."""

    @abc.abstractmethod
    def closers(self) -> list:
        """The appenders a fault abandons and a signal closes (durable)."""

    @abc.abstractmethod
    def validate(self):
        """Pass 1: every line checked, error records written; returns the scan."""

    @abc.abstractmethod
    def work(self, scanned) -> int:
        """The rows not done yet, computed and written; 0, or a signal's exit code (``stopped``)."""

    @abc.abstractmethod
    def complete(self, scanned):
        """OUTPUT (and the errors file) made whole; returns what ``summary_lines`` reports."""

    @abc.abstractmethod
    def summary_lines(self, result) -> list[str]:
        """The summary, first line first (it becomes the final state's message)."""

    def final_snapshot(self) -> dict:
        return self.snapshot()

    def close(self) -> None:
        pass

    # ---------------------------------------------------------------- helpers for the steps
    def stopped(self, message: str) -> int:
        """After a signal: the outputs closed (durable), the state "interrupted", ``message`` said; the exit code."""
        return stop_interrupted(self.stop.received, self.state, self.snapshot(), self.closers(), message)
