"""lrc: low-rank factorization of pretrained transformers (PELA), with recovery and honest reports.

    import lowrank_cli
    loaded = lowrank_cli.load_model("deit_base")            # any MODEL source the CLI accepts
    result = lowrank_cli.factorize(loaded.model, kappa=2)   # in place; result.layers has errors per layer
    lowrank_cli.save(loaded.model, "deit_lr.safetensors")
    model = lowrank_cli.load("deit_lr.safetensors")         # rebuilt from the file alone

    bert = lowrank_cli.load_model("./my-bert-folder").model  # transformers models too (the [transformers] extra)

Attributes are imported lazily so that `lrc --help` does not pay for torch and timm.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from lowrank_cli._version import __version__

_API = {
    "factorize": "lowrank_cli.factorization",
    "FactorizeResult": "lowrank_cli.factorization",
    "load": "lowrank_cli.checkpoint",
    "save": "lowrank_cli.checkpoint",
    "read_info": "lowrank_cli.checkpoint",
    "CheckpointInfo": "lowrank_cli.checkpoint",
    "load_model": "lowrank_cli.sources",
    "LoadedModel": "lowrank_cli.sources",
    "LowRankLinear": "lowrank_cli.lowrank_linear",
    "make_plan": "lowrank_cli.plan",
    "pela_rank": "lowrank_cli.plan",
    "LrcError": "lowrank_cli.errors",
    "build_report": "lowrank_cli.report",
    "recover": "lowrank_cli.recovery",
    "RecoverResult": "lowrank_cli.recovery",
    "evaluate": "lowrank_cli.accuracy",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:
    from lowrank_cli.checkpoint import CheckpointInfo, load, read_info, save
    from lowrank_cli.errors import LrcError
    from lowrank_cli.factorization import FactorizeResult, factorize
    from lowrank_cli.lowrank_linear import LowRankLinear
    from lowrank_cli.plan import make_plan, pela_rank
    from lowrank_cli.accuracy import evaluate
    from lowrank_cli.recovery import RecoverResult, recover
    from lowrank_cli.report import build_report
    from lowrank_cli.sources import LoadedModel, load_model


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'lowrank_cli' has no attribute {name!r}")
