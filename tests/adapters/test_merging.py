"""Combining per-task updates: each rule computes what it promises on real adapters of a tiny timm ViT. `concat` is
exactly both peft LoRA adapters active at once; `svd` is the best rank-r approximation of that sum."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_vit

from lowrank_cli.adapters.base import AdapterConfig
from lowrank_cli.training.merging import MERGE_RULES, apply_deltas, best_rank, merge_deltas, merge_summary, task_deltas
from lowrank_cli.adapters.methods import method_for
from lowrank_cli.adapters.targets import adapter_targets
from lowrank_cli.errors import InputError, TrainingError, UsageError

QKV = r"blocks\.\d+\.attn\.qkv"
ALPHA, RANK = 4.0, 2


def _lora_task(base, patterns, seed):
    """`base` fine-tuned with a rank-2 peft LoRA on `patterns` (random B and A stand in for training), merged.
    Returns the merged model and the adapter's tensors."""
    model = copy.deepcopy(base)
    method = method_for(AdapterConfig("lora", rank=RANK, alpha=ALPHA,
                                      targets=tuple(adapter_targets(model, patterns, head=["head"]))))
    method.apply(model)
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, p in method.adapter_parameters(model):
            p.copy_(0.3 * torch.randn_like(p))
    adapters = {n: t.clone() for n, t in method.adapter_tensors(model).items()}
    method.merge(model)
    return model, adapters


@pytest.fixture(scope="module")
def tasks():
    """A base and two LoRA tasks on different targets: `a` on every block linear, `b` on the qkv linears only."""
    base = make_tiny_vit(depth=2)
    a, a_adapters = _lora_task(base, None, 1)
    b, b_adapters = _lora_task(base, [QKV], 2)
    deltas = {"a": task_deltas(base, a, exclude=["head"]), "b": task_deltas(base, b, exclude=["head"])}
    return base, deltas, {"a": a_adapters, "b": b_adapters}


def _both_adapters_at_once(base, adapters):
    """`base` with both tasks' LoRA adapters injected by peft under their own names and active together."""
    import peft
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(base)
    for task, patterns in (("a", None), ("b", [QKV])):
        pattern = "|".join(adapter_targets(base, patterns, head=["head"])).replace(".", r"\.")
        peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=pattern), model,
                                     adapter_name=task)
        renamed = {n.replace(".default.", f".{task}."): t for n, t in adapters[task].items()}
        assert not model.load_state_dict(renamed, strict=False).unexpected_keys
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(["a", "b"])
    return model.eval()


def test_task_deltas_are_what_changed_outside_the_head():
    base = make_tiny_vit(depth=1)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.blocks[0].attn.qkv.weight.add_(0.25)
        tuned.blocks[0].norm1.bias.sub_(1.0)
        tuned.head.weight.add_(1.0)
    deltas = task_deltas(base, tuned, exclude=["head"])
    assert sorted(deltas) == ["blocks.0.attn.qkv.weight", "blocks.0.norm1.bias"]
    assert torch.allclose(deltas["blocks.0.attn.qkv.weight"], torch.full((576, 192), 0.25), atol=1e-6)
    assert torch.equal(deltas["blocks.0.norm1.bias"], torch.full((192,), -1.0))
    assert all(d.dtype == torch.float32 and d.device.type == "cpu" for d in deltas.values())
    assert "head.weight" in task_deltas(base, tuned)


def test_task_deltas_refuse_unmerged_adapters_and_another_dtype():
    base = make_tiny_vit(depth=1)
    unmerged = copy.deepcopy(base)
    method_for(AdapterConfig("lora", rank=2, alpha=2.0, targets=("blocks.0.attn.qkv",))).apply(unmerged)
    with pytest.raises(InputError, match=r"merge its adapters first"):
        task_deltas(base, unmerged)
    with pytest.raises(InputError, match=r"'cls_token' is torch.bfloat16 \(1, 1, 192\) in the fine-tuned model and torch.float32 .*same dtype"):
        task_deltas(base, copy.deepcopy(base).to(torch.bfloat16))


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the second adapter, on purpose
def test_concat_is_both_lora_adapters_active_at_once(tasks):
    base, deltas, adapters = tasks
    merged = merge_deltas(deltas, "concat")
    assert set(merged) == set(deltas["a"]) and set(deltas["b"]) < set(deltas["a"])  # b's targets are a's subset
    backbone = copy.deepcopy(base)
    apply_deltas(backbone, merged)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        both, out, plain = _both_adapters_at_once(base, adapters)(x), backbone(x), base(x)
    assert (out - plain).abs().max() > 0.1, "the adapters change the outputs"
    assert (out - both).abs().max() <= 1e-5
    # and by hand, on a layer both tasks adapted: W + s (B_a A_a + B_b A_b), s = alpha / r
    key = "blocks.1.attn.qkv.lora_{}.default.weight"
    by_hand = sum(ALPHA / RANK * adapters[t][key.format("B")] @ adapters[t][key.format("A")] for t in "ab")
    assert torch.allclose(merged["blocks.1.attn.qkv.weight"], by_hand, atol=1e-6, rtol=0)


def test_average_weighted_and_concat_weights(tasks):
    _, deltas, _ = tasks
    both, only_a = "blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight"
    da, db = deltas["a"], deltas["b"]
    average = merge_deltas(deltas, "average")
    assert torch.allclose(average[both], (da[both] + db[both]) / 2, atol=1e-7)
    assert torch.allclose(average[only_a], da[only_a] / 2, atol=1e-7), "a task without the update counts as zero"
    weighted = merge_deltas(deltas, "weighted", weights={"a": 1.0, "b": 3.0})
    assert torch.allclose(weighted[both], (da[both] + 3 * db[both]) / 4, atol=1e-7)
    assert torch.allclose(weighted[only_a], da[only_a] / 4, atol=1e-7)
    concat = merge_deltas(deltas, "concat", weights={"a": 2.0, "b": 0.5})
    assert torch.allclose(concat[both], 2 * da[both] + 0.5 * db[both], atol=1e-6)


def test_svd_is_the_best_rank_r_approximation_of_the_sum(tasks):
    _, deltas, _ = tasks
    concat = merge_deltas(deltas, "concat")
    merged = merge_deltas(deltas, "svd", rank=3)
    for name, total in concat.items():
        u, s, vh = torch.linalg.svd(total.double(), full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        assert int(torch.linalg.matrix_rank(merged[name])) <= 3
        assert (merged[name].double() - best).abs().max() <= 1e-5 * s[0], name
    qkv = "blocks.0.attn.qkv.weight"  # both tasks: the sum has rank 4 > 3, so the cut loses something
    assert int(torch.linalg.matrix_rank(concat[qkv])) == 2 * RANK
    assert (merged[qkv] - concat[qkv]).abs().max() > 1e-3
    # a rank that holds every adapter's directions (2 + 2) loses nothing, up to float32 SVD rounding
    for name, total in merge_deltas(deltas, "svd", rank=2 * RANK).items():
        largest = torch.linalg.matrix_norm(concat[name], ord=2)
        assert (total - concat[name]).abs().max() <= 1e-5 * largest, name


def test_svd_keeps_the_exact_sum_where_the_cut_would_not_be_smaller():
    update = torch.randn(192, 3, 8, 8)  # a patch-embedding conv: a 192 x 192 matrix
    assert int(torch.linalg.matrix_rank(best_rank(update, 5).reshape(192, -1))) == 5
    assert torch.equal(best_rank(update, 192), update)
    bias, position = torch.randn(192), torch.randn(1, 17, 192)  # a bias; timm's pos_embed, a 1 x 3264 matrix
    thin = torch.randn(4, 192)
    assert torch.equal(best_rank(thin, 4), thin)
    merged = merge_deltas({"a": {"bias": bias, "pos_embed": position}, "b": {"bias": bias}}, "svd", rank=1)
    assert torch.equal(merged["bias"], 2 * bias) and torch.equal(merged["pos_embed"], position)


@pytest.mark.parametrize(("rule", "weights", "rank", "message"), [
    ("mean", None, None, r"merge_rule 'mean' is not one of average, weighted, concat, svd"),
    ("average", {"a": 1.0, "b": 1.0}, None, r"task_weights are for merge_rule weighted, concat or svd"),
    ("weighted", None, None, r"merge_rule weighted needs task_weights"),
    ("weighted", {"a": 1.0}, None, r"name the tasks a and the updates are of a, b: give one weight per task"),
    ("concat", {"a": 1.0, "b": 0.0}, None, r"finite numbers > 0, got 0.0 for task 'b'"),
    ("weighted", {"a": float("nan"), "b": 1.0}, None, r"got nan for task 'a'"),
    ("svd", None, None, r"give a merge_rank of at least 1"),
    ("svd", None, 0, r"got 0: give a merge_rank"),
    ("concat", None, 4, r"merge_rank is for merge_rule svd"),
])
def test_merge_settings_are_checked(rule, weights, rank, message):
    deltas = {"a": {"w": torch.ones(2, 2)}, "b": {"w": torch.ones(2, 2)}}
    with pytest.raises(UsageError, match=message):
        merge_deltas(deltas, rule, weights=weights, rank=rank)


def test_updates_of_different_shapes_are_refused():
    with pytest.raises(InputError, match=r"updates of 'w' have different shapes"):
        merge_deltas({"a": {"w": torch.ones(2, 2)}, "b": {"w": torch.ones(3, 2)}}, "average")
    assert MERGE_RULES == ("average", "weighted", "concat", "svd")


def test_apply_deltas_in_the_parameters_dtype_and_all_or_nothing():
    model = make_tiny_vit(depth=1).to(torch.bfloat16)
    weight = model.blocks[0].attn.proj.weight
    before = weight.detach().clone()
    delta = 1e-3 * torch.randn(192, 192)
    apply_deltas(model, {"blocks.0.attn.proj.weight": delta})
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, (before.float() + delta).bfloat16())  # summed in float32, rounded once
    changed = weight.detach().clone()
    with pytest.raises(InputError, match=r"'blocks.0.nothing.weight' \(2,\) does not fit the model"):
        apply_deltas(model, {"blocks.0.attn.proj.weight": delta, "blocks.0.nothing.weight": torch.ones(2)})
    with pytest.raises(TrainingError, match=r"not finite"):
        apply_deltas(model, {"blocks.0.attn.proj.weight": delta, "blocks.0.norm1.bias": torch.full((192,), torch.nan)})
    assert torch.equal(weight, changed), "a refused update changes nothing"


def test_merge_summary(tasks):
    _, deltas, _ = tasks
    d = deltas["a"]
    same = merge_summary({"x": d, "y": d}, merge_deltas({"x": d, "y": d}, "concat"))
    assert same["interference"] == pytest.approx(2.0) and same["cosines"]["x,y"] == pytest.approx(1.0)
    opposite = {"x": d, "y": {n: -t for n, t in d.items()}}
    assert merge_summary(opposite, merge_deltas(opposite, "average"))["interference"] == pytest.approx(0.0, abs=1e-9)
    summary = merge_summary(deltas, merge_deltas(deltas, "svd", rank=1))
    assert summary["largest"] == {"name": "blocks.0.mlp.fc1.weight", "shape": [768, 192], "rank": 1}
    assert summary["tasks"] == ["a", "b"] and summary["parameters"] == len(deltas["a"])
    assert merge_summary(deltas, merge_deltas(deltas, "concat"))["largest"]["rank"] == RANK  # fc1 is a's alone
    # independent random adapters barely overlap
    assert abs(summary["cosines"]["a,b"]) < 0.2 and summary["interference"] == pytest.approx(1.0, abs=0.2)
