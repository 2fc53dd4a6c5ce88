"""Shared-input grouping (layers.grouped_lowrank, models.grouping): BERT's q/k/v and Llama's q/k/v and gate/up
run as one GEMM for their first factors, to fp32 tolerance of the ungrouped model, on real tiny models loaded by
`lowrank_cli.load`; a grouped model saved back is the ungrouped file; `group=True` without groups is a note."""

from __future__ import annotations

import logging

import pytest
import torch
from causal_fixtures import write_tiny_causal_lm
from safetensors import safe_open

import lowrank_cli
from lowrank_cli.errors import UsageError
from lowrank_cli.layers.grouped_lowrank import GroupedLowRankLinear
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.grouping import group_lowrank, is_grouped, ungroup_lowrank

pytestmark = pytest.mark.usefixtures("one_thread")
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bert_folder):
    root = tmp_path_factory.mktemp("grouping")
    llama = lowrank_cli.load_model(str(write_tiny_causal_lm(root / "llama", "llama"))).model
    lowrank_cli.factorize(llama, kappa=2, rank_multiple=4)
    bert = lowrank_cli.load_model(str(bert_folder)).model
    lowrank_cli.factorize(bert, kappa=2, rank_multiple=8, check_calls=False)
    files = {"llama": root / "llama.safetensors", "bert": root / "bert.safetensors"}
    lowrank_cli.save(llama, files["llama"])
    lowrank_cli.save(bert, files["bert"])
    return files


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def group_sizes(model: torch.nn.Module) -> list[int]:
    groups = {id(m.group): len(m.group.members) for m in model.modules() if isinstance(m, GroupedLowRankLinear)}
    return sorted(groups.values())


def count_packed_runs(model: torch.nn.Module) -> list[int]:
    """A list that each packed run of a group appends to."""
    calls: list[int] = []
    groups = {id(m.group): m.group for m in model.modules() if isinstance(m, GroupedLowRankLinear)}

    def counted(run):
        def wrapper(x):
            calls.append(1)
            return run(x)
        return wrapper

    for group in groups.values():
        group.run = counted(group.run)
    return calls


@pytest.mark.parametrize("name", ["bert", "llama"])
def test_grouped_model_computes_what_the_ungrouped_one_does(checkpoints, name):
    plain = lowrank_cli.load(checkpoints[name], group=False)
    grouped = lowrank_cli.load(checkpoints[name])  # on by default
    assert not is_grouped(plain) and is_grouped(grouped)
    # BERT: q/k/v in each of 2 layers; Llama: q/k/v (GQA: k and v are narrower) and gate/up in each of 2 layers
    assert group_sizes(grouped) == ([3, 3] if name == "bert" else [2, 2, 3, 3])
    expected = outputs(plain)
    torch.testing.assert_close(outputs(grouped), expected, rtol=1e-5, atol=1e-5)
    calls = count_packed_runs(grouped)
    outputs(grouped)
    assert len(calls) == len(group_sizes(grouped))  # one packed run per group, the siblings take their outputs


def test_the_packed_weights_are_the_members_weights_no_copy(checkpoints):
    model = lowrank_cli.load(checkpoints["bert"])
    member = next(m for m in model.modules() if isinstance(m, GroupedLowRankLinear))
    group = member.group
    assert group.batched and group.first_weight.untyped_storage().data_ptr() == \
        member.first.weight.untyped_storage().data_ptr()
    before = outputs(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # an in-place change of a member (load_state_dict) is seen by the group
        member.first.weight.mul_(2)
    assert not torch.allclose(outputs(model), before)
    model.load_state_dict(state)
    torch.testing.assert_close(outputs(model), before, rtol=0, atol=0)
    model.to(torch.float64)  # new storage for every parameter: the group repacks on its next call
    torch.testing.assert_close(outputs(model).float(), before, rtol=1e-5, atol=1e-5)
    assert group.first_weight.dtype == torch.float64 and group.packed()


def test_a_grouped_model_saved_back_is_the_ungrouped_file(checkpoints, tmp_path):
    grouped = lowrank_cli.load(checkpoints["llama"])
    plain = lowrank_cli.load(checkpoints["llama"], group=False)
    lowrank_cli.save(grouped, tmp_path / "grouped.safetensors")
    lowrank_cli.save(plain, tmp_path / "plain.safetensors")
    with safe_open(tmp_path / "grouped.safetensors", "pt") as a, safe_open(tmp_path / "plain.safetensors", "pt") as b:
        keys = sorted(a.keys())
        assert keys == sorted(b.keys()) and any(k.endswith("q_proj.first.weight") for k in keys)
        for key in keys:
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
        assert a.metadata() == b.metadata()
    again = lowrank_cli.load(tmp_path / "grouped.safetensors", group=False)
    assert not any(isinstance(m, GroupedLowRankLinear) for m in again.modules())
    torch.testing.assert_close(outputs(again), outputs(plain), rtol=0, atol=0)


def test_training_and_hooked_members_run_one_by_one(checkpoints):
    model = lowrank_cli.load(checkpoints["bert"])
    members = [m for m in model.modules() if isinstance(m, GroupedLowRankLinear)]
    calls = count_packed_runs(model)
    out = model(IDS).logits  # gradients wanted: plain layers, gradients reach every member
    out.sum().backward()
    assert not calls and all(m.first.weight.grad is not None for m in members)
    seen = []
    members[1].first.register_forward_hook(lambda *a: seen.append(1))
    with torch.no_grad():
        outputs(model)
    assert seen == [1]  # a hook on a child: that group runs its members as plain layers


def test_group_true_without_groups_is_a_note_and_ungroup_restores(checkpoints, tiny_vit_folder, caplog):
    vit = lowrank_cli.load_model(str(tiny_vit_folder)).model
    lowrank_cli.factorize(vit, kappa=2, rank_multiple=8, check_calls=False)
    notes = []
    from lowrank_cli.models.grouping import apply_group

    assert apply_group(vit, True, notes.append).groups == 0
    assert len(notes) == 1 and "runs ungrouped" in notes[0]
    with caplog.at_level(logging.WARNING, logger="lowrank_cli.grouping"):
        assert apply_group(vit, None).groups == 0  # the default says nothing
    assert not caplog.records
    bert = lowrank_cli.load(checkpoints["bert"])
    assert ungroup_lowrank(bert) == 6 and not is_grouped(bert)
    assert all(type(m) is LowRankLinear for n, m in bert.named_modules() if n.endswith(("query", "key", "value")))
    assert group_lowrank(bert).groups == 2


def test_runtime_graphs_on_the_cpu_is_a_usage_error_naming_the_device(checkpoints):
    with pytest.raises(UsageError, match="need a CUDA device"):
        lowrank_cli.load(checkpoints["bert"], runtime="graphs")
    with pytest.raises(UsageError, match="not one of eager, compile, graphs"):
        lowrank_cli.load(checkpoints["bert"], runtime="fast")


def test_the_batched_second_gemm_computes_what_one_gemm_each_does(checkpoints):
    """CUDA runs equal-shaped second factors as one batched GEMM: checked here on the CPU, against each layer."""
    model = lowrank_cli.load(checkpoints["bert"])
    group = next(m for m in model.modules() if isinstance(m, GroupedLowRankLinear)).group
    x = torch.randn(2, 7, group.members[0].in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = torch.nn.functional.linear(x, group.first_weight)
        expected = [m.second(m.first(x)) for m in group.members]
        for got in (group.seconds_batched(h), group.seconds_each(h)):
            for a, b in zip(got, expected):
                assert a.shape == b.shape
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_on_cuda_matches_ungrouped(checkpoints, dtype):
    ids = IDS.cuda()
    for name in ("bert", "llama"):
        plain = lowrank_cli.load(checkpoints[name], "cuda", group=False).to(dtype)
        grouped = lowrank_cli.load(checkpoints[name], "cuda").to(dtype)  # .to(): the groups repack on the GPU
        with torch.no_grad():
            a, b = (m(ids)[0].float() for m in (plain, grouped))
        tol = 1e-4 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(b, a, rtol=tol, atol=tol * a.abs().max().item())


def test_grouped_models_trace_without_graph_breaks_and_compile_to_the_same_numbers(checkpoints):
    """torch.compile sees the whole grouped forward as one graph (the identity caching is traced, not broken on)."""
    import torch._dynamo

    for name in ("bert", "llama"):
        explained = torch._dynamo.explain(lowrank_cli.load(checkpoints[name]))(IDS)
        assert explained.graph_break_count == 0, explained.break_reasons
    compiled = lowrank_cli.load(checkpoints["bert"], runtime="compile")
    assert type(compiled).__name__ == "OptimizedModule"
    torch.testing.assert_close(outputs(compiled), outputs(lowrank_cli.load(checkpoints["bert"], group=False)),
                               rtol=1e-5, atol=1e-5)
