"""Model families (models.families): a third family plugs in by one class and one `register` line, and lrc
factorizes, reports and loads its models with no other file touched; the built-in families answer for their
models, legacy files find theirs from their library, and BERT's query / key / value are one input group."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_tiny_vit, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lowrank_cli
from lowrank_cli.compress.plan import pela_rank
from lowrank_cli.errors import InputError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models import families
from lowrank_cli.models.families import TEXT, Family, InputSpec, family_of, family_of_spec, input_spec
from lowrank_cli.models.spec import ModelSpec

DATA = Path(__file__).resolve().parents[1] / "data"
TOY_ARGS = {"vocab": 40, "dim": 64, "hidden": 128, "depth": 2, "positions": 16, "classes": 3}

# ------------------------------------------------------------------------------------- the toy family: one class


class ToyBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class ToyNet(nn.Module):
    """A pure-torch token model with its own config format: {"toy_net": {vocab, dim, hidden, depth, ...}}."""

    def __init__(self, vocab: int, dim: int, hidden: int, depth: int, positions: int, classes: int):
        super().__init__()
        self.args = {"vocab": vocab, "dim": dim, "hidden": hidden, "depth": depth, "positions": positions,
                     "classes": classes}
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(positions, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, hidden) for _ in range(depth))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(1))


class ToyFamily(Family):
    name, library, config_hint = "toy", "toy", "a toy config (toy_net)"

    def claims_config(self, cfg: dict[str, Any]) -> bool:
        return "toy_net" in cfg

    def claims_model(self, model: nn.Module) -> bool:
        return isinstance(model, ToyNet)

    def load_folder(self, folder: Path, *, what: str, arch: str | None, model_args: dict[str, Any]) -> Any:
        from lowrank_cli.models.families.base import read_config_json
        from lowrank_cli.models.loaded import LoadedModel
        from lowrank_cli.models.weights import fill

        spec = ModelSpec("ToyNet", {**read_config_json(folder)["toy_net"], **model_args}, library="toy",
                         family=self.name)
        model = fill(self.build_empty(spec), load_file(str(folder / "toy.safetensors")), what)
        return LoadedModel(model, spec, {"kind": "local-dir", "id": str(folder.resolve())})

    def construct(self, spec: ModelSpec) -> nn.Module:
        return ToyNet(**spec.model_args).eval()

    def spec_of(self, model: nn.Module) -> ModelSpec:
        return ModelSpec("ToyNet", dict(model.args), library="toy", family=self.name)

    def input_spec(self, model: nn.Module) -> InputSpec:
        self.asked.append(model)
        return InputSpec(TEXT, (model.args["positions"],), model.args["positions"], model.args["vocab"])


@pytest.fixture
def toy():
    family = families.register(ToyFamily())  # the one registry line a new family needs
    family.asked = []
    yield family
    families.unregister(family)


def write_toy_folder(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = ToyNet(**TOY_ARGS)
    for p in model.parameters():  # weights that are not all alike, so that a wrong layer would show
        nn.init.normal_(p, std=0.2)
    (folder / "config.json").write_text(json.dumps({"toy_net": TOY_ARGS}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "toy.safetensors"))
    return folder


# ------------------------------------------------------------------------------------- the toy family, end to end


def test_a_toy_family_factorizes_reports_and_loads(toy, tmp_path, capsys):
    folder = write_toy_folder(tmp_path / "toy")
    out = tmp_path / "x.safetensors"
    code, _, err = run_cli(["factorize", folder, "--kappa", "2", "-o", out], capsys)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    rank = pela_rank(64, 128, 2.0, 8)
    assert rank == 16 and pela_rank(64, 128, 2.0, 16) == 16  # the same whatever rank multiple `auto` picks here
    assert (meta["lrc.family"], meta["lrc.library"], meta["lrc.architecture"]) == ("toy", "toy", "ToyNet")
    assert json.loads(meta["lrc.ranks"]) == {f"blocks.{i}.fc{j}": rank for i in range(2) for j in (1, 2)}

    code, stdout, err = run_cli(["report", out, "--json"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    lowrank = 2 * 2 * rank * (64 + 128) + 2 * (128 + 64)  # 4 factored layers, their biases in the second factor
    other = 40 * 64 + 16 * 64 + 2 * 2 * 64  # embedding, positions, the blocks' norms
    head = 64 * 3 + 3
    assert doc["model"]["library"] == "toy" and doc["model"]["input_size"] == [16]
    assert doc["params"] == {"total": lowrank + other + head, "lowrank": lowrank, "dense_linear": head,
                             "other": other, "counted_from": "model"}
    dense = sum(p.numel() for p in ToyNet(**TOY_ARGS).parameters())  # each low-rank layer put back
    assert doc["dense_reference"]["params"] == dense
    assert doc["compression"]["params"] == pytest.approx(dense / (lowrank + other + head))
    # 16 tokens through each factored layer's two factors, the head once per sequence
    assert doc["macs"]["by_operator"]["linear"] == 4 * 16 * rank * (64 + 128) + 64 * 3

    loaded = lowrank_cli.load(out)
    in_memory = lowrank_cli.load_model(str(folder)).model
    lowrank_cli.factorize(in_memory, kappa=2)
    ids = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids), in_memory(ids))
    assert isinstance(loaded.blocks[1].fc2, LowRankLinear) and loaded.blocks[1].fc2.rank == rank
    assert family_of(loaded) is toy and input_spec(loaded).size == (16,)


def test_the_input_spec_is_worked_out_once_per_model(toy, tmp_path):
    loaded = lowrank_cli.load_model(str(write_toy_folder(tmp_path / "toy")))
    from lowrank_cli.evaluation.report import report_model

    lowrank_cli.factorize(loaded.model, kappa=2)  # the call check, counting, the record
    report_model(loaded.model)  # the input size, the MAC count
    assert toy.asked == [loaded.model]


def test_a_file_of_an_unregistered_family_says_upgrade(toy, tmp_path, capsys):
    folder = write_toy_folder(tmp_path / "toy")
    out = tmp_path / "x.safetensors"
    assert run_cli(["factorize", folder, "--kappa", "2", "-o", out], capsys)[0] == 0
    families.unregister(toy)
    try:
        with pytest.raises(InputError, match="model family 'toy' is not supported by this version of lrc: upgrade"):
            lowrank_cli.load(out)
    finally:
        families.register(toy)


# ------------------------------------------------------------------------------------- the built-in families


def test_each_model_and_spec_finds_its_family(bert_folder):
    vit = make_tiny_vit()
    bert = lowrank_cli.load_model(str(bert_folder))
    assert family_of(vit).name == "timm_vision" and family_of(bert.model).name == "hf_encoder"
    assert bert.spec.family == "hf_encoder" and family_of(nn.Sequential(nn.Linear(2, 2))).name == "timm_vision"
    assert input_spec(vit) == InputSpec("image", (3, 32, 32))
    assert input_spec(bert.model) == InputSpec("text", (64,), 64, bert.model.config.vocab_size)
    # files written before lrc.family: the library and the spec decide
    assert family_of_spec(ModelSpec("vit_tiny_patch16_224")).name == "timm_vision"
    assert family_of_spec(ModelSpec("BertModel", library="transformers")).name == "hf_encoder"
    with pytest.raises(InputError, match="library 'jax' is not supported by this version of lrc: upgrade lrc"):
        family_of_spec(ModelSpec("x", library="jax"))


@pytest.mark.parametrize("name", ["legacy_vit", "legacy_bert", "legacy_multitask"])
def test_legacy_files_name_no_family_and_get_their_librarys(name):
    from lowrank_cli.checkpoint.format import read_info

    info, _ = read_info(DATA / f"{name}.safetensors")
    assert info.spec.family is None
    expected = "hf_encoder" if name == "legacy_bert" else "timm_vision"
    assert family_of_spec(info.spec).name == expected
    assert family_of(lowrank_cli.load(DATA / f"{name}.safetensors")).name == expected


def test_bert_query_key_value_read_one_input_and_timm_fuses_them_already(bert_folder):
    from lowrank_cli.models.fusion import fuse_lowrank

    bert = lowrank_cli.load_model(str(bert_folder)).model
    groups = family_of(bert).shared_input_groups(bert)
    prefix = "bert.encoder.layer.{}.attention.self.{}"
    assert groups == [[prefix.format(i, n) for n in ("query", "key", "value")] for i in range(2)]
    assert family_of(make_tiny_vit()).shared_input_groups(make_tiny_vit()) == []
    # the groups the fusion finds by tracing which layers read the very same tensor are these
    lowrank_cli.factorize(bert, kappa=2, rank_multiple=8, check_calls=False)
    assert family_of(bert).shared_input_groups(bert) == groups  # low-rank layers are found as well
    summary = fuse_lowrank(bert)
    assert (summary.groups, summary.grouped_layers) == (len(groups), 3 * len(groups))


def test_the_registry_lists_libraries_and_refuses_a_name_twice(toy):
    assert families.libraries() == ("toy", "timm", "transformers")
    with pytest.raises(ValueError, match="'toy' is registered already"):
        families.register(ToyFamily())


def test_swin_factorizes_its_blocks_and_keeps_the_patch_merging_dense():
    """README: everything outside the blocks stays dense. Swin's stages (`layers.N`) repeat and so hold
    `downsample.reduction`, but that patch merging is a stage transition, not a transformer block."""
    import timm

    import lowrank_cli

    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=24, depths=(2, 2),
                              num_heads=(2, 2), img_size=64, window_size=4, num_classes=10)
    lowrank_cli.factorize(model, kappa=2, rank_multiple=1)
    low = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert type(model.get_submodule("layers.1.downsample.reduction")) is torch.nn.Linear
    assert {f"layers.{s}.blocks.{b}.{leaf}" for s in range(2) for b in range(2)
            for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")} == low
