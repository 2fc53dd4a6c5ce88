"""Each option's default is written once: in its field (lowrank_cli.option_fields), not again in a CLI signature,
an API signature or a second class.

The count reads the source (ast): for each command, the places that can write what an absent option becomes -
the CLI command's parameters, the API functions it calls, its option classes (the class that defines a field last
for that command), the Opt constants those fields use, and DEFAULT_<OPTION> constants of those modules. A None
default is "not given" (the library picks), not a value: it is counted only with --with-none (then a declaration
with its default is counted wherever it is written). Run as a script on a checkout to print the counts:
`python tests/test_option_defaults.py /work/main [--with-none]`.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# command -> (CLI function, API functions, option classes in the order a later one overrides an earlier one)
COMMANDS = {
    "recover": ("cli/recover_cmd.py:recover", ["training/recovery.py:recover"],
                ["training/options.py:TrainingOptions", "training/options.py:RecoverOptions"]),
    "finetune": ("cli/finetune_cmd.py:finetune",
                 ["training/finetune.py:finetune", "training/multitask.py:finetune_tasks"],
                 ["training/options.py:TrainingOptions", "training/options.py:FinetuneOptions",
                  "training/multitask_options.py:MultitaskOptions"]),
    "factorize": ("cli/factorize_cmd.py:factorize", ["compress/factorization.py:factorize",
                                                    "compress/factorize_source.py:factorize_file"],
                  [f"compress/factorize_options.py:{c}" for c in ("Targets", "Ranking", "Truncation", "Calibration")]
                  + ["models/source_options.py:SourceOptions"]),
    "report": ("cli/report_cmd.py:report", [], ["models/source_options.py:SourceOptions"]),
    "eval": ("cli/eval_cmd.py:eval_command", [], ["models/source_options.py:SourceOptions"]),
    "bench": ("cli/bench_cmd.py:bench", [], ["models/source_options.py:SourceOptions"]),
}
# CLI parameter names that spell an option another way (before the options were fields)
ALIASES = {"workers": "num_workers", "eval_": "evaluate_accuracy", "model_arg": "model_args", "no_merge": "merge",
           "task_weight": "task_weights", "plan": "plan_kind"}
def _tree(root: Path, module: str) -> ast.Module | None:
    path = root / "lowrank_cli" / module
    return ast.parse(path.read_text()) if path.exists() else None


def _find(root: Path, site: str) -> tuple[ast.Module | None, ast.AST | None]:
    module, name = site.split(":")
    tree = _tree(root, module)
    node = next((n for n in (tree.body if tree else []) if getattr(n, "name", None) == name), None)
    return tree, node


def _literal(node: ast.AST | None) -> bool:
    """A default written here: a value (with NONE_TOO, None as well), not a name that points elsewhere."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    return isinstance(node, ast.Constant) and (NONE_TOO or node.value is not None) and node.value is not Ellipsis


NONE_TOO = False  # count `= None` defaults as written defaults too (the script's --with-none)


def _opt_constants(root: Path) -> dict[str, tuple[str, bool]]:
    """NAME -> (site, whether its default is a value) for module-level `NAME = Opt(default, ...)`."""
    found = {}
    for path in (root / "lowrank_cli").rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "Opt" and len(node.targets) == 1):
                name = node.targets[0].id
                value = bool(node.value.args) and _literal(node.value.args[0])
                found[name] = (f"{path.relative_to(root)}:{name}", value)
    return found


def _field_default(value: ast.AST, opts: dict) -> tuple[str | None, bool]:
    """(the Opt constant it takes its default from, or None; whether this line writes a default value)."""
    if isinstance(value, ast.Call):
        func = value.func
        if isinstance(func, ast.Attribute) and func.attr == "field" and isinstance(func.value, ast.Name):
            given = any(k.arg == "default" for k in value.keywords)
            return (None if given else func.value.id), given
        if getattr(func, "id", None) in ("option", "field"):
            first = value.args[0] if value.args else None
            default = next((k.value for k in value.keywords if k.arg == "default"), first)
            return None, _literal(default)
    return None, _literal(value)


def _effective_fields(root: Path, classes: list[str]) -> dict[str, tuple[str, ast.AST]]:
    """field name -> (the class that defines it last, its value) over `classes`."""
    effective: dict[str, tuple[str, ast.AST]] = {}
    for site in classes:
        _, cls = _find(root, site)
        for node in getattr(cls, "body", []):
            if isinstance(node, ast.AnnAssign) and node.value is not None:
                effective[node.target.id] = (site, node.value)
    return effective


def _signature_defaults(root: Path, site: str, aliases: dict[str, str]) -> list[tuple[str, ast.AST]]:
    _, fn = _find(root, site)
    if fn is None:
        return []
    args = fn.args
    pairs = list(zip(args.args[len(args.args) - len(args.defaults):], args.defaults))
    pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
    return [(aliases.get(a.arg, a.arg), d) for a, d in pairs]


def count(root: Path) -> dict[tuple[str, str], list[str]]:
    """(command, option) -> the places in the checkout at `root` that write its default value. A command's options
    are the fields of its option classes in this checkout (ROOT), so that an older checkout is measured on the
    same options."""
    opts = _opt_constants(root)
    sites: dict[tuple[str, str], set[str]] = defaultdict(set)
    for command, (cli, apis, classes) in COMMANDS.items():
        names = set(_effective_fields(ROOT, classes))
        for site in [cli, *apis]:
            for name, default in _signature_defaults(root, site, ALIASES if site == cli else {}):
                if name in names and _literal(default):
                    sites[command, name].add(f"{site}({name})")
        for name, (site, value) in _effective_fields(root, classes).items():
            constant, here = _field_default(value, opts)
            if here:
                sites[command, name].add(f"{site}.{name}")
            if constant in opts and opts[constant][1]:
                sites[command, name].add(opts[constant][0])
        for module in {s.split(":")[0] for s in [cli, *apis, *classes]}:
            tree = _tree(root, module)
            for node in tree.body if tree else []:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    target = node.targets[0].id
                    name = target.removeprefix("DEFAULT_").lower()
                    if target.startswith("DEFAULT_") and _literal(node.value) and name in names:
                        sites[command, name].add(f"{module}:{target}")
        for name in names:
            sites.setdefault((command, name), set())
    return {key: sorted(places) for key, places in sites.items()}


def test_each_option_default_is_written_once():
    twice = {f"{c} {o}": places for (c, o), places in count(ROOT).items() if len(places) > 1}
    assert twice == {}


def test_the_count_sees_the_options():
    counts = count(ROOT)
    assert counts["recover", "batch_size"] == ["training/options.py:TrainingOptions.batch_size"]
    assert counts["finetune", "batch_size"] == ["training/options.py:FinetuneOptions.batch_size"]
    assert counts["factorize", "device"] == counts["bench", "device"] == ["lowrank_cli/models/source_options.py:DEVICE"]
    assert counts["factorize", "kappa"] == ["compress/factorize_options.py:DEFAULT_KAPPA"]


if __name__ == "__main__":
    NONE_TOO = "--with-none" in sys.argv
    paths = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(paths[0]) if paths else ROOT
    table = count(root)
    for (command, option), places in sorted(table.items()):
        print(f"{command:10s} {option:20s} {len(places)}  {', '.join(places)}")
    by = defaultdict(int)
    for places in table.values():
        by[len(places)] += 1
    print("options by how many times their default is written:", dict(sorted(by.items())))
