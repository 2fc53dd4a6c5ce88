"""LoRA and DoRA through Hugging Face peft (the `[finetune]` extra).

peft's layers are injected in place (`inject_adapter_in_model`) on exactly the target linears: a regex that
matches their full names and nothing else. On a LowRankLinear the targets are `first` and `second`, two plain
nn.Linear: LoRA's B A merges into each factor, and DoRA's magnitude (one per output row of the factor, its norm
detached in the forward as in the paper's section 4.3) rescales that factor's rows, so the merged layer keeps
its rank. Merging goes through peft's own `merge(safe_merge=True)`, which refuses non-finite weights.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from lowrank_cli.adapters.base import Method
from lowrank_cli.errors import EnvironmentProblem, TrainingError

EXTRA = "pip install 'lowrank-cli[finetune]'"


def require_peft(method: str) -> Any:
    try:
        import peft
    except ImportError:
        raise EnvironmentProblem(f"`method` {method} uses Hugging Face peft, which is not installed: {EXTRA}") from None
    return peft


class Lora(Method):
    name = "lora"
    adds_modules = True
    dora = False

    def apply(self, model: nn.Module) -> None:
        peft = require_peft(self.name)
        c = self.config
        pattern = "|".join(re.escape(name) for name in c.targets)
        config = peft.LoraConfig(r=c.rank, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=pattern,
                                 use_dora=self.dora, init_lora_weights=True, bias="none")
        peft.inject_adapter_in_model(config, model)

    def is_adapter(self, module: nn.Module) -> bool:
        return type(module).__module__.startswith("peft.") and hasattr(module, "get_base_layer")

    def merged(self, module: nn.Module) -> nn.Module:
        try:
            module.merge(safe_merge=True)
        except ValueError as e:  # peft: "NaNs detected in the merged weights"
            raise TrainingError(f"merging the {self.name} adapters gave non-finite weights ({e}): train again with a "
                                "lower `lr`") from None
        return module.get_base_layer()


class Dora(Lora):
    name = "dora"
    dora = True
