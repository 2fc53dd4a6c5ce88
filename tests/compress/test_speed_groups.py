"""The speed plan times shared-input groups as `lowrank_cli.load` will run them (compress.speed_groups): a group
faster grouped than dense and than its members' own choices is factorized as a whole."""

from __future__ import annotations

import json

import pytest
import torch

import lowrank_cli
from lowrank_cli.compress.plan import make_plan
from lowrank_cli.compress.speed_groups import time_group
from lowrank_cli.compress.speed_plan import LayerShape, speed_plan

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bert(bert_folder):
    model = lowrank_cli.load_model(str(bert_folder)).model
    return model, make_plan(model, kappa=2, rank_multiple=8)


def test_a_group_faster_grouped_is_factorized_whole_though_each_member_alone_is_slower(bert):
    model, base = bert
    grouped_calls: list[tuple[LayerShape, ...]] = []

    def group_timer(shapes):
        grouped_calls.append(shapes)
        return 3.0, 2.0  # the three dense linears 3 ms, the group 2 ms

    plan, info = speed_plan(model, base, device="cpu", batch_size=4, tokens=16, timer=lambda s: (1.0, 1.5),
                            group_timer=group_timer)
    qkv = {n for n in base.ranks if n.endswith(("query", "key", "value"))}
    assert len(qkv) == 6 and set(plan.ranks) == qkv  # every other layer stays dense: slower alone
    assert len(grouped_calls) == 2 and all(len(g) == 3 and len({s.input_shape for s in g}) == 1 for g in grouped_calls)
    assert all(s.input_shape == (4, 16, s.d_in) for g in grouped_calls for s in g)
    doc = json.loads(json.dumps(info))
    assert [g["factorized"] for g in doc["groups"]] == [True, True] and doc["groups"][0]["gain"] == 1.5
    assert all(doc["layers"][n]["grouped"] and doc["layers"][n]["factorized"] for n in qkv)
    assert all("speed 1.5x grouped" in p.why for p in plan.layers if p.name in qkv)
    others = len(doc["layers"]) - len(qkv)
    # dense: every layer 1 ms; chosen: the others dense (1 ms each), each group 2 ms
    assert doc["estimated_gain"] == pytest.approx(len(doc["layers"]) / (others + 2 * 2.0))


def test_a_group_slower_grouped_keeps_the_per_layer_choices_and_no_group_times_none(bert):
    model, base = bert
    plan, info = speed_plan(model, base, device="cpu", batch_size=4, tokens=16, timer=lambda s: (2.0, 1.0),
                            group_timer=lambda shapes: (6.0, 4.0))  # grouped 4 ms > the members' 3 x 1 ms
    assert set(plan.ranks) == set(base.ranks) and not any(g["factorized"] for g in info["groups"])
    assert not any(layer["grouped"] for layer in info["layers"].values() if "grouped" in layer)
    called = []
    plan, info = speed_plan(model, base, device="cpu", batch_size=4, tokens=16, timer=lambda s: (2.0, 1.0),
                            group=False, group_timer=lambda shapes: called.append(shapes) or (1.0, 1.0))
    assert info["groups"] == [] and called == []


def test_time_group_runs_the_group_as_load_does():
    shapes = (LayerShape(32, 32, 8, (2, 5, 32), True), LayerShape(32, 16, 8, (2, 5, 32), True))
    dense_ms, grouped_ms = time_group(shapes, device=torch.device("cpu"), dtype=torch.float32, repeats=2, warmup=1)
    assert dense_ms > 0 and grouped_ms > 0


def test_the_report_gives_a_grouped_layer_its_groups_gain():
    from lowrank_cli.evaluation.report_layers import plan_speedup

    entry = {"dense_ms": 1.0, "lowrank_ms": 1.5, "gain": 0.6667, "factorized": True, "group_gain": 1.5, "grouped": True}
    assert plan_speedup(entry) == 1.5
    assert plan_speedup({**entry, "grouped": False, "factorized": False}) == 0.6667
