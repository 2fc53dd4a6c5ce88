"""The options of `lrc recover`, grouped as --help shows them (the command itself is recover_cmd.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from lowrank_cli.cli.options import choice, number, rank_multiple_option

LOSS_PANEL, TRAINING_PANEL, DATA_PANEL = "Loss (PELA Eq. 7)", "Training", "Data and accuracy"
STUDENT_PANEL = "A dense STUDENT, factorized on the fly"
METHOD_PANEL = "Progressive compression (--method progressive, PC-LoRA)"
DEFAULT_RANK_MULTIPLE = 8

Student = Annotated[str, typer.Argument(
    metavar="STUDENT", show_default=False,
    help="The low-rank model to recover (an lrc checkpoint), or a dense MODEL to factorize first with --kappa.")]
Teacher = Annotated[Optional[str], typer.Option(
    "--teacher", metavar="MODEL", show_default=False,
    help="The dense model the student was made from (any MODEL source); default: a dense STUDENT factorized on the "
    "fly is its own teacher.")]
Data = Annotated[Path, typer.Option(
    "--data", metavar="PATH", show_default=False,
    help="ImageFolder root (train/<class>/..., optional val/<class>/...), a class tree, a folder of unlabelled "
    "images, or for text models a .txt / .jsonl file or folder of them.")]
Steps = Annotated[Optional[int], typer.Option(
    "--steps", min=1, show_default=False, help="Optimizer steps (give this or --epochs).")]
Epochs = Annotated[Optional[float], typer.Option(
    "--epochs", show_default=False, callback=number(low=0, low_open=True),
    help="Passes over the training data, > 0, fractions allowed (give this or --steps).")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Images (or texts) per micro-batch, per process.")]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the interrupted run from its training state.")]

Alpha = Annotated[float, typer.Option(
    "--alpha", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the feature distillation (block outputs, MSE), >= 0.")]
Beta = Annotated[float, typer.Option(
    "--beta", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the weight-perturbation regulariser (max|second@first - W| - eps)^2, >= 0.")]
Gamma = Annotated[float, typer.Option(
    "--gamma", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Weight of the logit distillation (KL at --temperature), >= 0.")]
Delta = Annotated[float, typer.Option(
    "--delta", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="Text models: weight of the MSE on the final pooled output, >= 0.")]
Eps = Annotated[float, typer.Option(
    "--eps", rich_help_panel=LOSS_PANEL, callback=number(low=0),
    help="The weight perturbation the regulariser aims at, >= 0.")]
Temperature = Annotated[float, typer.Option(
    "--temperature", rich_help_panel=LOSS_PANEL, callback=number(low=0, low_open=True),
    help="Temperature of the logit distillation, > 0.")]
LabelSmoothing = Annotated[float, typer.Option(
    "--label-smoothing", rich_help_panel=LOSS_PANEL, callback=number(low=0, high=1, high_open=True),
    help="Label smoothing of the cross-entropy (labelled data), in [0, 1).")]

Lr = Annotated[float, typer.Option(
    "--lr", rich_help_panel=TRAINING_PANEL, callback=number(low=0, low_open=True),
    help="Peak learning rate of AdamW (linear warm-up, then cosine to 0), > 0.")]
WarmupSteps = Annotated[Optional[int], typer.Option(
    "--warmup-steps", min=0, show_default=False, rich_help_panel=TRAINING_PANEL,
    help="Linear warm-up steps (default: 5% of the steps).")]
WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", rich_help_panel=TRAINING_PANEL, callback=number(low=0),
    help="AdamW weight decay (matrices only), >= 0.")]
ClipGrad = Annotated[float, typer.Option(
    "--clip-grad", rich_help_panel=TRAINING_PANEL, callback=number(low=0),
    help="Clip the gradient norm to this (0: off).")]
GradAccum = Annotated[int, typer.Option(
    "--grad-accum", min=1, rich_help_panel=TRAINING_PANEL, help="Micro-batches per optimizer step.")]
FreezeDense = Annotated[bool, typer.Option(
    "--freeze-dense", rich_help_panel=TRAINING_PANEL,
    help="Train only the factorized layers (norms, embeddings, head stay).")]
Compile = Annotated[bool, typer.Option(
    "--compile", rich_help_panel=TRAINING_PANEL, help="torch.compile the student and the teacher.")]
Seed = Annotated[int, typer.Option(
    "--seed", rich_help_panel=TRAINING_PANEL, help="Seed of the data order, augmentations and dropout.")]
SaveEvery = Annotated[int, typer.Option(
    "--save-every", min=1, rich_help_panel=TRAINING_PANEL, help="Write the training state every N steps.")]
LogEvery = Annotated[int, typer.Option(
    "--log-every", min=1, rich_help_panel=TRAINING_PANEL, help="Log metrics every N steps.")]

Augment = Annotated[str, typer.Option(
    "--augment", rich_help_panel=DATA_PANEL, **choice("auto", "none", "light", "strong"),
    help="Training augmentation. auto: none for images about the model's input size or smaller, light (flips, "
    "mild scale jitter) for short runs, strong (timm's random resized crops) for long runs on large images.")]
NoAugment = Annotated[bool, typer.Option(
    "--no-augment", rich_help_panel=DATA_PANEL, help="Same as --augment none (the evaluation preprocessing).")]
ValData = Annotated[Optional[Path], typer.Option(
    "--val-data", metavar="DIR|FILE", show_default=False, rich_help_panel=DATA_PANEL,
    help="Held-out data to score the student on (default: DATA's val/ split, else --val-fraction of DATA).")]
ValFraction = Annotated[Optional[float], typer.Option(
    "--val-fraction", show_default=False, rich_help_panel=DATA_PANEL, callback=number(low=0, high=0.5, low_open=True),
    help="Share of the training data held out, in (0, 0.5] (default: 0.1 when there are 200 samples or more and no "
    "val/ split).")]
EvalEvery = Annotated[Optional[int], typer.Option(
    "--eval-every", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Steps between held-out evaluations (default: a tenth of the run).")]
Keep = Annotated[Optional[str], typer.Option(
    "--keep", show_default=False, rich_help_panel=DATA_PANEL, **choice("best", "last"),
    help="Which state to write: best held-out score (the default with held-out data) or the last step.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, show_default=False, rich_help_panel=DATA_PANEL,
    help="Data-loading processes per training process (default: its share of the CPUs, at most 8).")]
Tokenizer = Annotated[Optional[str], typer.Option(
    "--tokenizer", metavar="DIR|REPO", show_default=False, rich_help_panel=DATA_PANEL,
    help="Text data: folder or Hub repo of the tokenizer (default: the teacher's).")]
MaxLength = Annotated[Optional[int], typer.Option(
    "--max-length", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Text data: tokens per text at most (default: the model's positions, at most 512).")]
Eval = Annotated[bool, typer.Option(
    "--eval/--no-eval", rich_help_panel=DATA_PANEL, help="Measure accuracy on the val split before and after.")]
EvalBatchSize = Annotated[Optional[int], typer.Option(
    "--eval-batch-size", min=1, show_default=False, rich_help_panel=DATA_PANEL,
    help="Batch size of the accuracy runs (default: --batch-size).")]

Kappa = Annotated[Optional[float], typer.Option(
    "--kappa", show_default=False, rich_help_panel=STUDENT_PANEL,
    callback=number(low=1, low_open=True, note=" (the compression ratio of each layer)"),
    help="Factorize a dense STUDENT on the fly at this ratio (> 1).")]
Rank = Annotated[Optional[int], typer.Option(
    "--rank", min=1, show_default=False, rich_help_panel=STUDENT_PANEL,
    help="Factorize a dense STUDENT on the fly at this rank for every target layer (instead of --kappa).")]
Calib = Annotated[Optional[str], typer.Option(
    "--calib", metavar="PATH", show_default=False, rich_help_panel=STUDENT_PANEL,
    help="With --kappa / --rank: data-aware truncation on these images or texts.")]
CalibSamples = Annotated[int, typer.Option(
    "--calib-samples", min=1, rich_help_panel=STUDENT_PANEL, help="Images or texts of --calib to use.")]
Method = Annotated[str, typer.Option(
    "--method", rich_help_panel=METHOD_PANEL, **choice("pela", "progressive"),
    help="pela: distil a low-rank student; progressive: PC-LoRA, the dense weights fade out while the low-rank "
    "factors learn (a dense STUDENT with --kappa or --rank; holds the dense weights during training too).")]
Init = Annotated[Optional[str], typer.Option(
    "--init", show_default=False, rich_help_panel=METHOD_PANEL, **choice("svd", "lora"),
    help="svd (default): the truncated SVD + the dense remainder, exactly the dense model at the start; lora: "
    "W_res = W, random first, zero second (the paper's).")]
Decay = Annotated[Optional[str], typer.Option(
    "--decay", show_default=False, rich_help_panel=METHOD_PANEL, **choice("linear", "sine", "cosine"),
    help="How lambda falls from 1 to 0 (default linear).")]
DecayEnd = Annotated[Optional[float], typer.Option(
    "--decay-end", show_default=False, rich_help_panel=METHOD_PANEL, callback=number(low=0, high=1, low_open=True),
    help="lambda is 0 from this fraction of the steps on, in (0, 1] (default 0.8: the last 20% train the pure "
    "low-rank model).")]
LoraAlpha = Annotated[Optional[float], typer.Option(
    "--lora-alpha", show_default=False, rich_help_panel=METHOD_PANEL, callback=number(low=0, low_open=True),
    help="--init lora: second is scaled by this / rank, folded in at the end (default: scale 1).")]
RankMultiple = Annotated[Optional[str], typer.Option(
    "--rank-multiple", metavar="N|auto", show_default=False, rich_help_panel=STUDENT_PANEL,
    callback=rank_multiple_option,
    help=f"With --kappa: round ranks down to a multiple of this (default {DEFAULT_RANK_MULTIPLE}; auto: what the "
    "device likes).")]
