"""The fused low-rank op and layer: the reference path wherever the kernel does not apply (one debug line, never an
exception), the kernel through the op where it does (here: Triton's interpreter on CPU tensors), torch.compile
through the fake implementation, the state dict untouched, autograd and fvcore on the two linears. The GPU grid
and CUDA graphs at the end carry the `gpu` marker."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from lowrank_cli.layers import fused_lowrank as fl
from lowrank_cli.layers.fused_lowrank import FusedLowRankLinear, LowRankGroup, reference, run_fused, unsupported
from lowrank_cli.layers.lowrank_linear import LowRankLinear

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def lowrank(d_in=32, d_out=48, rank=16, bias=True, seed=0, dtype=torch.float32, device="cpu") -> LowRankLinear:
    torch.manual_seed(seed)
    return LowRankLinear(d_in, d_out, rank, bias=bias).to(device=device, dtype=dtype).eval()


@pytest.fixture
def kernel_on_cpu(monkeypatch):
    """The op sends CPU tensors to the Triton kernel (its interpreter) instead of the reference."""
    pytest.importorskip("triton")
    from lowrank_cli.layers.kernels.lowrank_triton import interpreting

    if not interpreting():
        pytest.skip("Triton is not in its interpreter here")
    monkeypatch.setattr(fl, "KERNEL_DEVICES", {"cuda", "cpu"})


def test_on_the_cpu_the_layer_is_the_two_linears_with_one_debug_line(caplog):
    layer = lowrank()
    fused = FusedLowRankLinear(layer)
    x = torch.randn(3, 5, 32)
    fl.log_fallback.cache_clear()
    with caplog.at_level(logging.DEBUG, logger="lowrank_cli.fused"), torch.no_grad():
        for _ in range(3):
            assert torch.equal(fused(x), layer(x))
    lines = [r.getMessage() for r in caplog.records if r.name == "lowrank_cli.fused"]
    assert lines == ["fused low-rank kernel not used (cpu tensors): running the two linears"]


def test_the_state_dict_and_the_children_are_the_layers_own():
    layer = lowrank()
    fused = FusedLowRankLinear(layer, activation="gelu")
    assert fused.first is layer.first and fused.second is layer.second and isinstance(fused, LowRankLinear)
    assert list(fused.state_dict()) == list(layer.state_dict()) == ["first.weight", "second.weight", "second.bias"]
    assert "fused+gelu" in repr(fused)


@pytest.mark.parametrize("case,why", [
    (dict(rank=24), "rank 24"),
    (dict(activation="relu"), "activation 'relu'"),
    (dict(groups=4), "4 layers in one group"),
    (dict(dtype=torch.float64), "dtype torch.float64"),
    (dict(mixed=True), "mixed devices or dtypes"),
    (dict(x_width=31), "an input that does not fit the layer"),
    (dict(bias="mixed"), "a group mixing layers with and without bias"),
])
def test_what_the_kernel_does_not_take_is_named(monkeypatch, case, why):
    monkeypatch.setattr(fl, "KERNEL_DEVICES", {"cuda", "cpu"})
    dtype = case.get("dtype", torch.float32)
    layers = [lowrank(rank=case.get("rank", 16), dtype=dtype, seed=i) for i in range(case.get("groups", 1))]
    if case.get("bias") == "mixed":
        layers = [lowrank(seed=0), lowrank(bias=False, seed=1)]
    x = torch.randn(4, case.get("x_width", 32), dtype=dtype)
    first = [m.first.weight for m in layers]
    if case.get("mixed"):
        first = [w.double() for w in first]
    assert unsupported(x, first, [m.second.weight for m in layers], [m.second.bias for m in layers],
                       case.get("activation", "none")).startswith(why)


def test_cpu_tensors_are_not_the_kernels_by_default():
    layer = lowrank()
    assert unsupported(torch.randn(2, 32), [layer.first.weight], [layer.second.weight], [layer.second.bias],
                       "none") == "cpu tensors"


def test_a_shape_the_kernel_does_not_take_falls_back_without_an_exception(kernel_on_cpu):
    layer = lowrank(rank=24)  # not a multiple of 16
    with torch.no_grad():
        x = torch.randn(7, 32)
        assert torch.equal(FusedLowRankLinear(layer)(x), layer(x))


@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_the_kernel_through_the_op_matches_the_layer(kernel_on_cpu, activation):
    layer = lowrank(d_in=40, d_out=33, rank=32)
    x = torch.randn(2, 9, 40)
    with torch.no_grad():
        expected = layer(x)
        expected = F.gelu(expected) if activation == "gelu" else expected
        got = FusedLowRankLinear(layer, activation=activation)(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_group_runs_once_and_hands_out_each_output(kernel_on_cpu, monkeypatch):
    layers = [lowrank(seed=i) for i in range(3)]
    fused = [FusedLowRankLinear(m) for m in layers]
    group = LowRankGroup(fused)
    launches = []
    real = fl.fused_lowrank_eager
    monkeypatch.setattr(fl, "fused_lowrank_eager", lambda *a: launches.append(len(a[1])) or real(*a))
    x, other = torch.randn(6, 32), torch.randn(6, 32)
    with torch.no_grad():
        outs = [m(x) for m in fused]
        assert launches == [3] and group.pending is None
        for got, layer in zip(outs, layers):
            torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-5)
        # Another input (cross-attention) gets its own run; the layers' outputs for x are never mixed in.
        q = fused[0](x)
        k = fused[1](other)
        torch.testing.assert_close(q, layers[0](x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(k, layers[1](other), rtol=1e-4, atol=1e-5)
    group.dissolve()
    assert all(m.group is None for m in fused) and group.pending is None


def test_a_kernel_that_fails_here_falls_back_once_with_a_warning(kernel_on_cpu, monkeypatch, caplog):
    from lowrank_cli.layers.kernels import lowrank_triton

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(lowrank_triton, "fused_lowrank", broken)
    monkeypatch.setattr(fl, "KERNEL_FAILURES", {})
    layer = lowrank()
    x = torch.randn(5, 32)
    with caplog.at_level(logging.WARNING, logger="lowrank_cli.fused"), torch.no_grad():
        for _ in range(2):
            assert torch.equal(FusedLowRankLinear(layer)(x), layer(x))
    assert len(caplog.records) == 1 and "running the two linears instead" in caplog.records[0].getMessage()
    assert list(fl.KERNEL_FAILURES.values()) == ["the kernel failed (RuntimeError: out of resource: shared memory)"]


def test_a_wrapped_or_hooked_child_runs_as_itself(kernel_on_cpu):
    class Scaled(torch.nn.Linear):  # an adapter in place of `first` (as peft's LoRA wraps a linear)
        def forward(self, x):
            return 2 * super().forward(x)

    layer = lowrank()
    x = torch.randn(3, 32)
    with torch.no_grad():
        plain = FusedLowRankLinear(layer)(x)
        seen = []
        handle = layer.second.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        torch.testing.assert_close(FusedLowRankLinear(layer)(x), plain, rtol=1e-4, atol=1e-5)
        assert seen == [torch.Size([3, 48])]  # the hook fired: the children ran
        handle.remove()
        wrapped = Scaled(32, 16, bias=False)
        wrapped.weight = layer.first.weight
        layer.first = wrapped
        fused = FusedLowRankLinear(layer)
        assert not fused.plain()
        torch.testing.assert_close(fused(x), layer(x))
        torch.testing.assert_close(fused(x), 2 * plain - layer.second.bias, rtol=1e-4, atol=1e-5)


def test_training_and_tracing_run_the_two_linears():
    layer = lowrank()
    fused = FusedLowRankLinear(layer)
    x = torch.randn(4, 32, requires_grad=True)
    fused(x).sum().backward()
    assert layer.first.weight.grad is not None and x.grad is not None
    from lowrank_cli.evaluation.counting import count_macs

    with torch.no_grad():  # fvcore traces with torch.jit: it sees (and counts) the two linears
        assert count_macs(fused, torch.randn(4, 32)).total == count_macs(layer, torch.randn(4, 32)).total == 4 * 16 * 80


def test_the_op_compiles_through_its_fake_implementation():
    """aot_eager traces the op with fake tensors (the fake implementation) and keeps it in the graph."""
    layers = [lowrank(seed=i) for i in range(3)]
    x = torch.randn(5, 32)
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: g)(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: run_fused(t, layers), backend=backend, fullgraph=True)
    with torch.no_grad():
        got = compiled(x)
    assert torch.equal(got, reference(x, [m.first.weight for m in layers], [m.second.weight for m in layers],
                                      [m.second.bias for m in layers]))
    assert any("fused_lowrank" in str(g.graph) for g in graphs)


def test_opcheck_the_op():
    layer = lowrank()
    args = (torch.randn(3, 32), [layer.first.weight.detach()], [layer.second.weight.detach()],
            [layer.second.bias.detach()], "gelu")
    torch.library.opcheck(torch.ops.lrc.fused_lowrank.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="activation"):
        FusedLowRankLinear(lowrank(), activation="relu")
    with pytest.raises(ValueError, match="2 to 3"):
        LowRankGroup([FusedLowRankLinear(lowrank())])


# ------------------------------------------------------------------------------------------------ GPU

GPU_GRID = [  # (tokens, d_in, d_out, rank, groups, activation, dtype): DeiT-B / BERT-base shapes, ragged token counts
    (1, 768, 768, 192, 3, "none", torch.bfloat16), (197, 768, 2304, 256, 1, "none", torch.bfloat16),
    (197, 768, 3072, 256, 1, "gelu", torch.bfloat16), (4001, 3072, 768, 256, 1, "none", torch.bfloat16),
    (128, 768, 768, 192, 3, "none", torch.float16), (8192, 768, 768, 192, 1, "none", torch.bfloat16),
    (77, 768, 3072, 304, 1, "gelu", torch.bfloat16), (33, 96, 64, 48, 2, "none", torch.float16),
]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens,d_in,d_out,rank,groups,activation,dtype", GPU_GRID)
def test_gpu_kernel_matches_the_two_linears(tokens, d_in, d_out, rank, groups, activation, dtype):
    layers = [lowrank(d_in, d_out, rank, seed=i, dtype=dtype, device="cuda") for i in range(groups)]
    x = torch.randn(tokens, d_in, device="cuda", dtype=dtype)
    first, second, bias = ([m.first.weight for m in layers], [m.second.weight for m in layers],
                           [m.second.bias for m in layers])
    assert unsupported(x, first, second, bias, activation) is None
    with torch.no_grad():
        got = run_fused(x, layers, activation)
        expected = reference(x, first, second, bias, activation)
    scale = expected.float().abs().max()
    assert (got.float() - expected.float()).abs().max() <= (2e-2 if dtype == torch.bfloat16 else 4e-3) * scale
    assert fl.KERNEL_FAILURES == {}  # the kernel ran: it did not fall back to the reference


@needs_cuda
@pytest.mark.gpu
def test_gpu_op_under_compile_and_cuda_graphs():
    layers = [lowrank(768, 768, 192, seed=i, dtype=torch.bfloat16, device="cuda") for i in range(3)]
    fused = [FusedLowRankLinear(m) for m in layers]
    LowRankGroup(fused)
    x = torch.randn(2, 128, 768, device="cuda", dtype=torch.bfloat16)

    def qkv(t):
        return torch.cat([m(t) for m in fused], dim=-1)

    with torch.no_grad():
        expected = qkv(x)
        torch._dynamo.reset()
        for mode in ("default", "reduce-overhead"):
            compiled = torch.compile(qkv, mode=mode, fullgraph=True)
            for _ in range(3):
                got = compiled(x)
            torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
        from lowrank_cli.timing import cuda_graphed

        graphed = cuda_graphed(qkv, x)
        torch.testing.assert_close(graphed(x), expected, rtol=2e-2, atol=2e-2)
    assert fl.KERNEL_FAILURES == {}
