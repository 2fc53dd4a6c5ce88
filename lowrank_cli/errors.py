"""Expected failures.

Every failure a user can cause (bad path, corrupt file, unknown model, wrong option, ...) is raised as an
`LrcError` whose message names the cause and the fix. The CLI turns it into a single `Error:` line and the
exit code below; library users catch the class they care about.

Exit codes (documented in the README):
    1  a report gate failed, or an unexpected internal error
    2  bad usage: an option value that cannot work (kappa <= 1, a pattern that matches nothing, ...)
    3  bad input: model, file or data not found, unreadable, corrupt, or not fitting the architecture
    4  output problem: output exists (without --force), its folder is missing, or it cannot be written
    5  training stopped: non-finite loss (the last good checkpoint is kept)
    6  environment: a missing optional dependency, a device that is not there (--device cuda), or out of memory
  130  interrupted (Ctrl-C / SIGTERM); for recover, the resume command is printed
"""

from __future__ import annotations

import re
from collections.abc import Callable

# A parameter of the Python API named in a message: `batch_size`, or `force=True` for a switch. str(error) shows
# it as written (batch_size, force=True); the CLI shows its option (--batch-size, --force): library code never
# names a CLI flag, and one message serves both. Messages passed to `warn` / `log` callbacks keep the backticks
# (the CLI's console renders them; `render_api` is what a notebook would show).
PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*(?:=[^`\s]+)?)`")


def api_name(parameter: str) -> str:
    return parameter


def render_api(message: str) -> str:
    return PARAMETER.sub(lambda m: api_name(m.group(1)), message)


class LrcError(Exception):
    exit_code = 1

    def __str__(self) -> str:
        return self.render(api_name)

    def render(self, name: Callable[[str], str]) -> str:
        """The message with each `parameter` written by `name` (the CLI passes its option names)."""
        text = super().__str__()
        return PARAMETER.sub(lambda m: name(m.group(1)), text)


class GateFailed(LrcError):
    exit_code = 1


class UsageError(LrcError):
    exit_code = 2


class InputError(LrcError):
    exit_code = 3


class OutputError(LrcError):
    exit_code = 4


class TrainingError(LrcError):
    exit_code = 5


class EnvironmentProblem(LrcError):
    exit_code = 6


class Interrupted(LrcError):
    exit_code = 130


# What would break the one `Error:` line (a newline in a task name, a library's multi-line message) or reach the
# terminal as a command (ESC sequences): C0 and C1 controls, DEL and the Unicode line and paragraph separators.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(message: str) -> str:
    """`message` as one printable line: control characters written as escapes (\\n, \\x1b, ...)."""
    return message.translate(_ESCAPES)
