"""The ``tokenmill`` command line: thin flags -> JobOptions / EngineConfig -> tokenmill.jobs. The commands live in
``jobs.py`` (run, status, plan, validate, merge), ``embed.py`` (embed, index, search) and ``tools.py`` (eval, serve,
build-kernels); what they share in ``common.py``.

Errors the user must fix (missing file, bad flag or config key, unknown model path) print one line on stderr and
exit with code 2; a fault part way through a job (disk full, output unwritable, input changed, engine error) one
line and exit code 3; no traceback. Exit codes are listed in ``EXIT_CODES_HELP`` and ``tokenmill --help``.
"""

from __future__ import annotations

import sys

import click

from tokenmill.cli.common import EXIT_CODES_HELP
from tokenmill.cli.embed import embed, index, search
from tokenmill.cli.jobs import merge, plan, run, status, validate
from tokenmill.cli.tools import build_kernels, eval_cmd, serve
from tokenmill.config import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_CODES_HELP)
@click.version_option(package_name="tokenmill")
def cli() -> None:
    """tokenmill: offline batch LLM inference. Datasets in, results out, resumable."""


for command in (run, status, plan, validate, merge, embed, index, search, eval_cmd, serve, build_kernels):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    from tokenmill.jobs.errors import EXIT_FAULT, EXIT_USAGE, JobFault, JobSetupError
    from tokenmill.model.loader import ModelNotFoundError

    try:
        code = cli.main(args=argv, prog_name="tokenmill", standalone_mode=False)
    except click.exceptions.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx is not None else ""
        print(f"tokenmill: error: {e.format_message()}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("tokenmill: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as e:
        print(f"tokenmill: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (JobSetupError, ConfigError, ModelNotFoundError, FileNotFoundError) as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except JobFault as e:
        print(f"tokenmill: error: {e}", file=sys.stderr)
        sys.exit(EXIT_FAULT)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
