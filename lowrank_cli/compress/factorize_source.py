"""A MODEL source in, an lrc checkpoint file out: what `lrc factorize` runs (the only step here that touches files).

`factorize_file` loads the source (any timm / transformers / weights / Hub source lrc reads), factorizes it with
`compress.factorization.factorize` and saves the result atomically; everything between is the method's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank_cli.atomic import locked_output
from lowrank_cli.checkpoint.format import info_of, record_source
from lowrank_cli.checkpoint.io import save
from lowrank_cli.checkpoint.shards import INDEX_SUFFIX
from lowrank_cli.compress.factorization import FactorizeResult, calib_mode_of, factorize
from lowrank_cli.compress.factorize_options import FactorizeOptions
from lowrank_cli.devices import resolve_device, resolve_dtype
from lowrank_cli.errors import UsageError
from lowrank_cli.option_fields import DEFAULT_SHARD_SIZE, parse_bytes


@locked_output
def factorize_file(
    source: str,
    output: str,
    *,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    revision: str | None = None,
    force: bool = False,
    library: str | None = None,
    seq_len: int | None = None,
    save_tokenizer: str | None = None,
    stream: bool | None = None,
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FactorizeResult:
    """What `lrc factorize` does: load any MODEL source, factorize it, save the lrc checkpoint atomically.

    `options` are `factorize`'s (its configs, or their fields as keywords). They and the output are checked
    first, so a doomed run fails before the loading and the SVDs rather than after them. Text models run their
    checks at `seq_len` tokens; `save_tokenizer` copies a transformers source's tokenizer files there. A local
    folder of safetensors is factorized block by block from its files (`stream`, compress.streaming_source); the
    checkpoint is one file, or shards with an index above `max_shard_size` ('5GB', '500MB', bytes). Sequential
    calibration's hidden states, when they go to disk (`calib_spill`), go beside the output by default.
    """
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.atomic import check_output
    from lowrank_cli.compress.streaming_source import stream_source

    configs = {k: options.pop(k) for k in ("targets", "ranking", "truncation", "calibration") if k in options}
    steps = {k: options.pop(k) for k in _STEP_OPTIONS if k in options}
    opts = FactorizeOptions.of(**configs, **options)
    opts.check()
    shard_bytes = parse_bytes(max_shard_size)
    check_output(output, force=force)
    index = Path(output).with_name(Path(output).name + INDEX_SUFFIX)
    if index.exists():  # a sharded checkpoint written there before is an existing output too
        check_output(index, force=force)
    _refuse_before_loading(opts)
    log = log or (lambda msg: None)
    streamed = stream_source(source, opts, stream=stream, arch=arch, model_args=model_args, library=library, log=log)
    loaded = streamed[0] if streamed else load_model(source, arch=arch, model_args=model_args, revision=revision,
                                                     library=library, log=log)
    if loaded.checkpoint is not None and loaded.checkpoint.ranks:  # a dense lrc file (a full fine-tuning) is fine
        raise UsageError(f"'{source}' is already factorized (an lrc checkpoint with {len(loaded.checkpoint.ranks)} "
                         "low-rank layers): factorize its dense source model instead")
    steps["input_size"] = _input_size(loaded.model, steps.get("input_size"), seq_len)
    _spill_beside(loaded.model, opts, output)
    tokenizer_dir = _tokenizer(loaded, opts, save_tokenizer)
    if streamed:
        result = _streamed(streamed, output, opts, steps, shard_bytes, log)
    else:
        result = factorize(loaded.model, **dict(zip(("targets", "ranking", "truncation", "calibration"),
                                                    opts.parts())), log=log, **steps)
        info_of(result.model).provenance["streamed"] = result.extra["streamed"] = False
        record_source(result.model, loaded.source)
        save(result.model, output, force=force, max_shard_size=shard_bytes)
    if save_tokenizer:
        from lowrank_cli.models.transformers_models import copy_tokenizer

        result.extra["tokenizer"] = {"folder": save_tokenizer, "files": copy_tokenizer(tokenizer_dir, save_tokenizer)}
    return result


def _spill_beside(model: Any, opts: FactorizeOptions, output: str) -> None:
    """Sequential calibration's hidden states, when they go to disk, go on the output's disk unless
    `calib_spill_dir` says otherwise (set on a copy: the caller's config object stays as it was)."""
    cal = opts.calibration
    if cal.calib is None or cal.calib_spill_dir is not None:
        return
    if calib_mode_of(model, cal, budgeted=bool(opts.ranking.budgets)) == "sequential":
        opts.calibration = dataclasses.replace(cal, calib_spill_dir=str(Path(output).absolute().parent))


def _tokenizer(loaded: Any, opts: FactorizeOptions, save_tokenizer: str | None) -> Any:
    """The source's tokenizer folder, found once before the SVDs when `save_tokenizer` or a text `calib` needs it
    (a source without one fails at once); a text `calib` without its own `tokenizer` gets it."""
    from lowrank_cli.models.families import TEXT, modality_of

    cal = opts.calibration
    calib_needs_tokenizer = modality_of(loaded.model) == TEXT and cal.calib is not None and cal.tokenizer is None
    if not (save_tokenizer or calib_needs_tokenizer):
        return None
    from lowrank_cli.models.hub import tokenizer_folder

    tokenizer_dir = tokenizer_folder(loaded)
    if calib_needs_tokenizer:
        cal.tokenizer = tokenizer_dir
    return tokenizer_dir


def _streamed(streamed: tuple[Any, Any], output: str, opts: FactorizeOptions, steps: dict[str, Any],
              shard_bytes: int, log: Callable[[str], None]) -> FactorizeResult:
    """Streaming factorize (compress.streaming) of a skeleton and its files."""
    import warnings

    from lowrank_cli.compress.streaming import factorize_stream, open_stream

    loaded, tensors = streamed
    stream = open_stream(loaded.model, tensors, f"'{tensors.path}'")
    warn = steps.pop("warn", None) or (lambda msg: warnings.warn(msg, stacklevel=3))
    result, files = factorize_stream(stream, output, opts, source=lambda: loaded.source, max_shard_size=shard_bytes,
                                     steps=steps, log=log, warn=warn)
    result.extra["files"] = [str(f) for f in files]
    return result


# factorize's keywords that are not options of its configs: how the call runs, not what it does
_STEP_OPTIONS = ("plan", "input_size", "check_calls", "factor_fn", "progress", "calib_progress", "warn")


def _refuse_before_loading(opts: FactorizeOptions) -> None:
    """What the device and the precisions must allow, checked before the loading: an unknown dtype, a
    `plan_fused=True` without CUDA or Triton."""
    resolve_dtype(opts.truncation.dtype)
    if opts.ranking.plan_dtype is not None:
        resolve_dtype(opts.ranking.plan_dtype, parameter="plan_dtype")
    device = resolve_device(opts.truncation.device)
    if opts.ranking.plan_kind == "speed":
        from lowrank_cli.models.fusion import resolve_fused

        resolve_fused(opts.ranking.plan_fused, device, parameter="plan_fused")


def _input_size(model: Any, input_size: tuple[int, ...] | None, seq_len: int | None) -> tuple[int, ...]:
    """The input size of the source, worked out once (factorize passes it down to every step): `input_size` for an
    image model (default: its data config); `seq_len` tokens for a text model (default 128), which refuses an
    `input_size` C,H,W, as an image model refuses a `seq_len`."""
    from lowrank_cli.models.families import TEXT, modality_of
    from lowrank_cli.models.inputs import check_input_size, default_input_size

    check_input_size(model, input_size)
    if input_size is not None and seq_len is None and modality_of(model) != TEXT:
        return tuple(input_size)
    return default_input_size(model, seq_len)
