"""`lrc report`: exact counts (DeiT-B dense and at kappa 2), MACs with attention, gates, JSON schema, every source.

DeiT-B is built once (module fixture). Its kappa-2 file is made by the real `lowrank_cli.factorize` and
`lowrank_cli.save`, with a `factor_fn` that returns zero factors instead of running 48 SVDs (~40 s on two
cores): parameter and MAC counts depend on shapes only. Everything else uses a tiny ViT.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from pathlib import Path

from lowrank_cli.checkpoint.format import record_source

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from helpers import error_lines, make_tiny_vit, run_cli  # noqa: E402
from torch import nn  # noqa: E402

import lowrank_cli  # noqa: E402
from lowrank_cli.compress.svd import Factors  # noqa: E402
from lowrank_cli.errors import UsageError  # noqa: E402
from lowrank_cli.evaluation.counting import format_size  # noqa: E402
from lowrank_cli.evaluation.gates import apply_gates  # noqa: E402
from lowrank_cli.evaluation.report import build_report, report_model  # noqa: E402
from lowrank_cli.evaluation.report_format import to_markdown  # noqa: E402

SCHEMA_DOC = Path(__file__).resolve().parents[2] / "docs" / "report_schema.md"
TINY_ARCH = "vit_tiny_patch16_224"
TINY_MODEL_ARGS = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "depth=4",
                   "--model-arg", "num_classes=10"]
make_tiny = make_tiny_vit
errors = error_lines


def run(args: list, capsys) -> tuple[int, str, str]:
    """`lrc report ARGS` in-process through the real entry point: (exit code, stdout, stderr)."""
    return run_cli(["report", *args], capsys)


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny_folder(tiny_vit_folder) -> Path:
    return tiny_vit_folder


@pytest.fixture(scope="module")
def tiny_files(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The tiny ViT as: an lrc checkpoint, one with recovery and speed-plan metadata, plain safetensors, .pth."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_files")
    dense = make_tiny()
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(root / "plain.safetensors"))
    torch.save(dense.state_dict(), root / "plain.pth")
    loaded = lowrank_cli.load_model(str(tiny_folder))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small SVDs: threads only add synchronisation, which is slow on a busy machine
    try:
        lowrank_cli.factorize(loaded.model, kappa=2, rank_multiple=8, check_calls=False)
    finally:
        torch.set_num_threads(threads)
    record_source(loaded.model, loaded.source)
    lowrank_cli.save(loaded.model, root / "lr.safetensors")
    info = loaded.model.lrc_info
    info.recovery = {"epochs": 1, "alpha": 1.0, "beta": 0.0, "top1": 0.5}
    info.plan = {"layers": {"blocks.0.mlp.fc1": {"dense_ms": 2.0, "lowrank_ms": 1.0}}}
    lowrank_cli.save(loaded.model, root / "lr_full.safetensors")
    return {"lr": root / "lr.safetensors", "lr_full": root / "lr_full.safetensors",
            "plain": root / "plain.safetensors", "pth": root / "plain.pth"}


@pytest.fixture(scope="module")
def deit_dense():
    """DeiT-B (random weights) and its report; the same model object is factorized by `deit_lr_file` after."""
    model = timm.create_model("deit_base_patch16_224", pretrained=False).eval()
    return model, report_model(model)


def _zero_factors(name: str, weight: torch.Tensor, rank: int) -> Factors:
    d_out, d_in = weight.shape
    s = torch.linspace(1.0, 0.01, min(d_in, d_out))
    kept = float(s[:rank].square().sum() / s.square().sum())
    return Factors(torch.zeros(rank, d_in), torch.zeros(d_out, rank), s, kept, math.sqrt(1 - kept), "test")


@pytest.fixture(scope="module")
def deit_lr_file(deit_dense, tmp_path_factory) -> Path:
    model, _ = deit_dense
    lowrank_cli.factorize(model, kappa=2, rank_multiple=1, check_calls=False, factor_fn=_zero_factors)
    path = tmp_path_factory.mktemp("deit") / "deit_lr.safetensors"
    lowrank_cli.save(model, path)
    return path


# ------------------------------------------------------------------------------------------------ DeiT-B figures


@pytest.mark.slow
def test_deit_base_dense_figures(deit_dense) -> None:
    _, report = deit_dense
    doc = report.document
    assert doc["params"]["total"] == 86_567_656
    assert doc["params"]["lowrank"] == 0
    assert doc["params"]["dense_linear"] + doc["params"]["other"] == 86_567_656
    assert doc["model"]["input_size"] == [3, 224, 224]
    assert abs(doc["macs"]["total"] - 17.58e9) / 17.58e9 < 0.005
    assert doc["macs"]["flops"] == 2 * doc["macs"]["total"]
    assert doc["macs"]["uncounted"] == {}
    assert doc["macs"]["by_operator"]["scaled_dot_product_attention"] > 0
    assert doc["dense_reference"]["kind"] == "self"
    assert doc["compression"] == {"params": 1.0, "macs": 1.0}


@pytest.mark.slow
def test_deit_base_kappa2_file(deit_dense, deit_lr_file) -> None:
    dense = deit_dense[1].document
    doc = build_report(str(deit_lr_file)).document
    assert doc["source"]["kind"] == "lrc"
    assert doc["params"]["total"] == 44_081_896
    assert format_size(doc["params"]["total"]) == "44.08M"

    # What the rank rule removes, computed here from the architecture alone: per block qkv, proj, fc1, fc2.
    tokens, d, hidden, blocks = 197, 768, 3072, 12
    removed_params = removed_macs = 0
    for d_in, d_out in ((d, 3 * d), (d, d), (d, hidden), (hidden, d)):
        rank = d_in * d_out // (2 * (d_in + d_out))  # PELA's floor rule at kappa 2, multiple 1
        removed_params += blocks * (d_in * d_out - rank * (d_in + d_out))
        removed_macs += blocks * tokens * (d_in * d_out - rank * (d_in + d_out))
    assert doc["params"]["total"] == 86_567_656 - removed_params
    assert doc["macs"]["total"] == dense["macs"]["total"] - removed_macs

    # Without --compare, the dense reference is rebuilt from the metadata: exactly the dense model's figures.
    assert doc["dense_reference"] == {"kind": "reconstructed", "source": None,
                                      "params": 86_567_656, "macs": dense["macs"]["total"]}
    assert doc["compression"]["params"] == pytest.approx(86_567_656 / 44_081_896)
    assert doc["compression"]["macs"] == pytest.approx(dense["macs"]["total"] / doc["macs"]["total"])
    low = [r for r in doc["layers"] if r["kind"] == "lowrank"]
    assert len(low) == 48 and all(r["tokens"] == 197 for r in low)
    assert [r["name"] for r in doc["layers"] if r["kind"] == "dense"] == ["head"]
    assert doc["provenance"]["kappa"] == 2 and doc["provenance"]["rank_multiple"] == 1

    # CI gates on the same report: 44.08M params pass 50M; 9.21 GMACs fail 9G; 1.96x passes 1.8.
    from lowrank_cli.evaluation.report import Report

    failed = apply_gates(Report(doc), max_params=50_000_000, max_macs=9_000_000_000, min_compression=1.8)
    assert [g["name"] for g in failed] == ["max_macs"]


# ------------------------------------------------------------------------------------------------ MACs


def _set_fused_attn(model: nn.Module, fused: bool) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def test_attention_is_counted_fused_or_not() -> None:
    model = make_tiny()
    _set_fused_attn(model, True)
    fused = report_model(model).document["macs"]
    _set_fused_attn(model, False)
    unfused = report_model(model).document["macs"]
    assert fused["total"] == unfused["total"]
    assert fused["by_operator"]["scaled_dot_product_attention"] > 0
    assert "scaled_dot_product_attention" not in unfused["by_operator"]
    assert fused["uncounted"] == unfused["uncounted"] == {}


def test_input_size_override_changes_macs() -> None:
    model = make_tiny(dynamic_img_size=True)
    small = report_model(model).document
    large = report_model(model, input_size=(3, 64, 64)).document
    assert small["model"]["input_size"] == [3, 32, 32]
    assert large["model"]["input_size"] == [3, 64, 64]
    assert large["macs"]["total"] > 3 * small["macs"]["total"]
    assert {r["tokens"] for r in large["layers"] if r["name"] != "head"} == {65}


class _Cumprod(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, dim=-1)


def test_uncounted_ops_are_listed_not_hidden(capsys) -> None:
    from lowrank_cli.cli.report_cmd import print_report

    model = nn.Sequential(nn.Linear(8, 8), _Cumprod())  # (cumsum counts 0: transformers' position bookkeeping)
    doc = report_model(model, input_size=(4, 8)).document
    assert doc["macs"]["uncounted"] == {"aten::cumprod": 1}
    assert doc["macs"]["total"] == 4 * 8 * 8
    print_report(doc, per_layer=False)
    out, err = capsys.readouterr()
    assert "NOT counted" in out and "aten::cumprod" in out
    assert "lower bound" in err
    assert "aten::cumprod" in to_markdown(doc)


# ------------------------------------------------------------------------------------------------ sources


def test_dense_folder_is_its_own_reference(tiny_folder, capsys) -> None:
    code, out, err = run([tiny_folder, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    model = make_tiny()
    linears = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) for p in m.parameters())
    assert doc["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert doc["params"]["dense_linear"] == linears
    assert doc["source"]["kind"] == "local-dir"
    assert doc["dense_reference"]["kind"] == "self" and doc["compression"] == {"params": 1.0, "macs": 1.0}
    assert doc["provenance"] is None and doc["recovery"] is None
    assert {r["tokens"] for r in doc["layers"] if r["name"] != "head"} == {17}  # 16 patches + class token


def test_lrc_checkpoint_reference_matches_the_measured_dense_model(tiny_folder, tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["lr"], "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    code, out, _ = run([tiny_folder, "--json"], capsys)
    dense = json.loads(out)
    assert doc["dense_reference"]["kind"] == "reconstructed"
    assert doc["dense_reference"]["params"] == dense["params"]["total"]
    assert doc["dense_reference"]["macs"] == dense["macs"]["total"]
    code, out, _ = run([tiny_files["lr"], "--json", "--compare", tiny_folder], capsys)
    compared = json.loads(out)
    assert compared["dense_reference"] == {"kind": "compare", "source": str(tiny_folder),
                                           "params": dense["params"]["total"], "macs": dense["macs"]["total"]}
    assert compared["compression"] == doc["compression"]
    info, _ = lowrank_cli.read_info(tiny_files["lr"])
    rows = {r["name"]: r for r in doc["layers"]}
    assert set(info.ranks) == {n for n, r in rows.items() if r["kind"] == "lowrank"}
    for name, layer in info.layers.items():
        assert rows[name]["rank"] == layer["rank"]
        assert rows[name]["kept_energy"] == pytest.approx(layer["kept_energy"])
    prov = doc["provenance"]
    assert prov["kappa"] == 2 and prov["rank_multiple"] == 8 and prov["svd"] == "exact"
    assert prov["source"]["kind"] == "local-dir" and prov["factorized"] == 16


def test_plain_safetensors_without_arch(tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["plain"], "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["params"]["total"] == sum(p.numel() for p in make_tiny().parameters())
    assert doc["params"]["counted_from"] == "tensor_shapes"
    assert doc["params"]["lowrank"] is None and doc["macs"]["total"] is None
    assert "--arch" in doc["macs"]["note"]
    assert doc["source"]["kind"] == "safetensors" and doc["dense_reference"] is None
    code, out, err = run([tiny_files["plain"]], capsys)
    assert code == 0 and "--arch" in out and not errors(err)


@pytest.mark.parametrize("name", ["plain", "pth"])
def test_weights_file_with_arch(tiny_folder, tiny_files, name, capsys) -> None:
    code, out, err = run([tiny_files[name], "--arch", TINY_ARCH, *TINY_MODEL_ARGS, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    _, dense_out, _ = run([tiny_folder, "--json"], capsys)
    dense = json.loads(dense_out)
    assert doc["source"]["kind"] == "file" and doc["model"]["architecture"] == TINY_ARCH
    assert doc["params"] == dense["params"] and doc["macs"]["total"] == dense["macs"]["total"]


def test_plain_file_compare_gives_params_compression(tiny_folder, tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["plain"], "--compare", tiny_folder, "--min-compression", "1", "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["compression"]["params"] == 1.0 and doc["compression"]["macs"] is None


# ------------------------------------------------------------------------------------------------ gates


@pytest.fixture(scope="module")
def tiny_lr_doc(tiny_files) -> dict:
    return build_report(str(tiny_files["lr"])).document


@pytest.mark.parametrize(
    "option, scale, passes",
    [("--max-params", 1.01, True), ("--max-params", 0.99, False),
     ("--max-macs", 1.01, True), ("--max-macs", 0.99, False),
     ("--min-compression", 0.99, True), ("--min-compression", 1.01, False)],
)
def test_gate_pass_and_fail(tiny_files, tiny_lr_doc, option, scale, passes, capsys) -> None:
    doc = tiny_lr_doc
    value = {"--max-params": doc["params"]["total"], "--max-macs": doc["macs"]["total"],
             "--min-compression": doc["compression"]["params"]}[option]
    limit = f"{value * scale:.4f}" if option == "--min-compression" else str(int(value * scale))
    code, out, err = run([tiny_files["lr"], option, limit], capsys)
    assert "lrc report" in out  # the report is printed either way
    what = {"--max-params": "params", "--max-macs": "MACs", "--min-compression": "compression"}[option]
    if passes:
        assert code == 0 and not errors(err)
        assert f"gates passed: {what}" in err
    else:
        assert code == 1
        assert errors(err) == [errors(err)[0]] and errors(err)[0].startswith(f"Error: gates failed: {what} ")
        if option == "--min-compression":
            assert f"{value:.2f}x < {float(limit):.2f}x required" in err
        else:
            assert f"{format_size(value)} > {format_size(int(limit))} allowed" in err


def test_all_failing_gates_on_one_error_line_and_in_json(tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["lr"], "--max-params", "100k", "--max-macs", "1M", "--min-compression", "9",
                          "--json"], capsys)
    assert code == 1
    (line,) = errors(err)
    assert re.fullmatch(r"Error: gates failed: params \S+ > 100.00k allowed; MACs \S+ > 1.00M allowed; "
                        r"compression \S+x < 9.00x required", line), line
    gates = json.loads(out)["gates"]
    assert [(g["name"], g["passed"]) for g in gates] == [("max_params", False), ("max_macs", False),
                                                        ("min_compression", False)]
    assert gates[0]["limit"] == 100_000 and gates[1]["limit"] == 1_000_000


@pytest.mark.parametrize(
    "args, code, fragment",
    [(["--min-compression", "1.5"], 2, "--compare"),
     (["--max-macs", "1G"], 2, "--arch"),
     (["--max-params", "50Q"], 2, "--max-params"),
     (["--min-compression", "abc"], 2, "--min-compression"),
     (["--json", "--markdown"], 2, "choose one")],
)
def test_gate_usage_errors(tiny_files, args, code, fragment, capsys) -> None:
    got, out, err = run([tiny_files["plain"], *args], capsys)
    assert got == code
    assert len(errors(err)) == 1 and fragment in errors(err)[0]
    assert out == ""


def test_apply_gates_without_reference_is_a_usage_error(tiny_files) -> None:
    report = build_report(str(tiny_files["plain"]))
    with pytest.raises(UsageError, match="compare"):
        apply_gates(report, min_compression=1.5)


# ------------------------------------------------------------------------------------------------ JSON schema


def documented_keys() -> tuple[set[str], set[str]]:
    """(every documented key path, the paths documented as open objects) from docs/report_schema.md; keys
    documented as optional (present only for some models) are left out."""
    keys, open_keys = set(), set()
    for line in SCHEMA_DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9_\[\].]+)` \|([^|]*)\|", line)
        if m and "**optional**" not in m.group(2):
            keys.add(m.group(1))
            if "**open**" in m.group(2):
                open_keys.add(m.group(1))
    return keys, open_keys


def key_paths(value, open_keys: set[str], prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else k
            paths.add(path)
            if path not in open_keys:
                paths |= key_paths(v, open_keys, path)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                paths |= key_paths(item, open_keys, prefix + "[]")
    return paths


def test_json_has_exactly_the_documented_keys(tiny_folder, tiny_files, capsys) -> None:
    documented, open_keys = documented_keys()
    assert {"schema", "layers[].kept_energy", "gates[].passed", "compression.macs"} <= documented
    code, out, err = run([tiny_files["lr_full"], "--json", "--compare", tiny_folder, "--max-params", "100M"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == 1
    assert key_paths(doc, open_keys) == documented  # everything present here: no null objects, rows, gates
    assert doc["recovery"] == {"epochs": 1, "alpha": 1.0, "beta": 0.0, "top1": 0.5}
    rows = {r["name"]: r for r in doc["layers"]}
    assert rows["blocks.0.mlp.fc1"]["speedup"] == 2.0
    assert rows["blocks.0.mlp.fc1"]["plan"] == {"dense_ms": 2.0, "lowrank_ms": 1.0}
    assert rows["blocks.0.mlp.fc2"]["speedup"] is None
    # Reports with null parts keep every top-level key and add nothing undocumented.
    for args in ([tiny_files["plain"]], [tiny_folder]):
        _, out, _ = run([*args, "--json"], capsys)
        partial = json.loads(out)
        assert set(partial) == {k for k in documented if "." not in k and "[" not in k}
        assert key_paths(partial, open_keys) <= documented


# ------------------------------------------------------------------------------------------------ output


def test_per_layer_table(tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["lr"], "--per-layer"], capsys)
    assert code == 0, err
    assert "blocks.3.mlp.fc2" in out and "kept energy" in out and "dense" in out
    assert "speed gain" not in out
    code, out, _ = run([tiny_files["lr_full"], "--per-layer"], capsys)
    assert "speed gain" in out and "2.00x" in out


def test_markdown(tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["lr"], "--markdown", "--per-layer", "--max-params", "10M"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("### lrc report: ")
    assert any(line.startswith("| compression | ") for line in lines)
    assert any(line.startswith("| gate --max-params | ✅ passed") for line in lines)
    assert sum(line.startswith("| blocks.") for line in lines) == 16  # the 16 low-rank layers, then the head
    assert any(line.startswith("| head | ") for line in lines)


def test_stdout_holds_only_the_report(tiny_files, capsys) -> None:
    code, out, err = run([tiny_files["lr"], "--json"], capsys)
    json.loads(out)  # nothing but the document
    assert "Counting MACs" in err


# ------------------------------------------------------------------------------------------------ errors


def _corrupt_metadata(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["lrc.ranks"] = "{not json"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dst.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


@pytest.mark.parametrize("case", ["truncated", "garbage", "metadata", "unknown-model", "missing"])
def test_bad_inputs_give_one_error_line(tiny_files, tmp_path, case, capsys) -> None:
    if case == "truncated":
        source = tmp_path / "t.safetensors"
        source.write_bytes(tiny_files["lr"].read_bytes()[:50_000])
        fragment = "truncated or corrupt"
    elif case == "garbage":
        source = tmp_path / "g.safetensors"
        source.write_bytes(b"not a safetensors file at all")
        fragment = "not a readable safetensors file"
    elif case == "metadata":
        source = tmp_path / "m.safetensors"
        _corrupt_metadata(tiny_files["lr"], source)
        fragment = "lrc.ranks' is not valid JSON"
    elif case == "unknown-model":
        source, fragment = "deit_bse", "closest timm names: deit"
    else:
        source, fragment = tmp_path / "nope.safetensors", "does not exist"
    code, out, err = run([source], capsys)
    assert code == 3
    assert len(errors(err)) == 1 and fragment in errors(err)[0]
    assert "Traceback" not in err and out == ""


# ------------------------------------------------------------------------------------------------ plot


def test_plot(tiny_files, tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "spectrum.png"
    code, out, err = run([tiny_files["lr"], "--plot", path], capsys)
    assert code == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert f"Wrote {path}" in err


@pytest.mark.parametrize("case", ["no-matplotlib", "dense-model", "bad-extension"])
def test_plot_errors(tiny_files, tiny_folder, tmp_path, monkeypatch, case, capsys) -> None:
    source, target = tiny_files["lr"], tmp_path / "spectrum.png"
    if case == "no-matplotlib":
        for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
            monkeypatch.delitem(sys.modules, name)
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
        expected = (6, "pip install 'lowrank-cli[plot]'")
    elif case == "dense-model":
        pytest.importorskip("matplotlib")
        source, expected = tiny_folder, (2, "has none")
    else:
        pytest.importorskip("matplotlib")
        target, expected = tmp_path / "spectrum.xyz", (2, "extension")
    code, _, err = run([source, "--plot", target], capsys)
    assert code == expected[0]
    assert len(errors(err)) == 1 and expected[1] in errors(err)[0]
    assert not target.exists()
