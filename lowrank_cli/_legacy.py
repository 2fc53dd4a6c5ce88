"""Import paths of lrc before the packages-per-stage layout (0.x), kept working for code users wrote.

`import lowrank_cli.lowrank_linear` or `from lowrank_cli.recovery import recover` resolve to the module that
holds that code now; the module object is the same one, so patching it patches the real code.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

OLD_TO_NEW = {
    "lowrank_cli.lowrank_linear": "lowrank_cli.layers.lowrank_linear",
    "lowrank_cli.model_spec": "lowrank_cli.models.spec",
    "lowrank_cli.transformers_models": "lowrank_cli.models.transformers_models",
    "lowrank_cli.sources": "lowrank_cli.models.sources",
    "lowrank_cli.model_inputs": "lowrank_cli.models.inputs",
    "lowrank_cli.plan": "lowrank_cli.compress.plan",
    "lowrank_cli.svd": "lowrank_cli.compress.svd",
    "lowrank_cli.data_aware_svd": "lowrank_cli.compress.whitened_svd",
    "lowrank_cli.calibration": "lowrank_cli.compress.calibration",
    "lowrank_cli.rank_budget": "lowrank_cli.compress.budget",
    "lowrank_cli.speed_plan": "lowrank_cli.compress.speed_plan",
    "lowrank_cli.factorization": "lowrank_cli.compress.factorization",
    "lowrank_cli.image_data": "lowrank_cli.data.images",
    "lowrank_cli.text_data": "lowrank_cli.data.texts",
    "lowrank_cli.distill_loss": "lowrank_cli.training.losses",
    "lowrank_cli.train_state": "lowrank_cli.training.state",
    "lowrank_cli.recovery": "lowrank_cli.training.recovery",
    "lowrank_cli.accuracy": "lowrank_cli.evaluation.accuracy",
    "lowrank_cli.counting": "lowrank_cli.evaluation.counting",
    "lowrank_cli.report": "lowrank_cli.evaluation.report",
    "lowrank_cli.report_plot": "lowrank_cli.evaluation.plot",
    "lowrank_cli.bench": "lowrank_cli.evaluation.bench",
}


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class LegacyPaths(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = OLD_TO_NEW.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(new)) if new else None


def install() -> None:
    if not any(isinstance(f, LegacyPaths) for f in sys.meta_path):
        sys.meta_path.append(LegacyPaths())
