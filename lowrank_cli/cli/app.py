"""The `lrc` command: a thin layer over the Python API, with one error boundary.

Every expected failure is an LrcError: it prints one `Error: ...` line on stderr and exits with its code
(see lowrank_cli.errors). Anything else is a bug: one line too, the traceback only with LRC_DEBUG=1.
"""

from __future__ import annotations

import errno
import os
import sys

import typer

from lowrank_cli._version import __version__
from lowrank_cli.cli import (
    bench_cmd,
    card_cmd,
    demo_cmd,
    eval_cmd,
    factorize_cmd,
    finetune_cmd,
    push_cmd,
    recover_cmd,
    report_cmd,
)
from lowrank_cli.cli.command import LrcGroup
from lowrank_cli.cli.options import CLICK_USAGE_ERROR

app = typer.Typer(
    name="lrc",
    cls=LrcGroup,
    help="Make pretrained transformers smaller and faster by low-rank factorization (PELA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"lrc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Make pretrained transformers smaller and faster by low-rank factorization (PELA)."""


for _command in (factorize_cmd, report_cmd, recover_cmd, finetune_cmd, eval_cmd, bench_cmd, card_cmd, push_cmd,
                 demo_cmd):
    _command.register(app)

_WRITE_FAILURES = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM}


def _error(message: str, code: int) -> None:
    from lowrank_cli.errors import one_line

    sys.stderr.write(f"Error: {one_line(message)}\n")
    sys.stderr.flush()
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    from lowrank_cli.atomic import private_tmpdir

    with private_tmpdir():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    from lowrank_cli.errors import LrcError

    # huggingface_hub's own retry and progress chatter would come before lrc's one Error line.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")

    debug = os.environ.get("LRC_DEBUG", "") not in ("", "0")
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="lrc", standalone_mode=False)
    except CLICK_USAGE_ERROR as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # `lrc` alone: show the help, not an error
            print(e.ctx.get_help())
            sys.exit(0)
        name = e.ctx.command_path if getattr(e, "ctx", None) else "lrc"
        _error(f"{e.format_message()} (see '{name} --help')", 2)
    except typer.Abort:
        _error("interrupted", 130)
    except KeyboardInterrupt:
        _error("interrupted", 130)
    except LrcError as e:
        if debug:
            raise
        from lowrank_cli.cli.options import option_name

        _error(e.render(option_name), e.exit_code)
    except Exception as e:
        if debug:
            raise
        from lowrank_cli.devices import is_out_of_memory

        if isinstance(e, OSError) and e.errno in _WRITE_FAILURES:  # a write outside lrc's atomic writer
            _error(f"cannot write '{e.filename or 'the output'}' ({e.strerror}): free some space or choose a "
                   "writable folder", 4)

        if is_out_of_memory(e):
            first = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
            _error(f"the device ran out of memory ({first[:160]}): use a smaller --batch-size (or --plan-batch-size, "
                   "--eval-batch-size), a smaller --dtype, or another device", 6)
        _error(f"unexpected {type(e).__name__}: {e} (a bug in lrc: rerun with LRC_DEBUG=1 and report the traceback)", 1)
    if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into a silent Exit(130)
        _error("interrupted", 130)
    sys.exit(code if isinstance(code, int) else 0)
