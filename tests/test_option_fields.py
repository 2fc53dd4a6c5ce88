"""Each option defined once (lowrank_cli.option_fields): one field gives the API keyword, its check and the `lrc`
option; a value out of range is refused by the API and the CLI with one message, the parameter written as the
flag; --help shows the field's default and help; factorize's configs check their combinations for both."""

from __future__ import annotations

import dataclasses

import pytest
import typer
from helpers import error_lines, make_tiny_vit, run_cli

import lowrank_cli
from lowrank_cli.cli.command import LrcCommand
from lowrank_cli.cli.option_params import options_of, with_options
from lowrank_cli.cli.options import option_name
from lowrank_cli.compress.factorize_options import Calibration, FactorizeOptions, Ranking, Targets
from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import check_values, opt_of, option
from lowrank_cli.training.multitask_options import MultitaskOptions
from lowrank_cli.training.options import FinetuneOptions, RecoverOptions

# (API keywords, the same values on the command line, the message with the parameter as the API writes it)
RECOVER_CASES = [
    ({"grad_accum": 0}, ["--grad-accum", "0"], "`grad_accum` must be at least 1, got 0"),
    ({"num_workers": -1}, ["--workers", "-1"], "`num_workers` must be at least 0, got -1"),
    ({"lr": 0.0}, ["--lr", "0"], "`lr` must be a number > 0, got 0"),
    ({"val_fraction": 0.75}, ["--val-fraction", "0.75"], "`val_fraction` must be in (0, 0.5], got 0.75"),
    ({"keep": "first"}, ["--keep", "first"], "`keep` 'first' is not one of best, last"),
    ({"kappa": 1.0}, ["--kappa", "1"], "`kappa` must be a number > 1 (the compression ratio of each layer), got 1"),
    ({"kappa": 2.0, "rank_multiple": 0}, ["--kappa", "2", "--rank-multiple", "0"],
     "`rank_multiple` '0' is not a whole number >= 1 or auto"),
    ({"decay_end": 1.5}, ["--decay-end", "1.5"],
     "`decay_end` must be in (0, 1] (the fraction of the steps over which the dense weights fade out), got 1.5"),
]


def _as_flag(message: str) -> str:
    return UsageError(message).render(option_name)


@pytest.mark.parametrize("values,argv,message", RECOVER_CASES, ids=[c[2].split("`")[1] for c in RECOVER_CASES])
def test_a_recover_value_out_of_range_is_one_message_for_the_api_and_the_cli(values, argv, message, tmp_path,
                                                                            capsys):
    with pytest.raises(UsageError) as info:
        RecoverOptions(steps=1, **values).check()
    assert str(info.value) == message.replace("`", "")
    code, stdout, err = run_cli(["recover", "s", "--data", tmp_path, "--steps", "1", "-o", tmp_path / "x.safetensors",
                                 *argv], capsys)
    lines = error_lines(err)
    assert code == 2 and stdout == "" and len(lines) == 1, err
    assert lines[0].startswith(f"Error: {_as_flag(message)}"), lines  # the flag where the API names the parameter


@pytest.mark.parametrize("values,argv,message", [
    ({"budget": 1.5}, ["--budget", "1.5"],
     "`budget` must be in (0, 1) (the fraction of the target layers' parameters to keep), got 1.5"),
    ({"plan_kind": "fast"}, ["--plan", "fast"], "`plan_kind` 'fast' is not one of pela, speed"),
    ({"calib": "x", "calib_samples": 0}, ["--calib", "x", "--calib-samples", "0"],
     "`calib_samples` must be at least 1, got 0"),
    ({"budget": 0.5, "kappa": 3}, ["--budget", "0.5", "--kappa", "3"],
     "`budget` allocates the ranks per layer, `kappa` gives every layer one ratio: give one of them"),
    ({"plan_fused": False}, ["--no-plan-fused"],
     "`plan_fused=True` / `plan_fused=False` say how `plan_kind=speed` times the layers: add `plan_kind=speed`, or "
     "drop it"),
])
def test_a_factorize_value_or_combination_is_one_message_for_the_api_and_the_cli(values, argv, message, tmp_path,
                                                                                 capsys):
    with pytest.raises(UsageError) as info:
        lowrank_cli.factorize(make_tiny_vit(), **values)
    assert str(info.value) == message.replace("`", "")
    code, stdout, err = run_cli(["factorize", "m", "-o", tmp_path / "x.safetensors", *argv], capsys)
    lines = error_lines(err)
    assert code == 2 and stdout == "" and len(lines) == 1, err
    assert lines[0].startswith(f"Error: {_as_flag(message)}"), lines


def test_help_shows_the_fields_default_and_help(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    code, out, err = run_cli(["recover", "--help"], capsys)
    assert code == 0, err
    for name in ("batch_size", "save_every", "eps", "calib_samples"):
        field = next(f for f in dataclasses.fields(RecoverOptions) if f.name == name)
        line = next(row for row in out.splitlines() if "--" + name.replace("_", "-") + " " in row)
        assert opt_of(field).help in line and f"[default: {field.default}]" in line, line
    code, out, _ = run_cli(["finetune", "--help"], capsys)
    line = next(row for row in out.splitlines() if "--batch-size " in row)
    assert "[default: 32]" in line and opt_of(
        next(f for f in dataclasses.fields(FinetuneOptions) if f.name == "batch_size")).help in line
    assert "Linear warm-up steps (default: 10% of the steps)." in out  # finetune's own warmup_fraction, 0.1


@dataclasses.dataclass
class Toy:
    count: int = option(7, low=1, help="How many.", panel="Toy panel")
    share: float | None = option(None, low=0, high=1, help="A share.")
    mode: str = option("a", choices=("a", "b"), flag="--kind", help="Which kind.")
    keep: bool = option(True, flag="--no-keep", help="Drop it.")
    pairs: dict | None = option(None, cli_type=list[str], flag="--pair", help="K=V, repeatable.",
                                parse=lambda items: None if items is None else dict(i.split("=") for i in items))


def _toy_app(seen: dict) -> typer.Typer:
    app = typer.Typer()

    @with_options(options_of(Toy))
    def toy(name: str, **options) -> None:
        seen.update(options, name=name)

    app.command(cls=LrcCommand)(toy)

    @app.command()
    def other() -> None:  # two commands: `toy` is a subcommand, as lrc's are
        pass

    return app


def test_a_generated_command_reads_checks_and_documents_its_fields(monkeypatch):
    from typer.testing import CliRunner

    monkeypatch.setenv("COLUMNS", "200")
    seen: dict = {}
    app, runner = _toy_app(seen), CliRunner()
    result = runner.invoke(app, ["toy", "x", "--count", "3", "--kind", "b", "--no-keep", "--share", "0.5",
                                 "--pair", "a=1", "--pair", "b=2"])
    assert result.exit_code == 0, result.output
    assert seen == {"name": "x", "count": 3, "share": 0.5, "mode": "b", "keep": False, "pairs": {"a": "1", "b": "2"}}
    result = runner.invoke(app, ["toy", "x"])
    assert seen == {"name": "x", "count": 7, "share": None, "mode": "a", "keep": True, "pairs": None}  # defaults
    help_text = runner.invoke(app, ["toy", "--help"]).output
    assert "How many." in help_text and "[default: 7]" in help_text and "[x>=1]" in help_text
    assert "Toy panel" in help_text and "a|b" in help_text and "--no-keep" in help_text
    result = runner.invoke(app, ["toy", "x", "--count", "0"])
    assert result.exit_code == 2 and "--count must be at least 1, got 0" in result.output
    with pytest.raises(UsageError, match="count must be at least 1, got 0"):
        check_values(Toy(count=0))
    result = runner.invoke(app, ["toy", "x", "--kind", "c"])
    assert result.exit_code == 2 and "--kind 'c' is not one of a, b" in result.output
    with pytest.raises(UsageError, match="mode 'c' is not one of a, b"):
        check_values(Toy(mode="c"))


def test_factorize_configs_and_keywords_are_one_call():
    options = FactorizeOptions.of(kappa=3, exclude=[r"blocks\.0\..*"], calib="x", calib_samples=8)
    assert options.ranking == Ranking(kappa=3) and options.targets == Targets(exclude=[r"blocks\.0\..*"])
    assert options.calibration == Calibration(calib="x", calib_samples=8)
    assert options.keywords()["kappa"] == 3 and options.keywords()["rank_multiple"] == 8
    with pytest.raises(TypeError, match="unexpected keyword"):
        FactorizeOptions.of(kapa=3)
    with pytest.raises(TypeError, match="not both"):
        FactorizeOptions.of(ranking=Ranking(kappa=2), kappa=3)
    by_keyword = lowrank_cli.factorize(make_tiny_vit(), kappa=3, rank_multiple=4, exclude=[r"blocks\.0\..*"])
    by_config = lowrank_cli.factorize(make_tiny_vit(), ranking=Ranking(kappa=3, rank_multiple=4),
                                      targets=Targets(exclude=[r"blocks\.0\..*"]))
    ranks = {r.name: r.rank for r in by_keyword.layers}
    assert ranks == {r.name: r.rank for r in by_config.layers} and ranks
    assert not any(name.startswith("blocks.0.") for name in ranks)


@pytest.mark.parametrize("values,given,message", [
    ({"budget": 0.5, "target_macs": 10**6}, None, "budget and target_macs both set the size"),
    ({"target_macs": 10**6, "rank_pattern": [".*=8"]}, None, "target_macs allocates every rank, rank_pattern fixes"),
    ({"plan_batch_size": 4}, None, "plan_batch_size is the batch that plan_kind=speed times"),
    ({"plan_dtype": "bf16"}, None, "plan_dtype is the precision that plan_kind=speed and rank_multiple=auto"),
    ({"calib_samples": 8}, None, "calib_samples applies to the calib data"),
    ({"tokenizer": "tok/"}, None, "tokenizer applies to the calib data"),
    ({"svd": "randomized", "calib": "x"}, None, "so svd does not apply: drop svd"),
    ({}, {"calib_samples"}, "calib_samples applies to the calib data"),  # the CLI: --calib-samples 256 was typed
])
def test_the_configs_refuse_combinations_that_cannot_work(values, given, message):
    with pytest.raises(UsageError, match=message):
        FactorizeOptions.of(**values).check(given)


def test_the_configs_take_what_goes_together():
    for values in ({"calib_samples": 256}, {"plan_kind": "speed", "plan_batch_size": 4, "plan_fused": False},
                   {"rank_multiple": "auto", "plan_dtype": "bf16"}, {"budget": 0.5, "calib": "x", "calib_samples": 8}):
        FactorizeOptions.of(**values).check()


def test_factorize_works_out_the_input_size_once(monkeypatch):
    """Checking the calls, a MACs budget and a speed plan all run at one input size, worked out at the entry."""
    from lowrank_cli.models import inputs

    calls = []
    real = inputs.default_input_size
    monkeypatch.setattr(inputs, "default_input_size", lambda *a, **k: calls.append(a) or real(*a, **k))
    from lowrank_cli.compress import factorization

    monkeypatch.setattr(factorization, "default_input_size", inputs.default_input_size)
    from lowrank_cli.evaluation.counting import count_macs

    model = make_tiny_vit()
    dense_macs = count_macs(model, (3, 32, 32)).total
    result = lowrank_cli.factorize(model, target_macs=int(dense_macs * 0.8), plan_kind="speed", plan_batch_size=2,
                                   device="cpu")
    assert len(calls) == 1 and result.extra["budget"] and result.extra["speed_plan"]


def test_multitask_fields_keep_their_flags():
    assert option_name("mode") == "--multitask" and option_name("merge_rule") == "--merge"
    assert option_name("task_weights") == "--task-weight" and option_name("merge=False") == "--no-merge"
    assert option_name("evaluate_accuracy=False") == "--no-eval" and option_name("plan_kind=speed") == "--plan speed"
    assert {f.name for f in dataclasses.fields(MultitaskOptions)} >= {"mode", "schedule", "merge_rule", "merge_rank"}


def test_the_fields_vocabularies_are_the_librarys():
    """The option modules are torch-free, so they write out the vocabularies of modules that import torch."""
    from lowrank_cli.compress import factorize_options, svd
    from lowrank_cli.data.augment import LEVELS
    from lowrank_cli.training.options import AUGMENT_LEVELS

    assert AUGMENT_LEVELS == LEVELS and factorize_options.SVD_METHODS == svd.SVD_METHODS
