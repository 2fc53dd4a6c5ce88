"""An adapter file (what `finetune --no-merge` writes) read as a MODEL: it names its base (source and weights
hash), so every command that reads a MODEL loads that base and applies the adapters, merged, as
`apply_adapter_file` does; a base that cannot be found again is named with how to give it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowrank_cli.adapters.files import KEY, apply_adapter_file, read_adapter_file
from lowrank_cli.errors import InputError


def is_adapter_file(source: str) -> bool:
    """Whether `source` is a safetensors file with `lrc.adapters` metadata (a header read, no tensor)."""
    path = Path(source).expanduser()
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    from lowrank_cli.atomic import utf8_path

    try:
        with utf8_path(path) as name, safe_open(name, framework="pt") as f:
            return KEY in (f.metadata() or {})
    except Exception:  # not readable as safetensors: the usual reading says why
        return False


def base_source(record: dict[str, Any]) -> str | None:
    """The MODEL argument that names the base again (None for one lrc cannot name: a bare weights file)."""
    source = record.get("base", {}).get("source") or {}
    kind, ident = source.get("kind"), source.get("id")
    if not ident:
        return None
    if kind == "hf-hub":
        return f"hf-hub:{ident}"
    return ident if kind in ("local-dir", "lrc", "timm") else None


def load_adapted(source: str, load_base: Any, log: Any = None) -> Any:
    """The LoadedModel of the base the adapter file `source` names, with its head and adapters merged.
    `load_base(name)` loads a MODEL (adapters.loading.load_model)."""
    path = Path(source).expanduser()
    record, _ = read_adapter_file(path)
    base = base_source(record)
    if base is None or (Path(base).is_absolute() and not Path(base).exists()):
        shown = (record.get("base", {}).get("source") or {}).get("id", "unnamed")
        raise InputError(f"'{path}' is an adapter file (finetune --no-merge) whose base '{shown}' cannot be found "
                         "here: put the base back where it was, or apply the file to it from Python "
                         "(lowrank_cli.apply_adapter_file(lowrank_cli.load_model(BASE), FILE))")
    if log is not None:
        log(f"{path} is an adapter file: applying it to its base {base}")
    loaded = load_base(base)
    apply_adapter_file(loaded, path)
    return loaded
