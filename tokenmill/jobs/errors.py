"""The two ways a job ends early, and the exit codes every job command uses.

Exit codes (``tokenmill run`` / ``embed`` / ``validate`` / ``merge``):
  0    every row done (or valid)
  1    the job ran to its end but some rows failed: their error records are in OUTPUT.errors.jsonl
  2    usage or set-up error (bad flag, missing or unreadable input, unwritable output, refused resume): nothing ran
  3    the job stopped on a fault (disk full, output became unwritable, input changed, an engine error): what was
       written is intact and the same command resumes
  130  SIGINT, 143 SIGTERM: stopped, flushed, resumable
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ROWS_FAILED = 1
EXIT_USAGE = 2
EXIT_FAULT = 3


class JobSetupError(Exception):
    """A problem the user fixes before the job can start (exit code 2, one line)."""


class JobFault(Exception):
    """The job stopped part way on a fault outside the input rows (exit code 3, one line); results are durable."""
