"""What a kind of run answers the one setup (training.setup.build_setup) and the one loop (training.run), and the
data every kind shares.

    recover          training.recover_strategy.RecoverStrategy   PELA; progressive adds its lambda callback
    finetune         training.finetune_strategy.FinetuneStrategy head / full / lora / dora / rlrr, a teacher or
                                                                 not, merged or an adapter file; one task of a
                                                                 multi-task run (experts, merge, orthogonal)
    finetune_tasks   training.shared_strategy.SharedStrategy     mode shared: every task's batches, a head each

A new kind of run is a new strategy: its data, models, loss, trainable parameters, held-out scorer (which names
the tracked metric and its direction), callbacks and what it writes; the setup steps and the loop stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from torch import nn


@dataclass
class Task:
    """What a fine-tuning learns: classes (in order) or a regression score, from `data`."""

    classes: list[str] | None
    regression: bool
    data: Path

    @property
    def outputs(self) -> int:
        return 1 if self.regression else len(self.classes)

    def record(self) -> dict[str, Any]:
        return {"task": "regression" if self.regression else "classification", "classes": self.classes}


@dataclass
class RunData:
    """The training data of a run and what was decided about it."""

    modality: Any
    train: Any
    val: Any
    use_labels: bool = False
    val_from: str = ""
    augment: str = "none"
    augment_reason: str = ""
    why_no_accuracy: str = "no labelled val/ split"
    val_labels_fit: bool = True  # False: the held-out images are scored by distillation, not accuracy
    task: Task | None = None  # a fine-tuning's task

    @property
    def samples(self) -> int:
        return len(self.train)

    @property
    def unit(self) -> str:
        return self.modality.unit  # what the progress bar counts per second

    @property
    def sample_name(self) -> str:
        return self.modality.sample_name  # images, texts or windows: <name>_per_s and <name> in the metrics lines

    @property
    def labelled_val(self) -> bool:
        """Held-out images with labels: scored by accuracy (the teacher's too)."""
        return (self.val is not None and self.modality.name == "images" and self.val.labelled
                and self.val_labels_fit)

    def why_not_scored(self, opts: Any) -> str:
        return "`evaluate_accuracy=False`" if not opts.evaluate_accuracy else self.why_no_accuracy


@dataclass
class Models:
    """The models of a run: the plain student that trains, its frozen teacher (or None), the dtype it is written
    in, the blocks whose outputs are distilled, its input size (a blank batch's shape), what to do before each
    micro-batch's forward (a multi-task run switches heads). A strategy keeps what else it needs in a subclass."""

    model: nn.Module
    teacher: nn.Module | None
    save_dtype: Any
    input_size: tuple[int, ...]
    blocks: list[str] = field(default_factory=list)
    on_batch: Any = None


def training_loader(env: Any, opts: Any, d: RunData, transform_from: nn.Module, input_size: tuple[int, ...],
                    total: int) -> tuple[Any, Any]:
    """The training batches of `d` (loader, sampler), with the augmentation that fits the data (`auto`: from the
    images and the run's length), decided here and kept in `d`."""
    from lowrank_cli.data.augment import parse_level

    ctx = env.ctx
    passes = total * opts.batch_size * opts.grad_accum * ctx.world_size / max(len(d.train), 1)
    d.augment, d.augment_reason = d.modality.augmentation(parse_level(opts.augment), d.train, input_size, passes)
    if d.modality.augments:
        env.log(f"Augmentation: {d.augment} ({d.augment_reason})")
    return d.modality.loader(d.train, transform_from, batch_size=opts.batch_size, seed=opts.seed, rank=ctx.rank,
                             world_size=ctx.world_size, num_workers=env.workers,
                             pin_memory=ctx.device.type == "cuda", augment=d.augment)


class Strategy(Protocol):
    """One kind of run, in the order the setup asks (`env`: training.setup.RunEnv; `setup`: its Setup)."""

    opts: Any
    api: str  # what the resume hint calls ("recover", "finetune", "finetune_tasks")
    phase: str  # what the progress bar calls the training steps
    distribution: Any  # how the student is spread over processes (training.parallel.DataParallel)

    def read_data(self, env: Any) -> Any:
        """The data (with `samples` and `unit`), read before any model loads."""

    def fixed_for_resume(self, env: Any, data: Any) -> dict[str, Any]:
        """What a resumed run must share with the interrupted one (a difference refuses the resume)."""

    def load_models(self, env: Any, data: Any) -> Models:
        """The student (and teacher), on the device, in float32, with what the method puts on them."""

    def loss(self, env: Any, data: Any, models: Models) -> Any:
        """Which losses (RecoveryLoss, TaskLoss, ...): `active` terms, `use_labels`, `weights`."""

    def loader(self, env: Any, data: Any, models: Models, total: int) -> tuple[Any, Any]:
        """(the training batches, their sampler: set_epoch, set_start_batch, batches_per_epoch)."""

    def method_callbacks(self, schedule: Any) -> list[Any]:
        """The method's own callbacks (progressive: its lambda), once the run's length is known."""

    def trainable(self, env: Any, data: Any, models: Models, loss: Any) -> list[tuple[str, nn.Parameter]]:
        """Which parameters train (the others get requires_grad False)."""

    def changeable_on_resume(self, data: Any, models: Models, schedule: Any) -> dict[str, Any]:
        """What a resumed run may change, with a warning."""

    def before_training(self, setup: Any) -> None:
        """What is said and measured before the first step (the data; accuracy before training)."""

    def held_out(self, setup: Any) -> Any:
        """The held-out evaluation callback (training.callbacks.HeldOutEval), or None without held-out data."""

    def after_training(self, setup: Any, trainer: Any) -> Any:
        """The best state back, the model as it is written (layers converted, adapters merged), scored."""

    def write(self, setup: Any, trainer: Any, ended: Any) -> Any:
        """Record and write the output; return the run's result."""
