"""The options of a recovery, in one place: their defaults, their checks, and how a resume compares them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from lowrank_cli.errors import UsageError
from lowrank_cli.training.losses import LossWeights
from lowrank_cli.training.progressive import DEFAULT_DECAY, DEFAULT_DECAY_END, DEFAULT_INIT, INITS, METHODS, SCHEDULES


def options_of(cls: type, options: Any, values: dict[str, Any], api: str) -> Any:
    """The options of a training call (`recover`, `finetune`): one `cls` object, or keywords that are its fields
    (never both); checked."""
    unknown = sorted(set(values) - cls.names())
    if unknown:
        raise TypeError(f"{api}() got unexpected keyword argument(s): {', '.join(unknown)}")
    if options is not None and values:
        raise TypeError(f"give the options as keywords or as one {cls.__name__}, not both")
    opts = options if options is not None else cls(**values)
    opts.check()
    return opts


@dataclass
class TrainingOptions:
    """What every training run (`recover`, `finetune`) can be told besides what to train, on what, and where to
    write it: length, optimizer, data, held-out evaluation, saving and resuming, devices.

    Exactly one of `steps` (optimizer steps) and `epochs` (passes over the training data; fractions allowed).
    `batch_size` is per process; a step uses batch_size x grad_accum x processes samples.
    """

    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-4
    batch_size: int = 64
    grad_accum: int = 1
    temperature: float = 1.0
    label_smoothing: float = 0.0
    tokenizer: Any = None  # text data: a tokenizer, or the folder / Hub repo that has one (default: the model's)
    max_length: int | None = None  # text data: tokens per text at most (default: the model's positions, <= 512)
    library: str | None = None
    warmup_steps: int | None = None  # default: warmup_fraction of the steps
    warmup_fraction: float = 0.05
    weight_decay: float = 0.05
    clip_grad: float = 1.0  # 0: off
    augment: str | bool = "auto"  # auto | none | light | strong (data/augment.py); True / False: strong / none
    arch: str | None = None
    model_args: dict[str, Any] | None = None
    save_every: int = 500
    log_every: int = 10
    resume: bool = False
    force: bool = False
    compile: bool = False
    evaluate_accuracy: bool = True  # False: no held-out evaluation at all
    val_data: Any = None  # held-out data (default: the data's val/ split, else a share of the training data)
    val_fraction: float | None = None  # share of the training data held out (default 0.1 from 200 samples)
    eval_every: int | None = None  # steps between held-out evaluations (default: a tenth of the run)
    keep: str | None = None  # best | last (default: best when there is held-out data)
    eval_batch_size: int | None = None  # default: batch_size
    device: str | torch.device | None = "auto"
    num_workers: int | None = None  # default: the CPUs per process, at most 8
    seed: int = 0

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def check_training(self) -> None:
        """Refuse values of the shared options that cannot work, naming the parameter, before anything loads."""
        from lowrank_cli.data.augment import parse_level

        parse_level(self.augment)
        if (self.steps is None) == (self.epochs is None):
            raise UsageError("give the length of the run as `steps` N or as `epochs` E (one of them)")
        checks = [
            (self.steps is None or self.steps >= 1, f"`steps` must be at least 1, got {self.steps}"),
            (self.epochs is None or (self.epochs > 0 and math.isfinite(self.epochs)),
             f"`epochs` must be a number > 0, got {self.epochs}"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), f"`lr` must be a number > 0, got {self.lr}"),
            (self.batch_size >= 1, f"`batch_size` must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"`grad_accum` must be at least 1, got {self.grad_accum}"),
            (self.warmup_steps is None or self.warmup_steps >= 0,
             f"`warmup_steps` must be 0 or more, got {self.warmup_steps}"),
            (0 <= self.warmup_fraction < 1, f"the warm-up fraction must be in [0, 1), got {self.warmup_fraction}"),
            (self.weight_decay >= 0, f"`weight_decay` must be 0 or more, got {self.weight_decay}"),
            (self.clip_grad >= 0, f"`clip_grad` must be 0 (off) or more, got {self.clip_grad}"),
            (self.save_every >= 1, f"`save_every` must be at least 1, got {self.save_every}"),
            (self.log_every >= 1, f"`log_every` must be at least 1, got {self.log_every}"),
            (self.num_workers is None or self.num_workers >= 0,
             f"`num_workers` must be 0 or more, got {self.num_workers}"),
            (self.val_fraction is None or 0 < self.val_fraction <= 0.5,
             f"`val_fraction` must be in (0, 0.5], got {self.val_fraction}"),
            (self.eval_every is None or self.eval_every >= 1,
             f"`eval_every` must be at least 1, got {self.eval_every}"),
            (self.keep in (None, "best", "last"), f"`keep` '{self.keep}' is not one of best, last"),
            (self.eval_batch_size is None or self.eval_batch_size >= 1,
             f"`eval_batch_size` must be at least 1, got {self.eval_batch_size}"),
            (self.max_length is None or self.max_length >= 1,
             f"`max_length` must be at least 1, got {self.max_length}"),
            (not (self.val_data is not None and self.val_fraction is not None),
             "`val_data` and `val_fraction` both say where the held-out data comes from: give one of them"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoverOptions(TrainingOptions):
    """Everything `recover` can be told besides what to train (student, teacher, data, output): the shared
    TrainingOptions, and the loss weights (PELA Eq. 7, see training.losses): alpha, beta, gamma, eps, delta (and
    temperature, label_smoothing); a dense student factorized on the fly (kappa, rank_multiple); freeze_dense.
    """

    alpha: float = 1.0
    beta: float = 0.0
    gamma: float = 0.0
    eps: float = 1e-3
    delta: float = 0.0
    freeze_dense: bool = False  # train only the factorized layers
    kappa: float | None = None  # factorize a dense student on the fly
    rank: int | None = None  # ... or at this rank for every target layer (PC-LoRA's extreme compression)
    rank_multiple: int | str = 8  # or "auto"
    calib: str | None = None  # the on-the-fly factorization truncates data-aware on these images / texts
    calib_samples: int = 256
    method: str = "pela"  # pela: factorize, then distil; progressive: the dense weights fade out (training/progressive)
    init: str | None = None  # progressive: svd (default) or lora
    decay: str | None = None  # progressive: linear (default), sine or cosine
    decay_end: float | None = None  # progressive: lambda is 0 from this fraction of the steps on (default 0.8)
    lora_alpha: float | None = None  # progressive, init lora: second is scaled by lora_alpha / rank (default: scale 1)

    @property
    def weights(self) -> LossWeights:
        return LossWeights(self.alpha, self.beta, self.gamma, self.eps, self.temperature, self.label_smoothing,
                           self.delta)

    def check(self) -> None:
        """Refuse values that cannot work, naming the parameter, before anything is loaded."""
        self.weights.check()
        if self.lr is None:
            raise UsageError("`lr` must be a number > 0, got None")
        self.check_training()
        for ok, message in [
            (self.kappa is None or self.kappa > 1, f"`kappa` must be a number > 1, got {self.kappa}"),
            (self.rank_multiple == "auto" or (isinstance(self.rank_multiple, int) and self.rank_multiple >= 1),
             f"`rank_multiple` must be a whole number >= 1 or auto, got {self.rank_multiple}"),
            (self.rank is None or self.rank >= 1, f"`rank` must be at least 1, got {self.rank}"),
            (self.kappa is None or self.rank is None, "`kappa` and `rank` both set the ranks: give one of them"),
            (self.calib_samples >= 1, f"`calib_samples` must be at least 1, got {self.calib_samples}"),
            (self.calib is None or self.kappa is not None or self.rank is not None,
             "`calib` makes the on-the-fly factorization of a dense student data-aware: give `kappa` or `rank` too"),
            *self._method_checks(),
        ]:
            if not ok:
                raise UsageError(message)

    def _method_checks(self) -> list[tuple[bool, str]]:
        progressive_only = ("init", "decay", "decay_end", "lora_alpha")
        given = [f"`{name}`" for name in progressive_only if getattr(self, name) is not None]
        return [
            (self.method in METHODS, f"`method` '{self.method}' is not one of {', '.join(METHODS)}"),
            (self.method == "progressive" or not given,
             f"{', '.join(given)} belong to `method` progressive (this run is {self.method}): add `method` "
             "progressive, or leave them out"),
            (self.init is None or self.init in INITS, f"`init` '{self.init}' is not one of {', '.join(INITS)}"),
            (self.decay is None or self.decay in SCHEDULES,
             f"`decay` '{self.decay}' is not one of {', '.join(SCHEDULES)}"),
            (self.decay_end is None or 0 < self.decay_end <= 1,
             f"`decay_end` must be in (0, 1] (the fraction of the steps over which the dense weights fade out), "
             f"got {self.decay_end}"),
            (self.init != "lora" or self.calib is None,
             "`calib` makes the SVD data-aware, but `init` lora starts from random factors, not from an SVD: leave "
             "out `calib`, or use `init` svd"),
            (self.lora_alpha is None or (self.lora_alpha > 0 and math.isfinite(self.lora_alpha)),
             f"`lora_alpha` must be a number > 0, got {self.lora_alpha}"),
            (self.lora_alpha is None or self.init == "lora",
             "`lora_alpha` scales random LoRA factors: it goes with `init` lora (an SVD start needs no scale)"),
        ]

    def fixed_for_resume(self, processes: int, samples: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: the data order and the batch shape depend on it."""
        return {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "seed": self.seed,
                "freeze_dense": self.freeze_dense, "val_fraction": self.val_fraction,
                "val_data": None if self.val_data is None else str(self.val_data), "number of processes": processes,
                "number of training images": samples, "method": self.method,
                **({"init": self.init or DEFAULT_INIT, "lora_alpha": self.lora_alpha}
                   if self.method == "progressive" else {})}

    def changeable_on_resume(self, *, total: int, warmup: int, teacher: str, data: str) -> dict[str, Any]:
        """What a resumed run may change, with a warning (the result then differs from an uninterrupted run)."""
        return {"steps": total, "lr": self.lr, "warmup_steps": warmup, "weight_decay": self.weight_decay,
                "clip_grad": self.clip_grad, "alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                "eps": self.eps, "temperature": self.temperature, "label_smoothing": self.label_smoothing,
                "augment": self.augment, "teacher": teacher, "data": data, "eval_every": self.eval_every,
                "keep": self.keep,
                **({"decay": self.decay or DEFAULT_DECAY, "decay_end": self.decay_end or DEFAULT_DECAY_END}
                   if self.method == "progressive" else {})}


# The peak learning rate of each method when `lr` is not given: a new head or a few scales take large steps, every
# weight of a pretrained model small ones.
METHOD_LR = {"head": 1e-3, "full": 1e-4, "lora": 5e-4, "dora": 5e-4, "rlrr": 1e-3}


@dataclass
class FinetuneOptions(TrainingOptions):
    """Everything `finetune` can be told besides the model, the data and the output: the shared TrainingOptions
    (`lr` defaults to the method's, METHOD_LR), the method and its adapters (adapters/), whether to merge them,
    and an optional `teacher` MODEL (already fine-tuned on the task) for logit distillation with weight `gamma`
    (default 1 with a teacher) at `temperature`.
    """

    method: str = "lora"  # head | full | lora | dora | rlrr
    adapter_rank: int | None = None  # lora, dora: default adapters.methods.DEFAULT_RANK
    adapter_alpha: float | None = None  # lora, dora: default the rank (scaling 1)
    adapter_dropout: float = 0.0  # lora, dora
    targets: list[str] | None = None  # regexes over module names (default: every linear of the blocks)
    merge: bool = True  # False: write the adapters (and the head) alone, for load(base, adapters=...)
    teacher: Any = None  # a fine-tuned MODEL for logit distillation
    gamma: float | None = None  # weight of the logit distillation (default 1 with a teacher)
    lr: float | None = None
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else METHOD_LR.get(self.method, 1e-4)

    @property
    def kd_weight(self) -> float:
        return 0.0 if self.teacher is None else (1.0 if self.gamma is None else self.gamma)

    def check(self) -> None:
        """Refuse values that cannot work, naming the parameter, before anything is loaded (also a LoRA / DoRA
        without peft installed)."""
        from lowrank_cli.adapters.methods import check_method

        check_method(self.method, self.adapter_rank, self.adapter_alpha, self.adapter_dropout)
        if self.targets is not None and self.method in ("head", "full"):
            raise UsageError(f"`targets` says where adapters go; `method` {self.method} has none: leave it out, or "
                             "use lora, dora or rlrr")
        if not self.merge and self.method == "full":
            raise UsageError("`merge=False` writes the adapters alone, and `method` full has none (every weight "
                             "changes): keep the merge, or use lora, dora or rlrr")
        if self.gamma is not None and self.teacher is None:
            raise UsageError("`gamma` weighs the logit distillation from a `teacher`: give the teacher, or leave "
                             "out `gamma`")
        LossWeights(alpha=0.0, gamma=self.gamma or 0.0, temperature=self.temperature,
                    label_smoothing=self.label_smoothing).check()
        self.check_training()

    def fixed_for_resume(self, processes: int, samples: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: the data order, the batch shape and the
        adapters' shapes depend on it."""
        return {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "seed": self.seed,
                "method": self.method, "adapter_rank": self.adapter_rank, "adapter_alpha": self.adapter_alpha,
                "targets": self.targets, "val_fraction": self.val_fraction,
                "val_data": None if self.val_data is None else str(self.val_data), "number of processes": processes,
                "number of training samples": samples}

    def changeable_on_resume(self, *, total: int, warmup: int, data: str) -> dict[str, Any]:
        """What a resumed run may change, with a warning (the result then differs from an uninterrupted run)."""
        return {"steps": total, "lr": self.peak_lr, "warmup_steps": warmup, "weight_decay": self.weight_decay,
                "clip_grad": self.clip_grad, "gamma": self.kd_weight, "temperature": self.temperature,
                "label_smoothing": self.label_smoothing, "adapter_dropout": self.adapter_dropout,
                "augment": self.augment, "teacher": None if self.teacher is None else str(self.teacher), "data": data,
                "eval_every": self.eval_every, "keep": self.keep}
