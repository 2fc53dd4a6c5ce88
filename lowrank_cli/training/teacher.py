"""The student and its teacher: loading both, factorizing a dense student on the fly, checking that they match."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear


def is_lowrank(model: nn.Module) -> bool:
    return any(isinstance(m, LowRankLinear) for m in model.modules())


def check_teacher(student: nn.Module, teacher: nn.Module, student_name: str, teacher_name: str,
                  student_arch: str, teacher_arch: str) -> list[tuple[str, LowRankLinear, torch.Tensor]]:
    """The teacher must be the student's dense architecture: the same tensors, except that each factorized
    module of the student is an nn.Linear of the same shape in the teacher. Returns (name, low-rank layer,
    teacher weight) for each factorized module; raises InputError naming both models otherwise."""
    who = f"the teacher {teacher_name} ({teacher_arch}) and the student {student_name} ({student_arch})"
    lowrank = {n: m for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    teacher_modules = dict(teacher.named_modules())
    pairs, problems = [], []
    for name, layer in lowrank.items():
        dense = teacher_modules.get(name)
        if not isinstance(dense, nn.Linear):
            problems.append(f"'{name}' is factorized in the student but is "
                            f"{'missing' if dense is None else 'a ' + type(dense).__name__} in the teacher")
        elif (dense.out_features, dense.in_features) != (layer.out_features, layer.in_features):
            problems.append(f"'{name}' is {layer.out_features}x{layer.in_features} in the student, "
                            f"{dense.out_features}x{dense.in_features} in the teacher")
        elif (dense.bias is None) != (layer.second.bias is None):
            problems.append(f"'{name}' has a bias in only one of them")
        else:
            pairs.append((name, layer, dense.weight))
    skip = tuple(n + "." for n in lowrank)
    s_shapes = {k: tuple(v.shape) for k, v in student.state_dict().items() if not k.startswith(skip)}
    t_shapes = {k: tuple(v.shape) for k, v in teacher.state_dict().items() if not k.startswith(skip)}
    for key in sorted(set(s_shapes) | set(t_shapes)):
        if key not in t_shapes:
            problems.append(f"'{key}' is in the student only")
        elif key not in s_shapes:
            problems.append(f"'{key}' is in the teacher only")
        elif s_shapes[key] != t_shapes[key]:
            problems.append(f"'{key}' is {s_shapes[key]} in the student, {t_shapes[key]} in the teacher")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise InputError(
            f"{who} do not share the architecture: {'; '.join(problems[:3])}{more}. The teacher must be the dense "
            "model the student was factorized from (same architecture and model args)"
        )
    return pairs


def load_participant(source, what: str, arch, model_args, log, library=None):
    from lowrank_cli.models.loaded import LoadedModel
    from lowrank_cli.models.sources import load_model

    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, nn.Module):
        raise UsageError(f"pass the {what} as a MODEL source string or a LoadedModel (lowrank_cli.load_model), "
                         "not a bare nn.Module: recovery needs its architecture to check and save it")
    return load_model(str(source), arch=arch, model_args=model_args, library=library,
                      log=lambda m: log(f"{what.capitalize()}: {m}"))


def name_of(loaded) -> str:
    source = loaded.source or {}
    return str(source.get("id") or loaded.spec.architecture)


def load_pair(student: Any, teacher: Any, opts: Any, *, device: torch.device, log, warn):
    """Load the student (factorizing a dense one when `opts.kappa` is set) and its dense teacher, and check that
    they share the architecture. Returns (student, teacher, [(name, low-rank layer, teacher weight)])."""
    from lowrank_cli.checkpoint.format import record_source
    from lowrank_cli.compress.factorization import factorize

    s = load_participant(student, "student", opts.arch, opts.model_args, log, opts.library)
    t = load_participant(teacher, "teacher", opts.arch, opts.model_args, log, opts.library)
    if opts.kappa is not None:
        if s.checkpoint is not None or is_lowrank(s.model):
            raise UsageError(f"`kappa` factorizes a dense student, but {name_of(s)} is already low-rank: leave out "
                             "`kappa`")
        log(f"Factorizing the student at kappa {opts.kappa:g} (rank multiple {opts.rank_multiple})")
        factorize(s.model, kappa=opts.kappa, rank_multiple=opts.rank_multiple, device=device, warn=warn)
        record_source(s.model, s.source)
    elif not is_lowrank(s.model):
        raise UsageError(f"the student {name_of(s)} has no low-rank layers: pass an lrc checkpoint (lrc factorize), "
                         "or factorize it on the fly with `kappa`")
    if t.checkpoint is not None or is_lowrank(t.model):
        raise InputError(f"the teacher {name_of(t)} is a low-rank model: the teacher is the dense model the student "
                         "was factorized from")
    pairs = check_teacher(s.model, t.model, name_of(s), name_of(t), s.spec.architecture, t.spec.architecture)
    if s.spec.architecture != t.spec.architecture:
        warn(f"the teacher is {t.spec.architecture} and the student was made from {s.spec.architecture}: "
             "the shapes agree, so distillation works, but check that this is the teacher you meant")
    return s, t, pairs
