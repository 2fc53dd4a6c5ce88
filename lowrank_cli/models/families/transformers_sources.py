"""Opening a transformers source (a save_pretrained folder, a Hub repo) as a LoadedModel: what the transformers
families (hf_encoder, hf_causal_lm) share to read their sources, with the toolbox models.transformers_models."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lowrank_cli.errors import UsageError
from lowrank_cli.models.transformers_models import LIBRARY, PREPROCESSOR, load_pretrained, read_json


def open_folder(folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any], family: str,
                auto: str = "AutoModel") -> Any:
    """A LoadedModel of a transformers folder (save_pretrained's layout), its weights file hashed on the side."""
    from lowrank_cli.models.weights import PICKLE_WEIGHTS, SAFE_WEIGHTS, sha256_later

    weights = next((folder / n for n in (SAFE_WEIGHTS, PICKLE_WEIGHTS) if (folder / n).is_file()), None)
    source = {"kind": "local-dir", "id": str(folder.resolve()), "library": LIBRARY,
              **({"sha256": sha256_later(weights)} if weights else {})}
    return opened(str(folder), folder, None, arch, model_args, what, source, family, auto)


def folder_skeleton(folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any], family: str,
                    auto: str = "AutoModel") -> Any:
    """A transformers folder's model as a skeleton (parameters on meta, computed buffers real; models.skeleton),
    built from its config.json alone: its weights are read later, block by block."""
    from lowrank_cli.models.loaded import LoadedModel
    from lowrank_cli.models.skeleton import parameters_on_meta
    from lowrank_cli.models.transformers_models import (
        attach_pretrained_cfg,
        check_remote_code,
        model_class,
        no_init,
        quiet,
        require,
        transformers_spec,
        vision_pretrained_cfg,
    )

    check_no_model_args(model_args, what)
    transformers = require()
    check_remote_code(read_json(folder / "config.json") or {}, what)
    with quiet():
        config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    cls = model_class(config, arch, auto)
    with parameters_on_meta(), no_init(), quiet():
        model = cls._from_config(config)
    model.eval()
    if (folder / "generation_config.json").is_file() and getattr(model, "generation_config", None) is not None:
        # what from_pretrained reads beside the config (eos ids, max_new_tokens): the in-memory path has it too
        with contextlib.suppress(ValueError, TypeError, OSError), quiet():
            model.generation_config = transformers.GenerationConfig.from_pretrained(str(folder))
    if getattr(model, "main_input_name", None) == "pixel_values":
        attach_pretrained_cfg(model, vision_pretrained_cfg(config, read_json(folder / PREPROCESSOR)))
    from lowrank_cli.models.weights import SAFE_WEIGHTS, sha256_later

    weights = folder / SAFE_WEIGHTS
    source = {"kind": "local-dir", "id": str(folder.resolve()), "library": LIBRARY,
              **({"sha256": sha256_later(weights)} if weights.is_file() else {})}
    return LoadedModel(model, transformers_spec(model, family), source, files=str(folder))


def open_hub(repo: str, revision: str | None, config: Path, *, arch: str | None, model_args: dict[str, Any],
             family: str, auto: str = "AutoModel") -> Any:
    """A LoadedModel of a transformers Hub repo (its files fetched through the cache)."""
    from lowrank_cli.models.hub import hub_transformers_files, snapshot_revision

    source = {"kind": "hf-hub", "id": repo, "revision": snapshot_revision(config) or revision}
    what = f"hf-hub:{repo}"
    check_no_model_args(model_args, what)
    return opened(repo, hub_transformers_files(repo, revision), revision, arch, model_args, what, source, family,
                   auto)


def check_no_model_args(model_args: dict[str, Any], what: str) -> None:
    if model_args:
        raise UsageError(f"`model_args` is for timm models; {what} is a transformers model, built from its "
                         "config.json: edit the config instead")


def opened(where: str, folder: Path, revision: str | None, arch: str | None, model_args: dict[str, Any], what: str,
            source: dict[str, Any], family: str, auto: str) -> Any:
    from lowrank_cli.models.loaded import LoadedModel

    check_no_model_args(model_args, what)
    model, spec = load_pretrained(str(folder), what=what, arch=arch, preprocessor=read_json(folder / PREPROCESSOR),
                                  family=family, auto=auto)
    return LoadedModel(model, spec, source, files=where, revision=revision)
