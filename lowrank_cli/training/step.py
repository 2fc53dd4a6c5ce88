"""One recovery step: forward both models on each micro-batch, Eq. 7, backward, clip, AdamW step.

One training step: the frozen teacher (eval mode, no gradients) and the student see the same micro-batch; forward
hooks on the innermost transformer blocks keep both models' block outputs, so the student runs forward once;
the loss is training.losses.RecoveryLoss."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowrank_cli import distributed
from lowrank_cli.data.images import Batch
from lowrank_cli.devices import autocast_for
from lowrank_cli.errors import TrainingError
from lowrank_cli.training.features import BlockOutputs
from lowrank_cli.training.losses import RecoveryLoss


@dataclass
class StepStats:
    terms: dict[str, float]  # mean over the step's micro-batches and ranks
    grad_norm: float
    images: int  # over all ranks
    skipped: int  # over all ranks


def compile_hooked(module: nn.Module, **options: Any) -> Callable[..., Any]:
    """torch.compile a model whose blocks carry distillation hooks (BlockOutputs).

    Dynamo does not guard on module hooks by default (`skip_nnmodule_hook_guards`), so a graph traced for another
    instance of the same class without hooks (a dense twin, a compiled model timed earlier in the process) would
    be reused for this one and its hooks would silently never run. Guarding on them costs a few checks per call."""
    import torch._dynamo

    torch._dynamo.config.skip_nnmodule_hook_guards = False
    return torch.compile(module, **options)


class Distiller:
    """One recovery step: forward both models on each micro-batch, Eq. 7, backward, clip, AdamW step.

    `student` is the plain model (hooks go on its blocks); `forward` calls it, possibly through DDP and
    torch.compile. Without a `teacher` (supervised fine-tuning, training.task_loss) only the student runs: the
    loss then uses no block outputs and gets `teacher_out` None. The step's loss terms, gradient norm and image
    counts are summed over ranks in one collective and checked for finiteness before the optimizer step, so every
    rank takes the same decision.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, loss: RecoveryLoss, blocks: list[str], *,
                 optimizer: torch.optim.Optimizer, params: list[nn.Parameter], clip_grad: float,
                 device: torch.device, input_size: tuple[int, ...], ctx: distributed.DistContext | None = None,
                 forward: Callable[[torch.Tensor], Any] | None = None,
                 teacher_forward: Callable[[torch.Tensor], Any] | None = None):
        self.student, self.teacher, self.loss = student, teacher, loss
        self.optimizer, self.params, self.clip_grad = optimizer, params, clip_grad
        self.device, self.input_size = device, tuple(input_size)
        self.ctx = ctx or distributed.DistContext(device=device)
        self.forward = forward if forward is not None else student
        self.teacher_forward = teacher_forward if teacher_forward is not None else teacher
        # Block outputs feed L_fd, and L_pool of a model whose output has no last hidden state.
        # L_fd reads every block; L_pool alone only the last one (its fallback for a model without a pooled output).
        self.blocks = blocks if loss.weights.alpha > 0 else blocks[-1:] if loss.weights.delta > 0 else []
        if teacher is None and self.blocks:
            raise ValueError("feature or pooled-output distillation needs a teacher")
        self.student_blocks = BlockOutputs(student, self.blocks)
        self.teacher_blocks = BlockOutputs(teacher, self.blocks) if teacher is not None else BlockOutputs(student, [])
        self.terms = loss.active
        # Called with each micro-batch before its forward: a multi-task run switches to the batch's task's head.
        self.on_batch: Callable[[Batch], None] | None = None

    def close(self) -> None:
        self.student_blocks.remove()
        self.teacher_blocks.remove()

    def micro_step(self, images: torch.Tensor, labels: torch.Tensor, scale: float,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Forward both models on one micro-batch, backward its loss times `scale`; return the detached terms.
        `images` are token ids for a text model, with their attention `mask`."""
        kwargs = {"attention_mask": mask} if mask is not None else {}
        teacher_out, teacher_blocks = None, []
        with autocast_for(self.device):
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher_forward(images, **kwargs)
                teacher_blocks = self.teacher_blocks.take() if self.blocks else []
            student_out = self.forward(images, **kwargs)
            student_blocks = self.student_blocks.take() if self.blocks else []
            terms = self.loss(
                student_out=student_out, teacher_out=teacher_out,
                student_blocks=student_blocks, teacher_blocks=teacher_blocks,
                labels=labels if self.loss.use_labels else None, mask=mask,
            )
        (terms["loss"] * scale).backward()
        return {k: v.detach() for k, v in terms.items()}

    def step(self, batches: list[Batch], step: int | None = None) -> StepStats:
        n = len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(self.terms), device=self.device)
        weight = images_seen = skipped = 0
        for i, batch in enumerate(batches):
            if self.on_batch is not None:
                self.on_batch(batch)
            images, labels, mask = batch.parts()
            w = 1.0
            if mask is not None:
                mask = mask.to(self.device, non_blocking=True)
            if len(images) == 0:  # every image of the batch was unreadable: a zero-weight pass keeps ranks in step
                images = torch.zeros((1, *self.input_size))
                labels, w = torch.zeros(1, dtype=torch.long), 0.0
            count = len(images) if w else 0
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            no_sync = getattr(self.forward, "no_sync", None)
            sync = no_sync() if (no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with sync:
                terms = self.micro_step(images, labels, w / n, mask)
            if w:
                sums += torch.stack([terms[t].float() for t in self.terms])
            weight += w
            images_seen += count
            skipped += batch.skipped
        norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad if self.clip_grad > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor for sharded parameters
        counts = torch.tensor([weight, images_seen, skipped], dtype=torch.float32)
        stats = torch.cat([sums, norm.detach().float().reshape(1), counts.to(self.device)])
        if self.ctx.enabled:
            stats = distributed.all_reduce_sum(self.ctx, stats if self.ctx.device.type == "cuda" else stats.cpu())
        values = stats.tolist()  # the one host sync of the step
        k = len(self.terms)
        weight, norm_value = values[k + 1], values[k] / self.ctx.world_size
        terms = {t: (values[i] / weight if weight else 0.0) for i, t in enumerate(self.terms)}
        where = f" at step {step}" if step is not None else ""
        for name, value in terms.items():
            if not math.isfinite(value):
                raise TrainingError(f"the {'total loss' if name == 'loss' else name + ' loss term'} is {value}{where}")
        if not math.isfinite(norm_value):
            raise TrainingError(f"the gradient norm is {norm_value}{where}")
        if weight:
            self.optimizer.step()
        return StepStats(terms, norm_value, int(values[k + 2]), int(values[k + 3]))


def params_reached(student: nn.Module, teacher: nn.Module, loss: RecoveryLoss, blocks: list[str],
                    input_size: tuple[int, ...], device: torch.device) -> set[str]:
    """Names of the student's parameters that the loss reaches (one backward on a blank image, eval mode).

    With unlabelled data and no logit distillation, the final norm and the head get no gradient: they are
    frozen, which DDP needs (and which saves AdamW the work)."""
    distiller = Distiller(student, teacher, loss, blocks, optimizer=None, params=[], clip_grad=0.0,
                          device=device, input_size=input_size)
    was_training = student.training
    student.eval()
    try:
        from lowrank_cli.models.inputs import example_input

        distiller.micro_step(example_input(student, input_size, 2, device=device, zeros=True),
                             torch.zeros(2, dtype=torch.long, device=device), 1.0)
        return {n for n, p in student.named_parameters() if p.grad is not None}
    finally:
        distiller.close()
        student.zero_grad(set_to_none=True)
        student.train(was_training)
