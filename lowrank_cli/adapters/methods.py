"""The fine-tuning methods by name (`method_for`), and the checks of their settings."""

from __future__ import annotations

from lowrank_cli.adapters.base import METHODS, AdapterConfig, Full, Method
from lowrank_cli.adapters.orthogonal import Orthogonal
from lowrank_cli.adapters.peft_methods import Dora, Lora, require_peft
from lowrank_cli.adapters.rlrr import Rlrr
from lowrank_cli.errors import UsageError

# Every method an adapter record can name. `orthogonal` is the multi-task mode's (one block of the output space per
# task), not a `method` a single fine-tuning run takes: check_method accepts METHODS only.
CLASSES: dict[str, type[Method]] = {"head": Method, "full": Full, "lora": Lora, "dora": Dora, "rlrr": Rlrr,
                                    "orthogonal": Orthogonal}
LOW_RANK_ADAPTERS = ("lora", "dora")  # the methods that take `adapter_rank`, `adapter_alpha`, `adapter_dropout`
DEFAULT_RANK = 8


def method_for(config: AdapterConfig) -> Method:
    if config.method not in CLASSES:
        raise UsageError(f"`method` '{config.method}' is not one of {', '.join(METHODS)}")
    return CLASSES[config.method](config)


def check_method(method: str, rank: int | None, alpha: float | None, dropout: float) -> None:
    """Refuse settings that do not apply to `method`, and a LoRA / DoRA without peft, before anything loads."""
    if method not in METHODS:
        raise UsageError(f"`method` '{method}' is not one of {', '.join(METHODS)}")
    if rank is not None and rank < 1:
        raise UsageError(f"`adapter_rank` must be at least 1, got {rank}")
    if alpha is not None and not (alpha > 0 and alpha != float("inf")):
        raise UsageError(f"`adapter_alpha` must be a number > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise UsageError(f"`adapter_dropout` must be in [0, 1), got {dropout}")
    if method not in LOW_RANK_ADAPTERS:
        given = [n for n, v in (("adapter_rank", rank), ("adapter_alpha", alpha), ("adapter_dropout", dropout or None))
                 if v is not None]
        if given:
            raise UsageError(f"`{given[0]}` is for `method` lora or dora; `method` {method} has no such setting: "
                             "leave it out")
    else:
        require_peft(method)
