"""`lrc factorize` as a user runs it: outputs, every bad input (one Error: line, exit code, no file written)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import error_lines, run_cli
from safetensors.torch import save_file

import lowrank_cli


def test_factorize_folder_json_and_load_back(tiny_vit_folder, tmp_path, capsys):
    out = tmp_path / "lr.safetensors"
    code, stdout, err = run_cli(["factorize", f"local-dir:{tiny_vit_folder}", "--kappa", "2", "-o", out, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)  # stdout holds the JSON document and nothing else
    assert doc["factorized"] == 16 and doc["output"] == str(out)
    assert doc["ranks_by_group"] == {"qkv": [72], "proj": [48], "fc1": [72], "fc2": [72]}
    assert doc["params_after"] < doc["params_before"] and 1.9 < doc["compression"] < 2.1
    assert 0 < doc["max_rel_error"] < 1
    model = lowrank_cli.load(out)
    assert sum(p.numel() for p in model.parameters()) == doc["params_after"]
    info = lowrank_cli.read_info(out)[0]
    assert info.provenance["source"]["kind"] == "local-dir"


def test_table_output_and_exclude(tiny_vit_folder, tmp_path, capsys):
    out = tmp_path / "lr.safetensors"
    code, stdout, _ = run_cli(["factorize", str(tiny_vit_folder), "--exclude", r"blocks\.3\..*", "--rank-multiple", "1",
                               "-o", out], capsys)
    assert code == 0
    assert "factorized linears" in stdout and "12" in stdout and "largest relative error" in stdout
    assert lowrank_cli.read_info(out)[0].ranks.keys() == {f"blocks.{b}.{m}" for b in range(3)
                                                         for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}


def test_overwrite_needs_force(tiny_vit_folder, tmp_path, capsys):
    out = tmp_path / "lr.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli(["factorize", str(tiny_vit_folder), "-o", out], capsys)
    assert code == 4 and error_lines(err) == [f"Error: output '{out}' exists: pass --force to overwrite it, or choose another name"]
    assert out.read_bytes() == b"precious"
    code, _, _ = run_cli(["factorize", str(tiny_vit_folder), "-o", out, "--force"], capsys)
    assert code == 0 and lowrank_cli.load(out) is not None


@pytest.fixture
def bad_inputs(tmp_path, tiny_vit_folder):
    from helpers import make_tiny_vit

    sd = make_tiny_vit().state_dict()
    torch.save(sd, tmp_path / "w.pth")
    (tmp_path / "notes.safetensors").write_text("this is not a safetensors file")
    save_file(sd, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 3])
    return tmp_path


CASES = [
    # (args after 'factorize', exit code, a piece of the one Error: line)
    (["deit_bse"], 3, "'deit_bse' is not a file, a folder or a timm model name (closest timm names: deit_base"),
    (["hf-hub:acme/absent"], 3, "is not in the Hugging Face cache and HF_HUB_OFFLINE is set"),
    (["missing.pth"], 3, "'missing.pth' does not exist"),
    (["{d}/notes.safetensors"], 3, "is not a readable safetensors file"),
    (["{d}/cut.safetensors"], 3, "is not a readable safetensors file"),
    (["{d}/w.pth"], 2, "is a bare weights file: say which architecture it is for with --arch NAME"),
    (["{d}/w.pth", "--arch", "vit_tiny_patch16_224"], 3, "do not fit the architecture"),
    (["{folder}", "--kappa", "1"], 2, "kappa must be a number > 1"),
    (["{folder}", "--kappa", "abc"], 2, "Invalid value for '--kappa'"),
    (["{folder}", "--include", "qkv"], 2, "--include 'qkv' matches no nn.Linear"),
    (["{folder}", "--svd", "qr"], 2, "--svd 'qr' is not one of exact, randomized"),
]


@pytest.mark.parametrize("args,code,message", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_inputs(args, code, message, bad_inputs, tiny_vit_folder, capsys):
    out = bad_inputs / "out.safetensors"
    args = [a.format(d=bad_inputs, folder=tiny_vit_folder) for a in args]
    got, stdout, err = run_cli(["factorize", *args, "-o", out], capsys)
    lines = error_lines(err)
    assert got == code, err
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and stdout == ""
    assert not out.exists()
    assert not [p for p in bad_inputs.iterdir() if p.name.startswith(".out")]  # no temporary file either


def test_missing_output_folder(tiny_vit_folder, tmp_path, capsys):
    code, _, err = run_cli(["factorize", str(tiny_vit_folder), "-o", tmp_path / "nope" / "x.safetensors"], capsys)
    assert code == 4 and error_lines(err) == [
        f"Error: the folder of output '{tmp_path / 'nope' / 'x.safetensors'}' does not exist: create '{tmp_path / 'nope'}' first"]


def test_interrupted_factorize_leaves_nothing(tiny_vit_folder, tmp_path, capsys, monkeypatch):
    from lowrank_cli.compress import factorization

    real = factorization.truncated_svd
    calls = []

    def interrupt_on_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(factorization, "truncated_svd", interrupt_on_third)
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(["factorize", str(tiny_vit_folder), "-o", out], capsys)
    assert code == 130 and error_lines(err) == ["Error: interrupted"]
    assert list(tmp_path.iterdir()) == []


def test_module_entry_point_and_fast_help():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "lowrank_cli", "factorize", "--help"], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "--rank-multiple" in res.stdout and "Examples" in res.stdout
    # --help must not pay for torch / timm
    res = subprocess.run([sys.executable, "-c", "import sys; from lowrank_cli.cli.app import app; "
                          "print(sorted(m for m in ('torch', 'timm', 'fvcore') if m in sys.modules))"],
                         capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "[]", res.stderr


def test_debug_shows_traceback_for_bugs(monkeypatch, capsys, tiny_vit_folder, tmp_path):
    from lowrank_cli.compress import factorization

    monkeypatch.setattr(factorization, "make_plan", lambda *a, **k: 1 / 0)
    code, _, err = run_cli(["factorize", str(tiny_vit_folder), "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 1 and error_lines(err)[0].startswith("Error: unexpected ZeroDivisionError") and "LRC_DEBUG=1" in err
    monkeypatch.setenv("LRC_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        from lowrank_cli.cli.app import main

        main(["factorize", str(tiny_vit_folder), "-o", str(tmp_path / "x.safetensors")])


def test_speed_plan_and_auto_multiple_are_recorded(tiny_vit_folder, tmp_path, capsys):
    out = tmp_path / "fast.safetensors"
    code, stdout, err = run_cli(["factorize", tiny_vit_folder, "--plan", "speed", "--rank-multiple", "auto",
                                 "--plan-batch-size", "2", "--plan-dtype", "bf16", "--device", "cpu", "-o", out,
                                 "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    info = lowrank_cli.read_info(out)[0]
    # timed in the precision it will run in, stored in the source's
    assert info.plan["dtype"] in ("bf16", "bfloat16", "torch.bfloat16") and info.provenance["dtype"] == "float32"
    from lowrank_cli.compress.speed_plan import auto_rank_multiple

    assert info.provenance["rank_multiple"] == auto_rank_multiple("cpu") in (8, 16)
    assert info.provenance["rank_multiple_asked"] == "auto"
    assert all(rank % info.provenance["rank_multiple"] == 0 for rank in info.ranks.values())
    assert info.provenance["plan"] == "speed" and info.plan["kind"] == "speed" and info.plan["batch_size"] == 2
    timed = info.plan["layers"]
    assert set(timed) == set(info.ranks) | set(info.dense)
    for name, t in timed.items():  # factorized exactly where it measured faster
        assert t["factorized"] == (t["gain"] > 1.0) == (name in info.ranks)
    assert doc["speed_plan"]["kind"] == "speed"
    code, stdout, _ = run_cli(["report", out, "--per-layer", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(stdout)["layers"]}
    assert all(rows[n]["speedup"] == pytest.approx(timed[n]["gain"], rel=1e-6) for n in info.ranks)


def test_off_a_terminal_long_commands_print_plain_progress_lines(tiny_vit_folder, tmp_path, capsys, monkeypatch):
    """A CI log (stderr not a terminal, no --progress): factorize prints a plain line when a phase starts, at most
    every 10 s (here: every call) and when it ends, not nothing until its table; --no-progress prints none."""
    from lowrank_cli.cli import console

    monkeypatch.setattr(console.PhaseProgress.__init__, "__defaults__", (0.0,))  # every: a line per update
    code, _, err = run_cli(["factorize", tiny_vit_folder, "--kappa", "2", "-o", tmp_path / "a.safetensors"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("SVD ")]
    assert code == 0 and lines[0] == "SVD 0/16" and lines[-1] == "SVD 16/16 (blocks.3.mlp.fc2)", err
    assert len(lines) == 17 and "SVD 1/16 (blocks.0.attn.qkv)" in lines  # one per layer when each takes >= every
    code, _, err = run_cli(["factorize", tiny_vit_folder, "--kappa", "2", "--no-progress", "-o",
                            tmp_path / "b.safetensors"], capsys)
    console.show_progress(None)  # the next command (or test) decides again
    assert code == 0 and not [line for line in err.splitlines() if line.startswith("SVD ")], err
