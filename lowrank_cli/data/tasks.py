"""The tasks of a multi-task run or evaluation: `--task NAME=PATH[:label|:score]`, repeated.

    specs = parse_tasks(["sst=sst.jsonl", "sts=stsb.jsonl:score"])
    specs[1].name, specs[1].path, specs[1].target     # "sts", Path("stsb.jsonl"), "score"

PATH is a labelled-text file (.jsonl / .csv) or an ImageFolder. The suffix says what to learn: `:label` classes,
`:score` a number to regress on (the record's `score`, else its `label`, read as a number); without one, what
the file holds. Names are what `load(..., task=NAME)` and the reports use, so they are short words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lowrank_cli.errors import InputError, UsageError

TARGETS = ("label", "score")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")  # no dots: a name is a module key
_FORM = "give NAME=PATH, optionally with :label or :score after the path (sts=stsb.jsonl:score)"


@dataclass(frozen=True)
class TaskSpec:
    name: str
    path: Path
    target: str | None = None  # "label", "score", or None: as the file says

    def __str__(self) -> str:
        return f"{self.name}={self.path}" + (f":{self.target}" if self.target else "")


def parse_task(text: str, *, parameter: str = "tasks") -> TaskSpec:
    """One `NAME=PATH[:label|:score]`; a malformed one is a UsageError naming it."""
    name, sep, rest = str(text).partition("=")
    name = name.strip()
    if not sep or not rest.strip():
        raise UsageError(f"`{parameter}` '{text}' has no path: {_FORM}")
    if not _NAME.fullmatch(name):
        raise UsageError(f"`{parameter}` '{text}': task name '{name}' must be a word of letters, digits, '_' or "
                         f"'-' (at most 64, starting with a letter or digit): {_FORM}")
    target = None
    path, colon, suffix = rest.rpartition(":")
    if colon and suffix in TARGETS:
        rest, target = path, suffix
    elif colon and not Path(rest).expanduser().exists() and re.fullmatch(r"[A-Za-z]+", suffix):
        raise UsageError(f"`{parameter}` '{text}': ':{suffix}' is not a target: use :label (classes) or :score "
                         "(a number), or nothing (as the file says)")
    return TaskSpec(name, Path(rest.strip()).expanduser(), target)


def parse_tasks(items: list[str] | tuple[str, ...], *, parameter: str = "tasks", check_files: bool = True
                ) -> list[TaskSpec]:
    """Every task, in order; two with one name are a UsageError, a missing path an InputError naming the task."""
    specs = [item if isinstance(item, TaskSpec) else parse_task(item, parameter=parameter) for item in items]
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.name in seen:
            raise UsageError(f"`{parameter}` names task '{spec.name}' twice ({seen[spec.name]} and {spec}): give each "
                             "task its own name")
        seen[spec.name] = spec
        if check_files and not spec.path.exists():
            raise InputError(f"task '{spec.name}': '{spec.path}' does not exist: check the path")
    return specs
