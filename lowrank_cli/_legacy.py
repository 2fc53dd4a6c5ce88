"""Import paths of lrc before the packages-per-stage layout (0.x), kept working for code users wrote.

`import lowrank_cli.lowrank_linear` or `from lowrank_cli.recovery import recover` resolve to the module that
holds that code now. An old module whose code now lives in one module is that very module (patching it patches
the real code); one that was split is a read-only view that finds each name in its successors.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types

# Old module -> the modules that hold its names now (the first is its main successor).
OLD_TO_NEW: dict[str, tuple[str, ...]] = {
    "lowrank_cli.lowrank_linear": ("lowrank_cli.layers.lowrank_linear",),
    "lowrank_cli.model_spec": ("lowrank_cli.models.spec", "lowrank_cli.models.build", "lowrank_cli.models.inputs"),
    "lowrank_cli.transformers_models": ("lowrank_cli.models.transformers_models", "lowrank_cli.models.build"),
    "lowrank_cli.sources": ("lowrank_cli.adapters.loading", "lowrank_cli.models.pretrained",
                            "lowrank_cli.models.loaded", "lowrank_cli.models.weights", "lowrank_cli.models.hub",
                            "lowrank_cli.models.timm_names", "lowrank_cli.models.build",
                            "lowrank_cli.models.families.timm_vision", "lowrank_cli.models.families.base"),
    "lowrank_cli.model_inputs": ("lowrank_cli.models.inputs",),
    "lowrank_cli.plan": ("lowrank_cli.compress.plan", "lowrank_cli.models.structure"),
    "lowrank_cli.svd": ("lowrank_cli.compress.svd",),
    "lowrank_cli.data_aware_svd": ("lowrank_cli.compress.whitened_svd",),
    "lowrank_cli.calibration": ("lowrank_cli.compress.calibration",),
    "lowrank_cli.aware_plan": ("lowrank_cli.compress.calibration", "lowrank_cli.compress.budget"),
    "lowrank_cli.rank_budget": ("lowrank_cli.compress.budget",),
    "lowrank_cli.speed_plan": ("lowrank_cli.compress.speed_plan",),
    "lowrank_cli.factorization": ("lowrank_cli.compress.factorization", "lowrank_cli.compress.factorize_source",
                                  "lowrank_cli.models.structure"),
    "lowrank_cli.image_data": ("lowrank_cli.data.images", "lowrank_cli.data.sampling", "lowrank_cli.models.inputs"),
    "lowrank_cli.text_data": ("lowrank_cli.data.texts", "lowrank_cli.models.inputs"),
    "lowrank_cli.distill_loss": ("lowrank_cli.training.losses", "lowrank_cli.training.features",
                                 "lowrank_cli.models.structure"),
    "lowrank_cli.train_state": ("lowrank_cli.training.state", "lowrank_cli.training.metrics"),
    "lowrank_cli.recovery": ("lowrank_cli.training.recovery", "lowrank_cli.training.result",
                             "lowrank_cli.training.step", "lowrank_cli.training.schedule",
                             "lowrank_cli.training.signals", "lowrank_cli.training.teacher",
                             "lowrank_cli.training.trainer", "lowrank_cli.data.sampling", "lowrank_cli.data.images"),
    "lowrank_cli.accuracy": ("lowrank_cli.evaluation.accuracy", "lowrank_cli.devices"),
    "lowrank_cli.counting": ("lowrank_cli.evaluation.counting",),
    "lowrank_cli.report": ("lowrank_cli.evaluation.report", "lowrank_cli.evaluation.gates",
                           "lowrank_cli.evaluation.report_format", "lowrank_cli.models.inputs"),
    "lowrank_cli.report_plot": ("lowrank_cli.evaluation.plot",),
    # Moved since: the loading of any source went above checkpoint/ (lrc checkpoints and their tasks' adapters).
    "lowrank_cli.models.sources": ("lowrank_cli.adapters.loading", "lowrank_cli.models.pretrained",
                                   "lowrank_cli.models.loaded", "lowrank_cli.models.families.timm_vision",
                                   "lowrank_cli.models.families.base"),
    "lowrank_cli.adapters.merging": ("lowrank_cli.training.merging",),
    "lowrank_cli.bench": ("lowrank_cli.evaluation.bench", "lowrank_cli.evaluation.bench_options",
                          "lowrank_cli.evaluation.profiling", "lowrank_cli.devices", "lowrank_cli.timing"),
}


class _SplitModule(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, targets: tuple[str, ...]):
        super().__init__(name, f"moved to {', '.join(targets)}")
        self._targets = targets

    def __getattr__(self, attr: str):
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) has no attribute {attr!r}")

    def __dir__(self):
        return sorted({n for t in self._targets for n in dir(importlib.import_module(t))})


class _Alias(importlib.abc.Loader):
    def __init__(self, name: str, targets: tuple[str, ...]):
        self.name, self.targets = name, targets

    def create_module(self, spec):
        if len(self.targets) == 1:
            return importlib.import_module(self.targets[0])
        return _SplitModule(self.name, self.targets)

    def exec_module(self, module) -> None:  # the target module is already executed
        pass


class LegacyPaths(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        targets = OLD_TO_NEW.get(fullname)
        return importlib.util.spec_from_loader(fullname, _Alias(fullname, targets)) if targets else None


def install() -> None:
    if not any(isinstance(f, LegacyPaths) for f in sys.meta_path):
        sys.meta_path.append(LegacyPaths())
