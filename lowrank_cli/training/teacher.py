"""The student and its teacher: loading both, factorizing a dense student on the fly, checking that they match."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.loaded import name_of  # the training runs import it from here


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
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.models.loaded import LoadedModel

    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, nn.Module):
        raise UsageError(f"pass the {what} as a MODEL source string or a LoadedModel (lowrank_cli.load_model), "
                         "not a bare nn.Module: recovery needs its architecture to check and save it")
    return load_model(str(source), arch=arch, model_args=model_args, library=library,
                      log=lambda m: log(f"{what.capitalize()}: {m}"))


def own_teacher(s, opts: Any):
    """The teacher of a dense student factorized on the fly when none is given: a copy of the student, made before
    it is factorized."""
    import copy

    from lowrank_cli.models.loaded import LoadedModel

    if opts.kappa is None and opts.rank is None:
        raise UsageError(f"no `teacher` given: only a dense student factorized on the fly (`kappa` or `rank`) is its "
                         f"own teacher; give the dense model {name_of(s)} was factorized from as `teacher`")
    return LoadedModel(model=copy.deepcopy(s.model), spec=s.spec, pending_source=dict(s.source), files=s.files,
                       revision=s.revision)


def load_pair(student: Any, teacher: Any, opts: Any, *, device: torch.device, log, warn):
    """Load the student (factorizing a dense one when `opts.kappa` or `opts.rank` is set) and its dense teacher, and
    check that they share the architecture. Returns (student, teacher, [(name, low-rank layer, teacher weight)],
    {name: the student's dense nn.Linear before factorization}, empty when the student came factorized)."""
    s = load_participant(student, "student", opts.arch, opts.model_args, log, opts.library)
    if teacher is None:
        t = own_teacher(s, opts)
    else:
        t = load_participant(teacher, "teacher", opts.arch, opts.model_args, log, opts.library)
    dense: dict[str, nn.Linear] = {}
    progressive = opts.method == "progressive"
    if opts.kappa is not None or opts.rank is not None:
        if s.checkpoint is not None or is_lowrank(s.model):
            fix = ("`method` progressive fades out dense weights: give the dense model it was made from, with "
                   "`kappa` or `rank`" if progressive else "leave out `kappa` and `rank`")
            raise UsageError(f"`{'kappa' if opts.kappa is not None else 'rank'}` factorizes a dense student, but "
                             f"{name_of(s)} is already low-rank: {fix}")
        dense = factorize_student(s, t, opts, device=device, log=log, warn=warn)
    elif progressive:
        what = "is already low-rank, so it has no dense weights to fade" if is_lowrank(s.model) else "is dense"
        raise UsageError(f"`method` progressive factorizes a dense student on the fly, and {name_of(s)} {what}: "
                         "give the dense model with `kappa` (or `rank`)")
    elif not is_lowrank(s.model):
        raise UsageError(f"the student {name_of(s)} has no low-rank layers: pass an lrc checkpoint (lrc factorize), "
                         "or factorize it on the fly with `kappa` or `rank`")
    if t.checkpoint is not None or is_lowrank(t.model):
        raise InputError(f"the teacher {name_of(t)} is a low-rank model: the teacher is the dense model the student "
                         "was factorized from")
    pairs = check_teacher(s.model, t.model, name_of(s), name_of(t), s.spec.architecture, t.spec.architecture)
    if s.spec.architecture != t.spec.architecture:
        warn(f"the teacher is {t.spec.architecture} and the student was made from {s.spec.architecture}: "
             "the shapes agree, so distillation works, but check that this is the teacher you meant")
    return s, t, pairs, dense


def factorize_student(s, t, opts: Any, *, device: torch.device, log, warn) -> dict[str, nn.Linear]:
    """Factorize the dense student in place, at `opts.kappa` or at `opts.rank` for every target, data-aware on
    `opts.calib`; for `method` progressive with init lora, random factors instead of an SVD. Returns the dense
    linears the student had (they stay alive for the progressive method's residuals)."""
    from lowrank_cli.checkpoint.format import info_of, record_source
    from lowrank_cli.compress.factorization import factorize
    from lowrank_cli.models.families import TEXT, modality_of
    from lowrank_cli.models.structure import select_targets

    model = s.model
    options: dict[str, Any] = {"kappa": opts.kappa if opts.kappa is not None else 2.0}
    if opts.rank is not None:
        shapes = {n: model.get_submodule(n).weight.shape for n in select_targets(model)}
        too_big = [n for n, shape in shapes.items() if opts.rank > min(shape)]
        if too_big:
            layer = model.get_submodule(too_big[0])
            raise UsageError(f"`rank` {opts.rank} is above the full rank {min(layer.in_features, layer.out_features)} "
                             f"of {too_big[0]} ({layer.out_features}x{layer.in_features}): lower it")
        options["rank_pattern"] = [f".*={opts.rank}"]
    if opts.calib is not None:
        options.update(calib=opts.calib, calib_samples=opts.calib_samples)
        if modality_of(model) == TEXT:
            from lowrank_cli.models.hub import tokenizer_folder

            options["tokenizer"] = opts.tokenizer if opts.tokenizer is not None else tokenizer_folder(t)
    lora = opts.method == "progressive" and opts.init == "lora"
    if lora:
        from lowrank_cli.training.progressive import lora_factor_fn

        options["factor_fn"] = lora_factor_fn(opts.seed)
    # PELA lets each dense weight go as soon as it is factorized; progressive keeps them for the residuals.
    dense = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)} if opts.method == "progressive" else {}
    how = f"kappa {opts.kappa:g}" if opts.kappa is not None else f"rank {opts.rank}"
    log(f"Factorizing the student at {how} (rank multiple {opts.rank_multiple}"
        f"{', data-aware on ' + str(opts.calib) if opts.calib is not None else ''}"
        f"{', LoRA init: no SVD' if lora else ''})")
    factorize(model, rank_multiple=opts.rank_multiple, device=device, warn=warn, **options)
    record_source(model, s.source)
    provenance = info_of(model).provenance
    if opts.rank is not None:
        provenance.update(kappa=None, rank=opts.rank)
    if lora:
        provenance["svd"] = "none (progressive init lora: random factors)"
    return dense


def reads_token_stream(source: Any) -> bool:
    """Whether the model `source` names reads text as one token stream (a causal LM), told without building it:
    a LoadedModel, an lrc file (its spec) or a folder (its config.json). False when that cannot be told cheaply
    (a Hub repo, a timm name): the run then finds out once the model is loaded."""
    from pathlib import Path

    from lowrank_cli.checkpoint.format import is_lrc_checkpoint, read_info
    from lowrank_cli.errors import LrcError
    from lowrank_cli.models.families import family_of, family_of_config, family_of_spec
    from lowrank_cli.models.families.base import CONFIG_NAME, read_config_json
    from lowrank_cli.models.loaded import LoadedModel

    if isinstance(source, LoadedModel):
        return family_of(source.model).text_data == "stream"
    if not isinstance(source, (str, Path)):
        return False
    path = Path(source).expanduser()
    try:
        if path.is_file() and is_lrc_checkpoint(path):
            return family_of_spec(read_info(path)[0].spec).text_data == "stream"
        if (path / CONFIG_NAME).is_file():
            family = family_of_config(read_config_json(path))
            return family is not None and family.text_data == "stream"
    except (LrcError, OSError, ValueError):
        return False  # a broken source is reported when it loads
    return False
