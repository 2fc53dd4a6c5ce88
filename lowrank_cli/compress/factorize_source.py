"""A MODEL source in, an lrc checkpoint file out: what `lrc factorize` runs (the only step here that touches files).

`factorize_file` loads the source (any timm / transformers / weights / Hub source lrc reads), factorizes it with
`compress.factorization.factorize` and saves the result atomically; everything between is the method's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lowrank_cli.checkpoint.format import record_source
from lowrank_cli.compress.factorization import FactorizeResult, factorize
from lowrank_cli.compress.svd import SVD_METHODS
from lowrank_cli.devices import resolve_device, resolve_dtype
from lowrank_cli.errors import UsageError


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
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> FactorizeResult:
    """What `lrc factorize` does: load any MODEL source, factorize it, save the lrc checkpoint atomically.

    The output is checked first, so a doomed run fails before the SVDs rather than after them. Text models run
    their checks at `seq_len` tokens; `save_tokenizer` copies a transformers source's tokenizer files there.
    """
    from lowrank_cli.adapters.loading import load_model
    from lowrank_cli.atomic import check_output
    from lowrank_cli.checkpoint.io import save

    check_output(output, force=force)
    if options.get("svd") not in (None, *SVD_METHODS):
        raise UsageError(f"`svd` '{options['svd']}' is not one of {', '.join(SVD_METHODS)}")
    resolve_dtype(options.get("dtype"))
    if options.get("plan_dtype") is not None:
        resolve_dtype(options["plan_dtype"], parameter="plan_dtype")  # refused before the loading
    device = resolve_device(options.get("device", "auto"))
    if options.get("plan_kind") == "speed":
        from lowrank_cli.models.fusion import resolve_fused

        # `plan_fused=True` without CUDA or Triton: refused before the loading
        resolve_fused(options.get("plan_fused"), device, parameter="plan_fused")
    from lowrank_cli.models.families import TEXT, modality_of
    from lowrank_cli.models.inputs import check_input_size, default_input_size

    loaded = load_model(source, arch=arch, model_args=model_args, revision=revision, library=library, log=log)
    if loaded.checkpoint is not None and loaded.checkpoint.ranks:  # a dense lrc file (a full fine-tuning) is fine
        raise UsageError(f"'{source}' is already factorized (an lrc checkpoint with {len(loaded.checkpoint.ranks)} "
                         "low-rank layers): factorize its dense source model instead")
    text = modality_of(loaded.model) == TEXT
    check_input_size(loaded.model, options.get("input_size"))
    if text or seq_len is not None:  # an image model with a `seq_len` is refused here
        options["input_size"] = default_input_size(loaded.model, seq_len)
    calib_needs_tokenizer = text and options.get("calib") is not None and options.get("tokenizer") is None
    tokenizer_dir = None
    if save_tokenizer or calib_needs_tokenizer:
        from lowrank_cli.models.hub import tokenizer_folder

        tokenizer_dir = tokenizer_folder(loaded)  # once, before the SVDs: a source without one fails at once
    if calib_needs_tokenizer:
        options["tokenizer"] = tokenizer_dir
    result = factorize(loaded.model, **options)
    record_source(result.model, loaded.source)
    save(result.model, output, force=force)
    if save_tokenizer:
        from lowrank_cli.models.transformers_models import copy_tokenizer

        result.extra["tokenizer"] = {"folder": save_tokenizer, "files": copy_tokenizer(tokenizer_dir, save_tokenizer)}
    return result
