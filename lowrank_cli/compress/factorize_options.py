"""What `factorize` can be told, as four small configs, each option one field (lowrank_cli.option_fields):

    Targets      what to factorize      include, exclude, rank_pattern
    Ranking      how to rank            kappa (or ratio), rank_multiple, budget, target_macs, plan_kind and its timing
    Truncation   how to truncate        svd, device, dtype
    Calibration  data-aware truncation  calib, calib_samples, calib_mode, tokenizer, calib_spill(_dir)

`factorize(model, ranking=Ranking(kappa=3))` and `factorize(model, kappa=3)` are one call: a keyword is the field
of its config (`FactorizeOptions.of`). `FactorizeOptions.check` refuses the values and the combinations that
cannot work, for the API and `lrc factorize` alike (whose options are these fields, cli/factorize_cmd.py).
Torch-free: `lrc --help` reads these fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.errors import UsageError
from lowrank_cli.models.source_options import DEVICE
from lowrank_cli.option_fields import (
    DEFAULT_SHARD_SIZE,
    Opt,
    check_values,
    given_fields,
    option,
    rank_multiple_check,
    size_check,
    whole_or_auto,
)

if TYPE_CHECKING:
    import torch

BUDGET_PANEL, CALIB_PANEL, SPEED_PANEL = "Rank budget (instead of --kappa)", "Data-aware truncation", "Speed plan"
OUTPUT_PANEL = "Reading and writing"
DEFAULT_KAPPA = 2.0
DEFAULT_SVD = "exact"
SVD_METHODS = ("exact", "randomized")  # compress.svd.SVD_METHODS (that module imports torch; test_help pins them)
PLAN_KINDS = ("pela", "speed")
CALIB_MODES = ("sequential", "parallel")


def macs_of(text: Any) -> Any:
    """--target-macs as written (9G, 2.5e9) -> a whole number of MACs; a number (the API's form) is kept."""
    if not isinstance(text, str):
        return text
    from lowrank_cli.evaluation.counting import parse_size

    try:
        return parse_size(text)
    except UsageError as e:
        raise UsageError(f"`target_macs`: {e}") from None


# Also the options of `recover`'s on-the-fly factorization (training.options.RecoverOptions)
RANK_MULTIPLE = Opt(8, check=rank_multiple_check("rank_multiple"), parse=whole_or_auto, cli_type=str, metavar="N|auto",
                    help="Round ranks down to a multiple of this (8: tensor cores; 1: the paper's ranks; auto: what "
                    "the device likes).")
CALIB_SAMPLES = Opt(256, low=1, panel=CALIB_PANEL, help="Images (or texts) of --calib to use.")


@dataclass
class Targets:
    """Which linears to factorize: the block linears (default), or those `include` names, less `exclude`;
    `rank_pattern` fixes the rank of some (see compress.plan)."""

    include: list[str] | None = option(
        None, cli_type=list[str], metavar="REGEX",
        help="Factorize the linears whose name fully matches REGEX (repeatable) instead of the block linears.")
    exclude: list[str] | None = option(
        None, cli_type=list[str], metavar="REGEX",
        help="Keep the linears whose name fully matches REGEX dense (repeatable; wins over --include).")
    rank_pattern: list[str] | None = option(
        None, cli_type=list[str], metavar="REGEX=RANK",
        help="Rank of the modules whose name fully matches REGEX (repeatable; first match wins).")


@dataclass
class Ranking:
    """How each layer's rank is chosen: one ratio `kappa` (PELA's rule), or a `budget` / `target_macs` shared by
    all of them; rounded to `rank_multiple`; `plan_kind` speed also times every layer shape on the device."""

    kappa: float | None = option(
        None, low=1, low_open=True, note=" (the compression ratio of each layer)",
        help=f"Per-layer compression ratio of parameters and MACs (> 1; default {DEFAULT_KAPPA:g}).")
    ratio: float | None = option(
        None, low=0, high=1, low_open=True, high_open=True, note=" (the fraction of the target layers' parameters "
        "removed)", help="Fraction of the target layers' parameters to remove, between 0 and 1 (SVD-LLM's "
        "compression ratio): --kappa 1/(1-R) for every layer.")
    rank_multiple: int | str = RANK_MULTIPLE.field()
    budget: float | None = option(
        None, low=0, high=1, low_open=True, high_open=True, panel=BUDGET_PANEL,
        note=" (the fraction of the target layers' parameters to keep)",
        help="Fraction of the target layers' parameters to keep, between 0 and 1; ranks allocated per layer.")
    target_macs: int | None = option(
        None, low=1, limit=False, cli_type=str, parse=macs_of, metavar="MACS", panel=BUDGET_PANEL,
        help="MACs of the whole model to aim for (e.g. 9G), ranks allocated per layer.")
    plan_kind: str = option(
        "pela", choices=PLAN_KINDS, flag="--plan", panel=SPEED_PANEL,
        help="pela: the rank rule; speed: also time each layer shape on --device and keep dense what is not faster.")
    plan_batch_size: int | None = option(None, low=1, panel=SPEED_PANEL,
                                         help="Batch size --plan speed times (default 256 on CUDA, 16 on CPU).")
    plan_dtype: str | torch.dtype | None = option(
        None, panel=SPEED_PANEL, help="Precision the model will run in, for --plan speed and --rank-multiple auto "
        "(default: --dtype, else bf16 on CUDA and the source's on CPU).")
    plan_fused: bool | None = option(
        None, flag="--plan-fused/--no-plan-fused", panel=SPEED_PANEL,
        help="Time the factorized layers of --plan speed as the fused Triton kernel runs them (CUDA with Triton "
        "only; default off, as lrc bench and lowrank_cli.load run them).")

    @property
    def per_layer_kappa(self) -> float:
        """The kappa of the rank rule: `kappa`, or from `ratio` R (the rule keeps 1/kappa of a layer, so R = 1 -
        1/kappa), else the default."""
        if self.ratio is not None:
            return 1.0 / (1.0 - self.ratio)
        return DEFAULT_KAPPA if self.kappa is None else self.kappa

    @property
    def budgets(self) -> list[str]:
        return [name for name in ("budget", "target_macs") if getattr(self, name) is not None]


@dataclass
class Truncation:
    """How each planned layer is truncated: the SVD method (a plain SVD; `calib` makes it data-aware), where it
    runs, and the precision the factors are stored in (default: the source's)."""

    svd: str | None = option(
        None, choices=SVD_METHODS, help=f"{SVD_METHODS[0]} (torch.linalg.svd, the default) or {SVD_METHODS[1]} "
        "(torch.svd_lowrank); --calib decomposes its own way.")
    device: str | torch.device | None = DEVICE.field()
    dtype: str | torch.dtype | None = option(None, help="Store the model in this precision (default: the source's).")

    @property
    def method(self) -> str:
        return self.svd or DEFAULT_SVD


@dataclass
class Calibration:
    """Data-aware truncation (SVD-LLM's whitening): each layer's output error on `calib_samples` of `calib`'s
    images or texts (tokenised by `tokenizer`, a tokenizer or the folder / Hub repo that has one)."""

    calib: str | None = option(
        None, cli_type=Path, metavar="PATH", panel=CALIB_PANEL,
        help="An image folder (ImageFolder or flat), or for text models a .txt / .jsonl file or folder of them.")
    calib_samples: int = CALIB_SAMPLES.field()
    calib_mode: str | None = option(
        None, choices=CALIB_MODES, panel=CALIB_PANEL,
        help="sequential: each decoder layer calibrated on what the compressed layers before it give (SVD-LLM; the "
        "default for causal LMs); parallel: every layer in one pass (the default elsewhere).")
    tokenizer: Any = option(None, cli_type=str, metavar="DIR|REPO", panel=CALIB_PANEL,
                            help="Text --calib: folder or Hub repo of the tokenizer (default: the source's).")
    calib_spill: bool | None = option(
        None, flag="--calib-spill/--no-calib-spill", panel=CALIB_PANEL,
        help="Sequential calibration: hold the hidden states entering each decoder layer on disk (--no-calib-spill: "
        "in memory; default: on disk when they are over 25% of the available memory).")
    calib_spill_dir: str | None = option(
        None, cli_type=Path, metavar="DIR", panel=CALIB_PANEL,
        help="Folder for the temporary file of --calib-spill (default: the output's folder).")


@dataclass
class Writing:
    """How `factorize_file` reads the source and writes the checkpoint (not options of `factorize` itself)."""

    stream: bool | None = option(
        None, flag="--stream/--no-stream", panel=OUTPUT_PANEL,
        help="Factorize block by block from the source's safetensors files, never holding the model (default: "
        "whenever the source allows it: a local folder of safetensors, no --budget or --plan speed).")
    max_shard_size: str | int = option(
        DEFAULT_SHARD_SIZE, check=size_check("max_shard_size"), panel=OUTPUT_PANEL, metavar="SIZE",
        help="Write the checkpoint as shards of at most this size with an index (e.g. 500MB, 2GiB) when it is "
        "larger.")


CONFIGS = (Targets, Ranking, Truncation, Calibration)
_CONFIG_OF = {f.name: cls for cls in CONFIGS for f in dataclasses.fields(cls)}


@dataclass
class FactorizeOptions:
    """The four configs of one `factorize` call."""

    targets: Targets = field(default_factory=Targets)
    ranking: Ranking = field(default_factory=Ranking)
    truncation: Truncation = field(default_factory=Truncation)
    calibration: Calibration = field(default_factory=Calibration)

    @classmethod
    def of(cls, targets: Targets | None = None, ranking: Ranking | None = None, truncation: Truncation | None = None,
           calibration: Calibration | None = None, **keywords: Any) -> FactorizeOptions:
        """The configs given, each keyword set on its own config (`kappa=3` is `ranking=Ranking(kappa=3)`); a
        keyword for a config also given as an object is refused (one of them would be dropped)."""
        given = {"targets": targets, "ranking": ranking, "truncation": truncation, "calibration": calibration}
        unknown = sorted(set(keywords) - set(_CONFIG_OF))
        if unknown:
            raise TypeError(f"factorize() got unexpected keyword argument(s): {', '.join(unknown)}")
        parts = {}
        for name, config_cls in zip(given, CONFIGS):
            own = {k: v for k, v in keywords.items() if _CONFIG_OF[k] is config_cls}
            if own and given[name] is not None:
                raise TypeError(f"give {', '.join(own)} in `{name}` or as keywords, not both")
            parts[name] = given[name] if given[name] is not None else config_cls(**own)
        return cls(**parts)

    def keywords(self) -> dict[str, Any]:
        """Every option as a keyword (what `factorize_file` and `factorize` take)."""
        return {k: v for part in self.parts() for k, v in dataclasses.asdict(part).items()}

    def parts(self) -> tuple[Any, ...]:
        return self.targets, self.ranking, self.truncation, self.calibration

    def check(self, given: set[str] | None = None) -> None:
        """Refuse values that cannot work and options that others make useless (never drop one silently).
        `given`: the options the caller set (default: those that are not their default)."""
        for part in self.parts():
            check_values(part)
        given = set().union(*map(given_fields, self.parts())) if given is None else set(given)
        for wrong, message in self.conflicts(given):
            if wrong:
                raise UsageError(message)

    def conflicts(self, given: set[str]) -> list[tuple[bool, str]]:
        r, t, c, budgets = self.ranking, self.targets, self.calibration, self.ranking.budgets
        speed = r.plan_kind == "speed"
        first = budgets[0] if budgets else ""
        return [
            (len(budgets) == 2, "`budget` and `target_macs` both set the size: give one of them"),
            (bool(budgets) and r.kappa is not None,
             f"`{first}` allocates the ranks per layer, `kappa` gives every layer one ratio: give one of them"),
            (r.ratio is not None and r.kappa is not None,
             "`ratio` and `kappa` both set every layer's ratio (`ratio` R is `kappa` 1/(1-R)): give one of them"),
            (bool(budgets) and r.ratio is not None,
             f"`{first}` allocates the ranks per layer, `ratio` gives every layer one ratio: give one of them"),
            (c.calib_mode == "sequential" and bool(budgets),
             f"`{first}` allocates every rank from all layers' statistics at once, and `calib_mode` sequential needs "
             "each layer's rank before the next layer's statistics: use `calib_mode` parallel"),
            (bool(budgets) and bool(t.rank_pattern),
             f"`{first}` allocates every rank, `rank_pattern` fixes some: give one of them"),
            ("plan_batch_size" in given and not speed,
             "`plan_batch_size` is the batch that `plan_kind=speed` times: add `plan_kind=speed`, or drop it"),
            ("plan_fused" in given and not speed, "`plan_fused=True` / `plan_fused=False` say how `plan_kind=speed` "
             "times the layers: add `plan_kind=speed`, or drop it"),
            ("plan_dtype" in given and not speed and r.rank_multiple != "auto",
             "`plan_dtype` is the precision that `plan_kind=speed` and `rank_multiple=auto` time in: add one of "
             "them, or drop it"),
            *[(name in given and c.calib is None, f"`{name}` applies to the `calib` data: add `calib` PATH, or drop it")
              for name in ("calib_samples", "calib_mode", "tokenizer", "calib_spill", "calib_spill_dir")],
            (c.calib_mode == "parallel" and ("calib_spill" in given or "calib_spill_dir" in given),
             "`calib_spill` and `calib_spill_dir` say where `calib_mode` sequential holds its hidden states; "
             "parallel holds none: drop them"),
            (self.truncation.svd is not None and c.calib is not None,
             "`calib` truncates each layer by its own decomposition of the whitened weight, so `svd` does not apply: "
             "drop `svd`"),
        ]
