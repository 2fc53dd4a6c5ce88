"""The options of a recovery and of a fine-tuning, in one place: each one field with its default, help, range and
choices (lowrank_cli.option_fields), from which the API keywords, their checks and `lrc recover` / `lrc finetune`'s
command-line options derive; and how a resume compares them. Torch-free: `lrc --help` reads these fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lowrank_cli.compress.factorize_options import CALIB_SAMPLES, RANK_MULTIPLE
from lowrank_cli.errors import UsageError
from lowrank_cli.models.source_options import ARCH, DEVICE, LIBRARY, MODEL_ARGS, SEQ_LEN
from lowrank_cli.option_fields import check_values, option

if TYPE_CHECKING:
    import torch

    from lowrank_cli.training.losses import LossWeights

# --help panels of the options (a command may retitle them: cli/option_params.py)
LOSS_PANEL, TRAINING_PANEL, DATA_PANEL = "Loss (PELA Eq. 7)", "Training", "Data and accuracy"
STUDENT_PANEL = "A dense STUDENT, factorized on the fly"
PROGRESSIVE_PANEL = "Progressive compression (--method progressive, PC-LoRA)"
ADAPTER_PANEL = "Method and adapters"

# The progressive method's vocabularies and defaults (training.progressive runs them).
METHODS = ("pela", "progressive")
INITS = ("svd", "lora")
SCHEDULES = ("linear", "sine", "cosine")
DEFAULT_INIT, DEFAULT_DECAY, DEFAULT_DECAY_END = "svd", "linear", 0.8
AUGMENT_LEVELS = ("auto", "none", "light", "strong")  # data.augment.LEVELS (that module imports torch)


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

    steps: int | None = option(None, low=1, help="Optimizer steps (give this or --epochs).")
    epochs: float | None = option(None, low=0, low_open=True,
                                  help="Passes over the training data, > 0, fractions allowed (give this or --steps).")
    batch_size: int = option(64, low=1, help="Images (or texts) per micro-batch, per process.")
    device: str | torch.device | None = DEVICE.field()
    resume: bool = option(False, help="Continue the interrupted run from its training state.")
    force: bool = option(False, help="Overwrite the output if it exists.")
    temperature: float = option(1.0, low=0, low_open=True, panel=LOSS_PANEL,
                                help="Temperature of the logit distillation, > 0.")
    label_smoothing: float = option(0.0, low=0, high=1, high_open=True, panel=LOSS_PANEL,
                                    help="Label smoothing of the cross-entropy (labelled data), in [0, 1).")
    lr: float = option(1e-4, low=0, low_open=True, panel=TRAINING_PANEL,
                       help="Peak learning rate of AdamW (linear warm-up, then cosine to 0), > 0.")
    warmup_steps: int | None = option(None, low=0, panel=TRAINING_PANEL,
                                      help="Linear warm-up steps (default: {warmup_fraction:.0%} of the steps).")
    warmup_fraction: float = option(0.05, low=0, high=1, high_open=True, cli=False)
    weight_decay: float = option(0.05, low=0, panel=TRAINING_PANEL, help="AdamW weight decay (matrices only), >= 0.")
    clip_grad: float = option(1.0, low=0, panel=TRAINING_PANEL, help="Clip the gradient norm to this (0: off).")
    grad_accum: int = option(1, low=1, panel=TRAINING_PANEL, help="Micro-batches per optimizer step.")
    compile: bool = option(False, panel=TRAINING_PANEL, help="torch.compile the student and the teacher.")
    seed: int = option(0, panel=TRAINING_PANEL, help="Seed of the data order, augmentations and dropout.")
    save_every: int = option(500, low=1, panel=TRAINING_PANEL, help="Write the training state every N steps.")
    log_every: int = option(10, low=1, panel=TRAINING_PANEL, help="Log metrics every N steps.")
    augment: str | bool = option(  # True / False: strong / none
        "auto", choices=AUGMENT_LEVELS, panel=DATA_PANEL,
        help="Training augmentation. auto: none for images about the model's input size or smaller, light (flips, "
        "mild scale jitter) for short runs, strong (timm's random resized crops) for long runs on large images.")
    val_data: Any = option(  # held-out data (default: the data's val/ split, else a share of the training data)
        None, cli_type=Path, metavar="DIR|FILE", panel=DATA_PANEL,
        help="Held-out data to score the student on (default: DATA's val/ split, else --val-fraction of DATA).")
    val_fraction: float | None = option(
        None, low=0, high=0.5, low_open=True, panel=DATA_PANEL,
        help="Share of the training data held out, in (0, 0.5] (default: 0.1 when there are 200 samples or more and "
        "no val/ split).")
    eval_every: int | None = option(None, low=1, panel=DATA_PANEL,
                                    help="Steps between held-out evaluations (default: a tenth of the run).")
    keep: str | None = option(
        None, choices=("best", "last"), panel=DATA_PANEL,
        help="Which state to write: best held-out score (the default with held-out data) or the last step.")
    num_workers: int | None = option(
        None, low=0, flag="--workers", panel=DATA_PANEL,
        help="Data-loading processes per training process (default: its share of the CPUs, at most 8).")
    tokenizer: Any = option(  # a tokenizer, or the folder / Hub repo that has one
        None, cli_type=str, metavar="DIR|REPO", panel=DATA_PANEL,
        help="Text data: folder or Hub repo of the tokenizer (default: the teacher's).")
    max_length: int | None = option(
        None, low=1, panel=DATA_PANEL, help="Text data: tokens per text at most (default: the model's positions, at "
        "most 512).")
    seq_len: int | None = SEQ_LEN.field(
        panel=DATA_PANEL, help="Causal LMs: the text is one token stream cut into windows of this many tokens "
        "(default 128, at most the model's positions).")
    evaluate_accuracy: bool = option(True, flag="--eval/--no-eval", panel=DATA_PANEL,  # False: no held-out evaluation
                                     help="Measure accuracy on the val split before and after.")
    eval_batch_size: int | None = option(None, low=1, panel=DATA_PANEL,
                                         help="Batch size of the accuracy runs (default: --batch-size).")
    library: str = LIBRARY.field()
    arch: str | None = ARCH.field()
    model_args: dict[str, Any] | None = MODEL_ARGS.field()

    @classmethod
    def names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def check_training(self) -> None:
        """Refuse values of the shared options that cannot work, naming the parameter, before anything loads."""
        from lowrank_cli.data.augment import parse_level

        check_values(self)
        parse_level(self.augment)
        if (self.steps is None) == (self.epochs is None):
            raise UsageError("give the length of the run as `steps` N or as `epochs` E (one of them)")
        if self.val_data is not None and self.val_fraction is not None:
            raise UsageError("`val_data` and `val_fraction` both say where the held-out data comes from: give one of "
                             "them")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# recover's peak learning rate when `lr` is not given. A sentence-transformers model learns its embedding term
# faster at a larger one (benchmarks/sentence_embedding.py: all-MiniLM-L6-v2, kappa 2, 400 x 32).
RECOVER_LR = 1e-4
SENTENCE_LR = 5e-4


@dataclass
class RecoverOptions(TrainingOptions):
    """Everything `recover` can be told besides what to train (student, teacher, data, output): the shared
    TrainingOptions, and the loss weights (PELA Eq. 7, see training.losses): alpha, beta, gamma, eps, delta (and
    temperature, label_smoothing); a dense student factorized on the fly (kappa, rank_multiple); freeze_dense.
    """

    alpha: float = option(1.0, low=0, panel=LOSS_PANEL,
                          help="Weight of the feature distillation (block outputs, MSE), >= 0.")
    beta: float = option(0.0, low=0, panel=LOSS_PANEL,
                         help="Weight of the weight-perturbation regulariser (max|second@first - W| - eps)^2, >= 0.")
    gamma: float | None = option(None, low=0, panel=LOSS_PANEL,
                                 help="Weight of the logit distillation (KL at --temperature), >= 0 (default: 1 for "
                                 "causal LMs, token-level KL; else 0).")
    lr: float | None = option(None, low=0, low_open=True, panel=TRAINING_PANEL,
                              help="Peak learning rate of AdamW (linear warm-up, then cosine to 0), > 0 (default: "
                              f"{RECOVER_LR:g}; {SENTENCE_LR:g} for a sentence-transformers model).")
    delta: float | None = option(None, low=0, panel=LOSS_PANEL,
                                 help="Text models: weight of the MSE on the final pooled output (a sentence-"
                                 "transformers model's embedding), >= 0 (default: 1 for those models, else 0).")
    eps: float = option(1e-3, low=0, panel=LOSS_PANEL, help="The weight perturbation the regulariser aims at, >= 0.")
    freeze_dense: bool = option(False, panel=TRAINING_PANEL,
                                help="Train only the factorized layers (norms, embeddings, head stay).")
    shard: str = option(
        "ddp", choices=("ddp", "fsdp"), panel=TRAINING_PANEL,
        help="Under torchrun: ddp, every process holds the whole student and teacher; fsdp, FSDP2 shards both per "
        "block over the processes (for models that do not fit one GPU), its training state saved sharded (DCP).")
    kappa: float | None = option(None, low=1, low_open=True, note=" (the compression ratio of each layer)",
                                 panel=STUDENT_PANEL, help="Factorize a dense STUDENT on the fly at this ratio (> 1).")
    rank_multiple: int | str = RANK_MULTIPLE.field(
        show_default=False, panel=STUDENT_PANEL,
        help="With --kappa: round ranks down to a multiple of this (default {rank_multiple}; auto: what the device "
        "likes).")
    rank: int | None = option(  # PC-LoRA's extreme compression
        None, low=1, panel=STUDENT_PANEL,
        help="Factorize a dense STUDENT on the fly at this rank for every target layer (instead of --kappa).")
    calib: str | None = option(None, metavar="PATH", panel=STUDENT_PANEL,
                               help="With --kappa / --rank: data-aware truncation on these images or texts.")
    calib_samples: int = CALIB_SAMPLES.field(panel=STUDENT_PANEL, help="Images or texts of --calib to use.")
    method: str = option(
        "pela", choices=METHODS, panel=PROGRESSIVE_PANEL,
        help="pela: distil a low-rank student; progressive: PC-LoRA, the dense weights fade out while the low-rank "
        "factors learn (a dense STUDENT with --kappa or --rank; holds the dense weights during training too).")
    init: str | None = option(
        None, choices=INITS, panel=PROGRESSIVE_PANEL,
        help="svd (default): the truncated SVD + the dense remainder, exactly the dense model at the start; lora: "
        "W_res = W, random first, zero second (the paper's).")
    decay: str | None = option(None, choices=SCHEDULES, panel=PROGRESSIVE_PANEL,
                               help=f"How lambda falls from 1 to 0 (default {DEFAULT_DECAY}).")
    decay_end: float | None = option(
        None, low=0, high=1, low_open=True, panel=PROGRESSIVE_PANEL,
        note=" (the fraction of the steps over which the dense weights fade out)",
        help=f"lambda is 0 from this fraction of the steps on, in (0, 1] (default {DEFAULT_DECAY_END:g}: the last "
        f"{1 - DEFAULT_DECAY_END:.0%} train the pure low-rank model).")
    lora_alpha: float | None = option(
        None, low=0, low_open=True, panel=PROGRESSIVE_PANEL,
        help="--init lora: second is scaled by this / rank, folded in at the end (default: scale 1).")

    @property
    def weights(self) -> LossWeights:
        from lowrank_cli.training.losses import LossWeights

        return LossWeights(self.alpha, self.beta, self.gamma or 0.0, self.eps, self.temperature, self.label_smoothing,
                           0.0 if self.delta is None else self.delta)

    def weights_for(self, stream: bool) -> LossWeights:
        """The loss weights of a run: `gamma` unset is CAUSAL_LM_KD (token-level KL) for a causal LM, else 0."""
        import dataclasses

        gamma = self.gamma if self.gamma is not None else (CAUSAL_LM_KD if stream else 0.0)
        return dataclasses.replace(self.weights, gamma=gamma)

    def check(self) -> None:
        """Refuse values that cannot work, naming the parameter, before anything is loaded."""
        self.check_training()
        self.weights.check()
        for ok, message in [
            (self.kappa is None or self.rank is None, "`kappa` and `rank` both set the ranks: give one of them"),
            (self.calib is None or self.kappa is not None or self.rank is not None,
             "`calib` makes the on-the-fly factorization of a dense student data-aware: give `kappa` or `rank` too"),
            *self._method_checks(),
            *self._shard_checks(),
        ]:
            if not ok:
                raise UsageError(message)

    def _shard_checks(self) -> list[tuple[bool, str]]:
        """What `shard` fsdp does not do (yet): each needs a whole layer or a whole model on one process."""
        if self.shard != "fsdp":
            return []
        return [
            (self.method != "progressive", "`method` progressive keeps the dense weights beside the factors and is "
             "not sharded: use `shard` ddp, or `method` pela"),
            (self.beta == 0, "`beta` compares each whole factorized layer with the teacher's whole weight, which "
             "`shard` fsdp splits over the processes: use `beta` 0, or `shard` ddp"),
            (not self.compile, "`compile` is not supported with `shard` fsdp yet: leave it out, or use `shard` ddp"),
        ]

    def _method_checks(self) -> list[tuple[bool, str]]:
        progressive_only = ("init", "decay", "decay_end", "lora_alpha")
        given = [f"`{name}`" for name in progressive_only if getattr(self, name) is not None]
        return [
            (self.method == "progressive" or not given,
             f"{', '.join(given)} belong to `method` progressive (this run is {self.method}): add `method` "
             "progressive, or leave them out"),
            (self.init != "lora" or self.calib is None,
             "`calib` makes the SVD data-aware, but `init` lora starts from random factors, not from an SVD: leave "
             "out `calib`, or use `init` svd"),
            (self.lora_alpha is None or self.init == "lora",
             "`lora_alpha` scales random LoRA factors: it goes with `init` lora (an SVD start needs no scale)"),
        ]

    def fixed_for_resume(self, processes: int, samples: int) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one: the data order and the batch shape depend on it.
        A sharded state (`shard` fsdp) reshards on another number of processes: the run continues exactly when
        `batch_size` x processes stays (the global batches are then the same images)."""
        fixed = self._fixed_for_resume(processes, samples)
        if self.shard == "fsdp":
            del fixed["batch_size"], fixed["number of processes"]
            fixed["images per micro-batch over all processes"] = self.batch_size * processes
        return fixed

    def _fixed_for_resume(self, processes: int, samples: int) -> dict[str, Any]:
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
CAUSAL_LM_KD = 1.0  # the weight of the token-level KL of a causal LM's recovery when `gamma` is not given
KD_WEIGHT = 1.0  # the weight of the logit distillation with a `teacher` and no `gamma`


@dataclass
class FinetuneOptions(TrainingOptions):
    """Everything `finetune` can be told besides the model, the data and the output: the shared TrainingOptions
    (`lr` defaults to the method's, METHOD_LR), the method and its adapters (adapters/), whether to merge them,
    and an optional `teacher` MODEL (already fine-tuned on the task) for logit distillation with weight `gamma`
    (default 1 with a teacher) at `temperature`.
    """

    method: str = option("lora", choices=tuple(METHOD_LR), panel=ADAPTER_PANEL,
                         help="What trains besides the new head: nothing (head), everything (full), LoRA, DoRA or RLRR "
                         "adapters.")
    adapter_rank: int | None = option(None, low=1, panel=ADAPTER_PANEL,  # default adapters.methods.DEFAULT_RANK
                                      help="LoRA / DoRA rank (default 8).")
    adapter_alpha: float | None = option(None, low=0, low_open=True, panel=ADAPTER_PANEL,
                                         help="LoRA / DoRA alpha, > 0 (default: the rank, a scaling of 1).")
    adapter_dropout: float = option(0.0, low=0, high=1, high_open=True, panel=ADAPTER_PANEL,
                                    help="LoRA / DoRA dropout, in [0, 1).")
    targets: list[str] | None = option(
        None, cli_type=list[str], metavar="REGEX", panel=ADAPTER_PANEL,
        help="Linears to adapt, full match on module names; a low-rank layer's name stands for both factors "
        "(repeatable; default: every linear of the transformer blocks).")
    merge: bool = option(True, flag="--no-merge", panel=ADAPTER_PANEL,  # False: for load(base, adapters=...)
                         help="Write the adapters alone with the head, not merged into the model (one task).")
    teacher: Any = option(None, cli_type=str, metavar="MODEL", panel=ADAPTER_PANEL,
                          help="A model already fine-tuned on this task: adds logit distillation.")
    gamma: float | None = option(None, low=0, panel=ADAPTER_PANEL,
                                 help=f"Weight of the logit distillation from --teacher, >= 0 (default {KD_WEIGHT:g}).")
    lr: float | None = option(
        None, low=0, low_open=True, panel=TRAINING_PANEL,
        help=f"Peak learning rate of AdamW, > 0 (default: {', '.join(f'{m} {lr:g}' for m, lr in METHOD_LR.items())}).")
    batch_size: int = option(32, low=1, help="Samples per micro-batch, per process.")
    weight_decay: float = option(0.01, low=0, panel=TRAINING_PANEL, help="AdamW weight decay (matrices only), >= 0.")
    warmup_fraction: float = option(0.1, low=0, high=1, high_open=True, cli=False)
    val_data: Any = option(None, cli_type=Path, metavar="DIR|FILE", panel=DATA_PANEL,
                           help="Held-out data (default: DATA's val/ split, else --val-fraction of DATA).")
    eval_every: int | None = option(None, low=1, panel=DATA_PANEL,
                                    help="Steps between held-out evaluations (default: once an epoch).")
    tokenizer: Any = option(
        None, cli_type=str, metavar="DIR|REPO", panel=DATA_PANEL,
        help="Text data: folder or Hub repo of the tokenizer (default: the model's, or the one its checkpoint "
        "records).")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else METHOD_LR.get(self.method, 1e-4)

    @property
    def kd_weight(self) -> float:
        return 0.0 if self.teacher is None else (KD_WEIGHT if self.gamma is None else self.gamma)

    def check(self) -> None:
        """Refuse values that cannot work, naming the parameter, before anything is loaded (also a LoRA / DoRA
        without peft installed)."""
        from lowrank_cli.adapters.methods import check_method
        from lowrank_cli.training.losses import LossWeights

        check_values(self)
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
