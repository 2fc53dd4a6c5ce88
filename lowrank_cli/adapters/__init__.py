"""Adapters: train a few parameters on top of a (low-rank or dense) model, then merge them back at zero cost.

One small object per method (`methods.py`), chosen by name: `head` and `full` add nothing; `lora` and `dora`
are Hugging Face peft's layers (a LowRankLinear is two plain nn.Linear, so peft targets `first` and `second`
by name and each merges into its own factor at the same rank); `rlrr` is lrc's own (`rlrr.py`). Which linears
are adapted is `targets.py`'s; the adapter file that `finetune(..., merge=False)` writes and `load(base,
adapters=...)` applies is `files.py`'s; `orthogonal.py` (a multi-task mode, not a method of one run) gives each task
its own block of every layer's output space, so that their sum does not interfere (the rules that combine several
tasks' updates into one backbone are training.merging's).

Reading a model from any source is here too, right above checkpoint/ (`loading.py`: `lowrank_cli.load_model` and
`lowrank_cli.load`), because a multi-task checkpoint's task is its head plus its adapters merged
(`task_models.py`): every package above imports loading downward.
"""
