"""timm model names: short names to registered defaults, close-match suggestions, default pretrained_cfg."""

from __future__ import annotations

import difflib
import re

from lowrank_cli.errors import InputError
from lowrank_cli.models.spec import json_safe


class UnknownName(InputError):
    """A bare MODEL name that timm does not know (it may still be a Hub repo, unless it is a `typo` of one)."""

    typo = False


def resolve_timm_name(name: str) -> str:
    """`deit_base` -> `deit_base_patch16_224.fb_in1k`: the registered default of a short name.

    A full architecture name keeps its default pretrained tag. A short name is the prefix of architectures
    whose rest is only patch size / resolution (`_patch16_224`); the lowest resolution wins (the standard
    one); several left (`vit_base`: patch 8, 16, 32) is ambiguous and the candidates are listed.
    """
    import timm

    arch, _, tag = name.partition(".")
    archs = set(timm.list_models())
    if arch in archs:
        if tag and name not in timm.list_pretrained(arch + ".*") and name not in timm.list_pretrained(name):
            tags = timm.list_pretrained(arch + ".*")
            raise InputError(f"timm has no weights '{name}'; {arch} has: {', '.join(tags) or 'none'}")
        if tag:
            return name
        tags = timm.list_pretrained(arch + ".*")
        return tags[0] if tags else arch
    if not tag:
        variant = re.compile(re.escape(arch) + r"((_patch\d+)?(_\d+)?)")
        matches = [a for a in sorted(archs) if variant.fullmatch(a) and variant.fullmatch(a).group(1)]
        if matches:

            def resolution(a: str) -> int:
                m = re.search(r"_(\d+)$", a)
                return int(m.group(1)) if m else 0

            low = min(resolution(a) for a in matches)
            best = [a for a in matches if resolution(a) == low]
            if len(best) == 1:
                return resolve_timm_name(best[0])
            raise InputError(
                f"'{name}' is ambiguous in timm: {', '.join(best)}: give the full name"
            )
    # Compare with short family_size prefixes too (deit_bse ~ deit_base), then show the full names.
    short = {"_".join(a.split("_")[:2]): a for a in sorted(archs, key=lambda a: (len(a), a), reverse=True)}
    close = [short[c] for c in difflib.get_close_matches(arch, list(short), n=3, cutoff=0.7)]
    close += difflib.get_close_matches(name, sorted(archs), n=5, cutoff=0.6)
    hint = ", ".join(list(dict.fromkeys(close))[:5]) or "none"
    error = UnknownName(
        f"'{name}' is not a file, a folder or a timm model name (closest timm names: {hint}); "
        "for a Hub repo write hf-hub:ORG/REPO, for a folder local-dir:PATH"
    )
    # A near miss of a timm name is a typo, not a Hub repo: asking the Hub would only add its wait to the error.
    error.typo = bool(difflib.get_close_matches(arch, list(short) + sorted(archs), n=1, cutoff=0.85))
    raise error


def default_pretrained_cfg(arch_or_name: str) -> dict:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch_or_name)
    return json_safe(cfg.to_dict()) if cfg is not None else {}
