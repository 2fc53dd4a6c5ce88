"""The shape of the package: stages import downwards only, no module reaches for another's private names, no
module or function grows past what a reader takes in at once, and the 0.x import paths keep working."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_cli"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _imports(name: str):
    """(imported module, imported name or None) for every lowrank_cli import, those inside functions too."""
    for node in ast.walk(TREES[name]):
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


def test_no_private_name_crosses_modules():
    crossing = [f"{m} imports {t}.{n}" for m in MODULES for t, n in _imports(m)
                if n and n.startswith("_") and not n.startswith("__") and t != m]
    assert not crossing


def test_modules_and_functions_stay_small():
    big_modules = {m: p.read_text().count("\n") for m, p in MODULES.items()}
    assert {m: n for m, n in big_modules.items() if n > MAX_MODULE_LINES} == {}
    long_functions = [f"{m}.{node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for m, tree in TREES.items() for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long_functions == []


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
