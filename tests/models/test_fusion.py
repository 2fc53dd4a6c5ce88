"""Fusion swapped into whole models at load time: per-layer kernels, GELUs folded into the layer before them, BERT's
query / key / value as one group, the same outputs and the same state dict, undone exactly; `fused=True` where the
kernel cannot run is one environment error (exit 6). The kernel itself runs here in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
from helpers import error_lines, make_tiny_vit, run_cli, write_lowrank_vit
from torch import nn

import lowrank_cli
from lowrank_cli.errors import EnvironmentProblem
from lowrank_cli.layers import fused_lowrank as fl
from lowrank_cli.layers.fused_lowrank import FusedLowRankLinear
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.fusion import fuse_lowrank, resolve_fused, unfuse_lowrank


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    pytest.importorskip("triton")
    from lowrank_cli.layers.kernels.lowrank_triton import interpreting

    if not interpreting():
        pytest.skip("Triton is not in its interpreter here")
    monkeypatch.setattr(fl, "KERNEL_DEVICES", {"cuda", "cpu"})


def lowrank_vit():
    model = make_tiny_vit()
    lowrank_cli.factorize(model, kappa=2, rank_multiple=8, check_calls=False)
    return model


def lowrank_bert(folder, **kwargs):
    from lowrank_cli.models.sources import load_model

    model = load_model(str(folder)).model
    lowrank_cli.factorize(model, check_calls=False, **kwargs)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_timm_vit_fuses_every_layer_and_each_mlp_gelu():
    model = lowrank_vit()
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model)
    with torch.no_grad():
        expected = model(x)
        summary = fuse_lowrank(model)
        got = model(x)
    assert (summary.layers, summary.activations, summary.groups, summary.traced) == (16, 4, 0, True)
    assert isinstance(model.blocks[0].mlp.act, nn.Identity) and model.blocks[0].mlp.fc1.activation == "gelu"
    assert torch.equal(got, expected)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert unfuse_lowrank(model) == 16
    assert isinstance(model.blocks[0].mlp.act, nn.GELU) and type(model.blocks[0].mlp.fc1) is LowRankLinear
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_bert_query_key_value_become_one_group(bert_folder):
    model = lowrank_bert(bert_folder, kappa=2)
    ids = torch.randint(5, 100, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        summary = fuse_lowrank(model)
        got = model(input_ids=ids).logits
    assert (summary.groups, summary.grouped_layers, summary.activations) == (2, 6, 2)
    attention = model.bert.encoder.layer[0].attention.self
    assert attention.query.group is attention.key.group is attention.value.group is not None
    assert isinstance(model.bert.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    assert torch.equal(got, expected)


def test_bert_fused_through_the_kernel_matches_the_two_linears(tmp_path, kernel_on_cpu, monkeypatch):
    """Horizontal fusion with the real kernel (interpreter, fp32): ranks on the kernel's multiple of 16."""
    from hf_fixtures import write_tiny_bert

    folder = write_tiny_bert(tmp_path / "bert", hidden=64, intermediate=128, tokenizer=False)
    model = lowrank_bert(folder, kappa=1.5, rank_multiple=16)
    ids = torch.randint(5, 100, (2, 13))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        launches = []
        real = fl.fused_lowrank_eager
        monkeypatch.setattr(fl, "fused_lowrank_eager", lambda *a: launches.append(len(a[1])) or real(*a))
        fuse_lowrank(model)
        got = model(input_ids=ids).logits
    assert launches == [3, 1, 1, 1] * 2  # per layer: q/k/v, attention output, intermediate + GELU, output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_fused_bert_compiles_in_one_graph_with_one_op_per_launch(bert_folder):
    """torch.compile through the fake implementation: no graph break, the q/k/v group one op (aot_eager: no
    compiler needed on the CPU)."""
    from torch._dynamo.backends.common import aot_autograd

    model = lowrank_bert(bert_folder, kappa=2)
    ids = torch.randint(5, 100, (2, 11))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fuse_lowrank(model)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend=backend, fullgraph=True)(input_ids=ids).logits
    ops = [n for n in graphs[0].graph.nodes if "fused_lowrank" in str(n.target)]
    assert len(graphs) == 1 and len(ops) == 2 * 4  # per layer: q/k/v, attention output, intermediate, output
    torch.testing.assert_close(got, expected)


def test_a_fused_model_saves_the_same_checkpoint(tmp_path):
    model = lowrank_vit()
    plain = lowrank_cli.save(model, tmp_path / "plain.safetensors")
    fuse_lowrank(model)
    fused = lowrank_cli.save(model, tmp_path / "fused.safetensors")
    from safetensors import safe_open

    with safe_open(plain, "pt") as a, safe_open(fused, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert a.metadata()["lrc.ranks"] == b.metadata()["lrc.ranks"]


def test_a_model_the_meta_twin_cannot_run_keeps_per_layer_fusion():
    class NeedsValues(nn.Module):  # .item() has no value on the meta device
        def __init__(self):
            super().__init__()
            self.a = LowRankLinear(8, 8, 2)
            self.b = LowRankLinear(8, 8, 2)

        def forward(self, x):
            return self.a(x) * float(x.sum().item() > 0) + self.b(x)

    model = NeedsValues()
    summary = fuse_lowrank(model, input_size=(8,))
    assert summary.layers == 2 and not summary.traced and summary.groups == 0
    assert isinstance(model.a, FusedLowRankLinear) and model.a.group is None


def test_load_fuses_only_where_the_kernel_runs(tmp_path):
    path = write_lowrank_vit(tmp_path / "lr.safetensors")
    model = lowrank_cli.load(path)  # the CPU: plain layers
    assert not any(isinstance(m, FusedLowRankLinear) for m in model.modules())
    assert resolve_fused(None, "cpu") is False and resolve_fused(False, "cpu") is False
    assert resolve_fused(None, "cuda", dtype=torch.bfloat16) is False  # off by default, CUDA or not


def test_fused_true_without_cuda_is_an_environment_problem(tmp_path, capsys):
    path = write_lowrank_vit(tmp_path / "lr.safetensors")
    with pytest.raises(EnvironmentProblem, match="^fused=True asks for the fused low-rank kernel") as info:
        lowrank_cli.load(path, fused=True)
    assert info.value.exit_code == 6 and "fused=False" in str(info.value)
    code, out, err = run_cli(["bench", path, "--device", "cpu", "--fused"], capsys)
    assert code == 6 and out == "" and len(error_lines(err)) == 1
    assert "--fused asks for the fused low-rank kernel" in err and "--no-fused" in err


def test_eval_with_fused_on_the_cpu_exits_6(tmp_path, capsys):
    from PIL import Image

    path = write_lowrank_vit(tmp_path / "lr.safetensors")
    (tmp_path / "val" / "0").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "val" / "0" / "a.png")
    code, out, err = run_cli(["eval", path, "--data", tmp_path, "--fused", "--device", "cpu"], capsys)
    assert code == 6 and len(error_lines(err)) == 1 and "--fused" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_load_fuses_and_agrees_with_the_two_linears(tmp_path):
    path = write_lowrank_vit(tmp_path / "lr.safetensors")
    fused = lowrank_cli.load(path, device="cuda", fused=True).to(torch.bfloat16)
    plain = lowrank_cli.load(path, device="cuda").to(torch.bfloat16)
    assert not any(isinstance(m, FusedLowRankLinear) for m in plain.modules())  # not by default: slower than cuBLAS
    assert any(isinstance(m, FusedLowRankLinear) for m in fused.modules())
    x = torch.randn(4, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), plain(x), rtol=3e-2, atol=3e-2)
