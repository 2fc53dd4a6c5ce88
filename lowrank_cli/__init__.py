"""lrc: low-rank factorization of pretrained transformers (PELA), with recovery and honest reports.

    import lowrank_cli
    loaded = lowrank_cli.load_model("deit_base")            # any MODEL source the CLI accepts
    result = lowrank_cli.factorize(loaded.model, kappa=2)   # in place; result.layers has errors per layer
    lowrank_cli.save(loaded.model, "deit_lr.safetensors")
    model = lowrank_cli.load("deit_lr.safetensors")         # rebuilt from the file alone
    lowrank_cli.push("deit_lr.safetensors", "org/deit-lr")  # with its model card, to the Hub
    model = lowrank_cli.load("hf-hub:org/deit-lr")          # and back
    lowrank_cli.finetune("deit_lr.safetensors", "flowers/", output="flowers.safetensors", method="lora", epochs=3)
    lowrank_cli.finetune_tasks("bert_lr.safetensors", ["sst=sst.jsonl", "sts=stsb.jsonl:score"], mode="experts",
                               output="multi.safetensors", epochs=3)
    model = lowrank_cli.load("multi.safetensors", task="sts")        # one task's model
    lowrank_cli.evaluate_tasks("multi.safetensors", ["sst=dev.jsonl", "sts=sts_dev.jsonl"])
    lowrank_cli.demo()                                      # the whole flow on a shipped ViT and digits, offline

    bert = lowrank_cli.load_model("./my-bert-folder").model  # transformers models too (the [transformers] extra)
    llama = lowrank_cli.load_model("./llama").model         # a causal LM: GPT-2, Llama, Qwen, Phi-3, ...
    lowrank_cli.factorize(llama, ratio=0.4, calib="wiki.train.txt", tokenizer="./llama")  # sequential, as SVD-LLM
    lowrank_cli.evaluate_perplexity(llama, "wiki.test.txt", "./llama", seq_len=2048)   # {"perplexity": ...}

Attributes are imported lazily so that `lrc --help` does not pay for torch and timm.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from lowrank_cli import _legacy
from lowrank_cli._version import __version__

_legacy.install()  # the 0.x import paths (lowrank_cli.lowrank_linear, ...) keep working

_API = {
    "factorize": "lowrank_cli.compress.factorization",
    "FactorizeResult": "lowrank_cli.compress.factorization",
    "FactorizeOptions": "lowrank_cli.compress.factorize_options",
    "Targets": "lowrank_cli.compress.factorize_options",
    "Ranking": "lowrank_cli.compress.factorize_options",
    "Truncation": "lowrank_cli.compress.factorize_options",
    "Calibration": "lowrank_cli.compress.factorize_options",
    "load": "lowrank_cli.adapters.loading",
    "save": "lowrank_cli.checkpoint.io",
    "read_info": "lowrank_cli.checkpoint.format",
    "CheckpointInfo": "lowrank_cli.checkpoint.format",
    "load_model": "lowrank_cli.adapters.loading",
    "sentence_transformer": "lowrank_cli.adapters.sentence",
    "LoadedModel": "lowrank_cli.models.loaded",
    "LowRankLinear": "lowrank_cli.layers.lowrank_linear",
    "fuse_lowrank": "lowrank_cli.models.fusion",
    "unfuse_lowrank": "lowrank_cli.models.fusion",
    "make_plan": "lowrank_cli.compress.plan",
    "pela_rank": "lowrank_cli.compress.plan",
    "LrcError": "lowrank_cli.errors",
    "build_report": "lowrank_cli.evaluation.report",
    "recover": "lowrank_cli.training.recovery",
    "finetune": "lowrank_cli.training.finetune",
    "FinetuneResult": "lowrank_cli.training.result",
    "finetune_tasks": "lowrank_cli.training.multitask",
    "MultitaskResult": "lowrank_cli.training.result",
    "evaluate_tasks": "lowrank_cli.evaluation.multitask",
    "RecoverResult": "lowrank_cli.training.result",
    "evaluate": "lowrank_cli.evaluation.accuracy",
    "evaluate_perplexity": "lowrank_cli.evaluation.perplexity",
    "build_card": "lowrank_cli.publish.card",
    "push": "lowrank_cli.publish.push",
    "demo": "lowrank_cli.tour.run",
    "DemoResult": "lowrank_cli.tour.run",
}

__all__ = ["__version__", *_API]

if TYPE_CHECKING:
    from lowrank_cli.adapters.loading import load, load_model
    from lowrank_cli.adapters.sentence import sentence_transformer
    from lowrank_cli.checkpoint.format import CheckpointInfo, read_info
    from lowrank_cli.checkpoint.io import save
    from lowrank_cli.compress.factorization import FactorizeResult, factorize
    from lowrank_cli.compress.factorize_options import Calibration, FactorizeOptions, Ranking, Targets, Truncation
    from lowrank_cli.compress.plan import make_plan, pela_rank
    from lowrank_cli.errors import LrcError
    from lowrank_cli.evaluation.accuracy import evaluate
    from lowrank_cli.evaluation.multitask import evaluate_tasks
    from lowrank_cli.evaluation.perplexity import evaluate_perplexity
    from lowrank_cli.evaluation.report import build_report
    from lowrank_cli.layers.lowrank_linear import LowRankLinear
    from lowrank_cli.models.fusion import fuse_lowrank, unfuse_lowrank
    from lowrank_cli.models.loaded import LoadedModel
    from lowrank_cli.publish.card import build_card
    from lowrank_cli.publish.push import push
    from lowrank_cli.training.finetune import finetune
    from lowrank_cli.training.multitask import finetune_tasks
    from lowrank_cli.training.recovery import recover
    from lowrank_cli.tour.run import DemoResult, demo
    from lowrank_cli.training.result import FinetuneResult, MultitaskResult, RecoverResult


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'lowrank_cli' has no attribute {name!r}")
