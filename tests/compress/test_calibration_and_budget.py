"""Data-aware factorization and rank budgets through the real `factorize` path, on real images."""

import copy

import pytest
import torch
from helpers import error_lines, make_tiny_vit, run_cli

import lowrank_cli
from lowrank_cli.data.images import find_images, make_loader, make_transform
from lowrank_cli.errors import UsageError
from lowrank_cli.models.structure import block_names


@pytest.fixture(scope="module")
def digits(digits_folder):
    return digits_folder(32, 30)


def held_out_images(model, digits, n=64):
    images = find_images(digits, split="val")
    loader, _ = make_loader(images, make_transform(model, training=False), n, shuffle=True, seed=1, drop_last=False)
    return next(iter(loader)).images


def block_outputs(model, x):
    outs = []
    hooks = [model.get_submodule(b).register_forward_hook(lambda m, i, o: outs.append(o)) for b in block_names(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def block_error(model, dense_outs, x):
    return sum(((o - d).norm() / d.norm()).item() for o, d in zip(block_outputs(model, x), dense_outs))


def test_data_aware_budget_beats_uniform_plain_on_held_out_images(digits):
    dense = make_tiny_vit(seed=3)
    x = held_out_images(dense, digits)
    dense_outs = block_outputs(dense, x)

    plain = copy.deepcopy(dense)
    r_plain = lowrank_cli.factorize(plain, kappa=2, rank_multiple=8)
    target_layers = sum(p.d_in * p.d_out for p in r_plain.plan.layers)
    kept = sum(r.rank * (r.d_in + r.d_out) for r in r_plain.layers) / target_layers

    aware = copy.deepcopy(dense)
    r_aware = lowrank_cli.factorize(aware, kappa=2, rank_multiple=8, calib=str(digits / "train"), calib_samples=96)
    budgeted = copy.deepcopy(dense)
    r_budget = lowrank_cli.factorize(budgeted, budget=kept, rank_multiple=8, calib=str(digits / "train"), calib_samples=96)

    assert r_aware.params_after == r_plain.params_after
    assert r_budget.params_after <= r_plain.params_after
    e_plain, e_aware, e_budget = (block_error(m, dense_outs, x) for m in (plain, aware, budgeted))
    assert e_aware < e_plain
    assert e_budget < e_plain
    # the budget chose different ranks per layer, and said how it truncated
    assert len({r.rank for r in r_budget.layers if r.name.endswith("fc1")}) > 1 or r_budget.dense
    assert all(r.method.startswith("whitened/") for r in r_aware.layers)
    prov = aware.lrc_info.provenance
    assert prov["svd"] == "data-aware" and prov["calibration"]["samples"] == 96
    assert budgeted.lrc_info.provenance["kappa"] is None and budgeted.lrc_info.provenance["budget"]["keep_fraction"] == kept


def test_budget_without_data_keeps_the_budget(digits):
    model = make_tiny_vit(seed=4)
    before = sum(p.numel() for p in model.parameters())
    result = lowrank_cli.factorize(model, budget=0.3, rank_multiple=8)
    target_layers = sum(p.d_in * p.d_out for p in result.plan.layers)
    lowrank = sum(r.rank * (r.d_in + r.d_out) for r in result.layers)
    dense_kept = sum(p.d_in * p.d_out for p in result.plan.layers if p.rank is None)
    assert lowrank + dense_kept <= 0.3 * target_layers
    assert all(r.rank % 8 == 0 for r in result.layers)
    assert result.params_after < before


def test_target_macs(digits):
    from lowrank_cli.evaluation.counting import count_macs

    model = make_tiny_vit(seed=5)
    dense_macs = count_macs(model, (3, 32, 32)).total
    lowrank_cli.factorize(model, target_macs=dense_macs // 2, rank_multiple=8)
    assert count_macs(model, (3, 32, 32)).total <= dense_macs // 2
    with pytest.raises(UsageError, match="unreachable"):
        lowrank_cli.factorize(make_tiny_vit(), target_macs=1000)


def test_saved_file_is_an_ordinary_checkpoint(digits, tmp_path, capsys):
    out = tmp_path / "aware.safetensors"
    model = make_tiny_vit(seed=6)
    folder = tmp_path / "vit"
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization=True)
    code, stdout, err = run_cli(["factorize", folder, "--budget", "0.5", "--calib", digits, "--calib-samples", "32",
                                 "-o", out, "--json"], capsys)
    assert code == 0, err
    loaded = lowrank_cli.load(out)
    info = lowrank_cli.read_info(out)[0]
    assert info.provenance["calibration"]["samples"] == 32
    assert all(layer["method"].startswith("whitened/") for layer in info.layers.values())
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("args,code,message", [
    (["--budget", "1.5"], 2, "--budget must be in (0, 1)"),
    (["--budget", "0"], 2, "--budget must be in (0, 1)"),
    (["--calib", "{tmp}/nowhere"], 3, "does not exist: point --calib at"),
    (["--calib", "{tmp}/empty"], 3, "has no images"),
    (["--target-macs", "1k"], 2, "is unreachable"),
    (["--target-macs", "lots"], 2, "lots"),
])
def test_errors(args, code, message, tiny_vit_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "x.safetensors"
    got, _, err = run_cli(["factorize", tiny_vit_folder, *[a.format(tmp=tmp_path) for a in args], "-o", out], capsys)
    assert got == code and len(error_lines(err)) == 1 and message in error_lines(err)[0], err
    assert not out.exists()
