"""Whether `lrc factorize` streams (compress.streaming) or loads the source whole, decided before any weight is read.

It streams when the source is a local folder whose weights are safetensors (`model.safetensors`, or shards with
`model.safetensors.index.json` as save_pretrained writes them), its family builds a skeleton from the folder's
config (models.families: timm, transformers encoders and causal LMs), and no step needs the whole model at once: a
rank budget and the speed plan do (parallel calibration streams too: each batch reads the blocks one at a time).
`stream=None` (the default) streams whenever it can and says why not otherwise; `stream=True` where it cannot is a
usage error that says why; `stream=False` loads the model whole.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank_cli.checkpoint.shards import INDEX_SUFFIX, TensorSet
from lowrank_cli.compress.factorize_options import FactorizeOptions
from lowrank_cli.errors import UsageError

SAFE_WEIGHTS = "model.safetensors"


def weights_of(folder: Path) -> Path | None:
    """The folder's safetensors set: its index when sharded, else model.safetensors; None without either."""
    index = folder / (SAFE_WEIGHTS + INDEX_SUFFIX)
    if index.is_file():
        return index
    single = folder / SAFE_WEIGHTS
    return single if single.is_file() else None


def why_not(opts: FactorizeOptions, family: Any) -> str | None:
    """What in the options needs the whole model in memory (None: nothing)."""
    r = opts.ranking
    if r.budgets:
        return f"`{r.budgets[0]}` allocates the ranks from every layer at once"
    if r.plan_kind == "speed":
        return "`plan_kind` speed times the whole model"
    return None


def layout_problem(model: Any, tensors: TensorSet) -> str | None:
    """Why the files cannot be read into the skeleton as they are (None: they can): names the loader would rename
    (a checkpoint with a head prefix), or tensors stored in another layout (GPT-2's Conv1D, transposed)."""
    from lowrank_cli.models.families import family_of

    state = model.state_dict(keep_vars=True)
    tied = {c for c, o in family_of(model).tied_copies(model).items() if c in state and o in state}
    stored = tensors.shapes
    if set(stored) - set(state) or set(state) - set(stored) - tied:
        return "its tensor names are not the model's own (the loader would rename them)"
    odd = next((k for k, shape in stored.items() if tuple(state[k].shape) != tuple(shape)), None)
    return f"'{odd}' is stored in another layout than lrc runs it" if odd else None


def stream_source(source: str, opts: FactorizeOptions, *, stream: bool | None, arch: str | None,
                  model_args: dict[str, Any] | None, library: str | None,
                  log: Callable[[str], None]) -> tuple[Any, TensorSet] | None:
    """(skeleton LoadedModel, its TensorSet) when this run streams; None when it loads the model whole."""
    if stream is False:
        return None
    from lowrank_cli.models.lrc_folder import is_lrc_folder
    from lowrank_cli.models.pretrained import check_library, folder_family, local_folder

    folder = local_folder(source) if "://" not in source and not source.startswith("hf-hub:") else None
    reason, family, weights = None, None, None
    if folder is None or is_lrc_folder(folder):
        reason = "it is not a local folder of a model (a Hub repo, a timm name, a file or an lrc checkpoint)"
    else:
        family = folder_family(folder, check_library(library))
        weights = weights_of(folder)
        reason = ("its weights are not safetensors (model.safetensors or shards with an index)" if weights is None
                  else why_not(opts, family))
    loaded, tensors = None, None
    if reason is None:
        tensors = TensorSet.open(weights)  # a missing or truncated shard fails here, as it would on loading
        loaded = family.open_skeleton(folder, what=f"'{folder}'", arch=arch, model_args=dict(model_args or {}))
        reason = f"the {family.name} family reads this folder whole" if loaded is None else layout_problem(
            loaded.model, tensors)
    if reason is not None:
        if stream:
            raise UsageError(f"`stream` cannot stream '{source}': {reason}; leave out `stream`")
        if folder is not None:
            log(f"loading the whole model (not streaming: {reason})")
        return None
    log(f"streaming factorize: one block at a time from {len(tensors.files)} safetensors file(s) "
        f"({tensors.nbytes / 2**30:.2f} GiB), the model is never held whole")
    return loaded, tensors
