"""The shape of the package: packages import downwards only (PACKAGE_ORDER, imports inside functions included), no
module reaches for another's private names, no module or function grows past what a reader takes in at once, and
the 0.x import paths keep working."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_cli"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # docstrings not counted
MAX_PARAMETERS = 13  # the public API's keyword-only options (push) at most; typer commands exempt


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imports(name: str):
    """(imported module, imported name or None) for every lowrank_cli import, those inside functions too."""
    return _imports_of(TREES[name])


def _imports_of(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lowrank_cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                yield (sub, None) if sub in MODULES else (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    yield alias.name, None


def test_no_import_cycles():
    edges = {m: {t for t, _ in _imports(m) if t != m} for m in MODULES}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            pytest.fail("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(edges.get(module, ())):
            visit(target, path + [module])
        done.add(module)

    for module in MODULES:
        visit(module, [])


# Packages in import order (DESIGN.md "Packages, in import order"): a module imports only from its own package and
# from packages of earlier tiers, imports inside functions included. Packages of one tier do not import each other.
FOUNDATION = ("errors", "atomic", "devices", "timing", "distributed", "_version", "option_fields")
PACKAGE_ORDER: list[tuple[str, ...]] = [
    ("foundation",),  # the modules in FOUNDATION
    ("layers",),  # nn.Modules only, the fused kernel and its custom op
    ("models",),  # model families behind one registry, build, inputs, structure
    ("checkpoint",),  # format + io, and the multi-task file's records
    ("adapters", "data"),  # fine-tuning methods and loading any source (a multi-task file merges adapters); data
    ("evaluation",),
    ("compress",),
    ("training", "publish"),
    ("tour",),  # lrc demo: the shipped digits and teacher through factorize, report, recover and eval
    ("cli",),
    ("api",),  # lowrank_cli/__init__ (the lazy public API), _legacy (old import paths), __main__
]
TIER = {package: i for i, tier in enumerate(PACKAGE_ORDER) for package in tier}


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__", "_legacy"):
        return "api"
    return "foundation" if parts[1] in FOUNDATION else parts[1]


def upward_imports(trees: dict[str, ast.Module]) -> list[str]:
    """Every lowrank_cli import (module level or inside a function) of `trees` that does not go downward in
    PACKAGE_ORDER, as "importer -> imported"."""
    found = []
    for name, tree in trees.items():
        here = package_of(name)
        for target, _ in _imports_of(tree):
            there = package_of(target)
            if there != here and TIER[there] >= TIER[here]:
                found.append(f"{name} ({here}) -> {target} ({there})")
    return found


def test_packages_import_downward_only():
    assert set(TIER) == {package_of(m) for m in MODULES}, "every package has its place in PACKAGE_ORDER"
    assert upward_imports(TREES) == []


def test_an_upward_import_is_caught_inside_a_function_too():
    planted = {
        "lowrank_cli.models.planted": ast.parse(
            "import lowrank_cli.layers.lowrank_linear\n"  # downward: fine
            "def later():\n"
            "    from lowrank_cli.checkpoint.io import read_checkpoint\n"  # hidden inside a function: caught
            "    import lowrank_cli.cli.app\n"
        ),
        "lowrank_cli.data.planted": ast.parse("from lowrank_cli import distributed\n"
                                              "from lowrank_cli.evaluation import report\n"),
        "lowrank_cli.training.planted": ast.parse("from lowrank_cli.publish.card import build_card\n"),  # one tier
    }
    assert upward_imports(planted) == [
        "lowrank_cli.models.planted (models) -> lowrank_cli.checkpoint.io (checkpoint)",
        "lowrank_cli.models.planted (models) -> lowrank_cli.cli.app (cli)",
        "lowrank_cli.data.planted (data) -> lowrank_cli.evaluation.report (evaluation)",
        "lowrank_cli.training.planted (training) -> lowrank_cli.publish.card (publish)",
    ]


def test_a_circle_put_back_into_a_real_module_fails_the_check():
    """The loading of lrc checkpoints sat in models/ and imported checkpoint/ inside a function: put it back."""
    source = MODULES["lowrank_cli.models.pretrained"].read_text()
    planted = ast.parse(source + "\n\ndef read_lrc(path):\n    from lowrank_cli.checkpoint.io import read_checkpoint\n")
    assert upward_imports({**TREES, "lowrank_cli.models.pretrained": planted}) == [
        "lowrank_cli.models.pretrained (models) -> lowrank_cli.checkpoint.io (checkpoint)"]


def test_no_module_imports_an_old_path():
    """The 0.x paths (lowrank_cli._legacy) are for code users wrote; lrc imports each name from its home."""
    from lowrank_cli._legacy import OLD_TO_NEW

    old = [f"{m} imports {t}" for m in MODULES for t, _ in _imports(m) if t in OLD_TO_NEW or
           any(t.startswith(o + ".") for o in OLD_TO_NEW)]
    assert old == []


def test_no_private_name_crosses_modules():
    crossing = [f"{m} imports {t}.{n}" for m in MODULES for t, n in _imports(m)
                if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not crossing


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines, its docstring not counted (a long docstring is reading, not logic)."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


KERNELS = "lowrank_cli.layers.kernels."  # Triton kernels: one body, its arguments the launch's (strides, blocks)


def _exempt_from_parameter_count(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Typer commands (their options are their parameters) and Triton kernels."""
    return module.startswith(KERNELS) or (module.startswith("lowrank_cli.cli.") and module.endswith("_cmd"))


def test_modules_and_functions_stay_small():
    big_modules = {m: p.read_text().count("\n") for m, p in MODULES.items()}
    assert {m: n for m, n in big_modules.items() if n > MAX_MODULE_LINES} == {}
    functions = [(m, node) for m, tree in TREES.items() for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]
    long_functions = [f"{m}.{node.name} ({_code_lines(node)} lines)" for m, node in functions
                      if _code_lines(node) > MAX_FUNCTION_LINES and not m.startswith(KERNELS)]
    assert long_functions == []
    many_parameters = [f"{m}.{node.name} ({_parameters(node)} parameters)" for m, node in functions
                       if _parameters(node) > MAX_PARAMETERS and not _exempt_from_parameter_count(m, node)]
    assert many_parameters == []


def test_the_size_rules_count_what_they_say():
    tree = ast.parse("def f(self, a, b, *, c):\n    \"\"\"One.\n\n    Two.\"\"\"\n    return a\n")
    node = tree.body[0]
    assert _code_lines(node) == 2 and _parameters(node) == 3
    assert _exempt_from_parameter_count("lowrank_cli.layers.kernels.lowrank_triton", node)
    assert _exempt_from_parameter_count("lowrank_cli.cli.bench_cmd", node)
    assert not _exempt_from_parameter_count("lowrank_cli.evaluation.bench", node)


def test_library_messages_name_parameters_not_cli_flags():
    """Outside cli/, an error names the API parameter (`batch_size`); the CLI renders it as its option."""
    from lowrank_cli.cli.options import option_name
    from lowrank_cli.errors import UsageError
    from lowrank_cli.training.options import RecoverOptions

    with pytest.raises(UsageError) as info:
        RecoverOptions(steps=1, batch_size=0).check()
    assert str(info.value) == "batch_size must be at least 1, got 0"
    assert info.value.render(option_name) == "--batch-size must be at least 1, got 0"
    assert option_name("num_workers") == "--workers" and option_name("force=True") == "--force"


OLD_PATHS = [
    ("lowrank_cli.lowrank_linear", "LowRankLinear"), ("lowrank_cli.checkpoint", "load"),
    ("lowrank_cli.checkpoint", "save"), ("lowrank_cli.sources", "load_model"), ("lowrank_cli.sources", "LoadedModel"),
    ("lowrank_cli.factorization", "factorize"), ("lowrank_cli.factorization", "factorize_file"),
    ("lowrank_cli.plan", "make_plan"), ("lowrank_cli.plan", "block_names"), ("lowrank_cli.recovery", "recover"),
    ("lowrank_cli.recovery", "RecoverResult"), ("lowrank_cli.recovery", "lr_factor"),
    ("lowrank_cli.report", "build_report"), ("lowrank_cli.report", "apply_gates"), ("lowrank_cli.bench", "bench"),
    ("lowrank_cli.bench", "profile"), ("lowrank_cli.accuracy", "evaluate"), ("lowrank_cli.image_data", "find_images"),
    ("lowrank_cli.text_data", "find_texts"), ("lowrank_cli.distill_loss", "RecoveryLoss"),
    ("lowrank_cli.train_state", "metrics_path"), ("lowrank_cli.counting", "count_macs"),
    # moved by the model families: loading any source went above checkpoint/, merge rules to training/
    ("lowrank_cli.models.sources", "load_model"), ("lowrank_cli.models.sources", "parse_model_args"),
    ("lowrank_cli.models.sources", "LIBRARIES"), ("lowrank_cli.models.sources", "LoadedModel"),
    ("lowrank_cli.sources", "load_model"), ("lowrank_cli.adapters.merging", "merge_deltas"),
    ("lowrank_cli.model_spec", "spec_of"), ("lowrank_cli.model_inputs", "record_input_size"),
]


def test_old_import_paths_still_work():
    """In a fresh interpreter, as user code that predates the layout would run."""
    code = "; ".join(f"from {module} import {name}" for module, name in OLD_PATHS) + (
        "; import lowrank_cli.lowrank_linear as old, lowrank_cli.layers.lowrank_linear as new; assert old is new")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_help_does_not_import_torch():
    code = "import sys; from lowrank_cli.cli.app import app; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
