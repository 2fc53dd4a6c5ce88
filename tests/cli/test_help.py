"""`--help` as a new user reads it (cli/command.py, cli/options.py): switches as flags, placeholders that say what
to write, fixed choices listed, one dtype vocabulary, required options first, one-sentence command summaries."""

import re

import pytest
import typer
from helpers import run_cli

from lowrank_cli.cli import options
from lowrank_cli.cli.app import app
from lowrank_cli.cli.bench_cmd import COMPILE_MODES

COMMANDS = ["factorize", "report", "recover", "finetune", "eval", "bench", "demo"]


def _help(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one row per option: the checks below read whole placeholders
    code, out, err = run_cli([*args, "--help"], capsys)
    assert code == 0, err
    return out


def _command(name: str):
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("args", [[], *([c] for c in COMMANDS)], ids=["lrc", *COMMANDS])
def test_no_type_labels_for_switches_lists_or_arguments(args, capsys, monkeypatch):
    out = _help(args, capsys, monkeypatch)
    for noise in ("<bool>", "<list[str]>", "{model}", "{MODEL}", "<path>"):
        assert noise not in out, noise
    usage = next(line for line in out.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage
    if args:
        assert usage.split()[-1] == {"recover": "STUDENT", "demo": "[OPTIONS]"}.get(args[0], "MODEL")
    assert re.search(r"--help\s+-h\s+Show this message", out)  # the help switch takes no value either


@pytest.mark.parametrize("command,placeholders", [
    ("factorize", ["REGEX=RANK", "REGEX", "KEY=VALUE", "pela|speed", "exact|randomized",
                   "auto|timm|transformers", "fp32|bf16|fp16|fp64", "N|auto", "auto|cpu|cuda[:N]", "C,H,W"]),
    ("recover", ["N|auto", "KEY=VALUE", "auto|timm|transformers", "--no-eval", "[x>=1]"]),
    ("bench", ["fp32|bf16|fp16|fp64", "MODE", "default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs",
               "N[,N...]", "[x>=1]"]),
    ("report", ["auto|timm|transformers", "KEY=VALUE", "RATIO"]),
    ("eval", ["auto|cpu|cuda[:N]", "DIR|FILE", "[x>=0]"]),
    ("finetune", ["head|full|lora|dora|rlrr", "REGEX", "--no-merge", "auto|none|light|strong", "best|last",
                  "[x>=1]", "MODEL"]),
])
def test_placeholders_and_choices_are_listed(command, placeholders, capsys, monkeypatch):
    out = _help([command], capsys, monkeypatch)
    for text in placeholders:
        assert text in out, text
    for long_dtype in ("float32", "bfloat16", "float16"):  # one dtype vocabulary: the short one
        assert long_dtype not in out


def test_the_choices_are_the_librarys():
    """The CLI writes the vocabularies out (the library modules import torch, --help must not): same values."""
    from lowrank_cli.compress.svd import SVD_METHODS
    from lowrank_cli.devices import DTYPE_CHOICES
    from lowrank_cli.evaluation.bench_options import resolve_compile_mode
    from lowrank_cli.models.sources import LIBRARIES

    def choices(command: str, name: str) -> list[str]:
        return next(p for p in _command(command).params if p.name == name).metavar.split("|")

    assert options.DTYPE_CHOICES == DTYPE_CHOICES
    assert choices("factorize", "dtype") == choices("bench", "dtype") == list(DTYPE_CHOICES)
    assert choices("factorize", "svd") == list(SVD_METHODS)
    assert choices("report", "library") == list(LIBRARIES)
    from lowrank_cli.training.merging import MERGE_RULES
    from lowrank_cli.cli import finetune_cmd
    from lowrank_cli.data.multitask_loader import SCHEDULES
    from lowrank_cli.training.multitask_options import MODES

    assert (finetune_cmd.MODES, finetune_cmd.SCHEDULES, finetune_cmd.MERGE_RULES) == (MODES, SCHEDULES, MERGE_RULES)
    assert choices("finetune", "mode") == list(MODES) and choices("finetune", "merge_rule") == list(MERGE_RULES)
    for mode in COMPILE_MODES:
        assert resolve_compile_mode(mode, False) == mode


def test_required_options_come_first():
    for name in COMMANDS:
        opts = [p for p in _command(name).params if p.param_type_name == "option"]
        required = [p.name for p in opts if p.required]
        assert [p.name for p in opts[: len(required)]] == required, name
    recover = [p.name for p in _command("recover").params]
    assert recover[:6] == ["student", "output", "data", "teacher", "steps", "epochs"]  # --teacher optional since --method progressive


def test_each_command_has_a_one_sentence_summary(capsys, monkeypatch):
    """The first paragraph of a command's docstring is its line in `lrc --help`: one whole sentence."""
    out = _help([], capsys, monkeypatch)
    for name in COMMANDS:
        summary = _command(name).help.split("\n\n")[0]
        assert "\n" not in summary and summary.endswith(".") and len(summary) <= 100, name
        assert re.search(rf"│ {name}\s+{re.escape(summary)}\s+│", out), name


@pytest.mark.parametrize("value,expected", [("fp32", "fp32"), ("bfloat16", "bf16"), ("FLOAT16", "fp16"),
                                            ("torch.float64", "fp64"), ("half", "fp16")])
def test_dtype_long_spellings_are_accepted_in_the_short_form(value, expected):
    param = next(p for p in _command("factorize").params if p.name == "dtype")
    assert param.callback(None, param, value) == expected
