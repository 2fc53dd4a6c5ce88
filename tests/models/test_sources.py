"""Every MODEL source goes through the real loader; the Hub only through a local cache with HF_HUB_OFFLINE=1."""

import os

import pytest
import torch
from helpers import make_tiny_vit
from safetensors.torch import save_file

from lowrank_cli.errors import InputError, UsageError
from lowrank_cli.models.sources import load_model, parse_model_args
from lowrank_cli.models.timm_names import resolve_timm_name


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_local_folder_with_and_without_prefix(tiny_vit_folder):
    ref = make_tiny_vit()
    for source in (f"local-dir:{tiny_vit_folder}", str(tiny_vit_folder)):
        loaded = load_model(source)
        assert same_weights(loaded.model, ref)
        assert loaded.spec.architecture == "vit_tiny_patch16_224"
        assert loaded.spec.model_args["num_classes"] == 10
        assert loaded.source["kind"] == "local-dir" and len(loaded.source["sha256"]) == 64
        assert tuple(loaded.model.pretrained_cfg["input_size"]) == (3, 32, 32)


def test_hub_repo_from_the_cache_offline(tiny_vit_folder, hub_cache):
    commit = hub_cache("acme/tiny-vit", {"config.json": tiny_vit_folder / "config.json",
                                         "model.safetensors": tiny_vit_folder / "model.safetensors"})
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    loaded = load_model("hf-hub:acme/tiny-vit")
    assert same_weights(loaded.model, make_tiny_vit())
    assert loaded.source == {"kind": "hf-hub", "id": "acme/tiny-vit", "revision": commit}
    with pytest.raises(InputError, match=r"not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("hf-hub:acme/other-vit")
    with pytest.raises(InputError, match="not in the Hugging Face cache"):
        load_model("hf-hub:acme/tiny-vit", revision="v2")


def test_timm_name_resolves_and_loads_from_its_hub_repo(hub_cache, tmp_path, capsys):
    import timm

    torch.manual_seed(1)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    weights = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(weights))
    hub_cache("timm/deit_tiny_patch16_224.fb_in1k", {"model.safetensors": weights})
    chosen = []
    loaded = load_model("deit_tiny", log=chosen.append)
    assert chosen == ["deit_tiny -> deit_tiny_patch16_224.fb_in1k"]
    assert same_weights(loaded.model, model)
    assert loaded.source["id"] == "deit_tiny_patch16_224.fb_in1k"
    assert loaded.spec.pretrained_cfg["mean"] == [0.485, 0.456, 0.406]


def test_short_names():
    assert resolve_timm_name("deit_base") == "deit_base_patch16_224.fb_in1k"
    assert resolve_timm_name("deit_small") == "deit_small_patch16_224.fb_in1k"
    assert resolve_timm_name("deit_base_patch16_224") == "deit_base_patch16_224.fb_in1k"
    assert resolve_timm_name("deit_base_patch16_384.fb_in1k") == "deit_base_patch16_384.fb_in1k"
    with pytest.raises(InputError, match="ambiguous.*vit_base_patch16_224.*vit_base_patch32_224"):
        resolve_timm_name("vit_base")
    with pytest.raises(InputError, match="closest timm names: deit_base"):
        resolve_timm_name("deit_bse")
    with pytest.raises(InputError, match="deit_base_patch16_224 has: deit_base_patch16_224.fb_in1k"):
        resolve_timm_name("deit_base_patch16_224.nope")


def test_strings_that_are_neither_path_nor_name():
    # org/repo is read as a Hub repo; offline and not cached, both readings are named
    with pytest.raises(InputError, match="'acme/model' is not a file or folder here.*not in the Hugging Face cache"):
        load_model("acme/model")
    with pytest.raises(InputError, match="'missing.safetensors' does not exist"):
        load_model("missing.safetensors")


def test_bare_weights_files(tmp_path):
    ref = make_tiny_vit()
    args = {"img_size": 32, "patch_size": 8, "num_classes": 10, "depth": 4}
    sd = ref.state_dict()
    files = {
        "w.safetensors": lambda p: save_file(sd, str(p)),
        "w.pth": lambda p: torch.save(sd, p),
        "wrapped.pt": lambda p: torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, p),
        "model_key.bin": lambda p: torch.save({"model": sd}, p),
    }
    for name, write in files.items():
        write(tmp_path / name)
        loaded = load_model(str(tmp_path / name), arch="vit_tiny_patch16_224", model_args=args)
        assert same_weights(loaded.model, ref), name
        assert loaded.source["kind"] == "file" and loaded.source["arch"] == "vit_tiny_patch16_224"
        assert tuple(loaded.model.pretrained_cfg["input_size"]) == (3, 32, 32)
    with pytest.raises(UsageError, match="arch NAME"):
        load_model(str(tmp_path / "w.pth"))
    with pytest.raises(InputError, match=r"do not fit the architecture: 2 shape mismatch\(es\) \(file vs model: head.weight \(10, 192\) vs \(1000, 192\)"):
        load_model(str(tmp_path / "w.pth"), arch="vit_tiny_patch16_224", model_args={"img_size": 32, "patch_size": 8, "depth": 4})
    with pytest.raises(InputError, match=r"12 missing key\(s\) \(blocks.4.norm1.weight"):
        load_model(str(tmp_path / "w.pth"), arch="vit_tiny_patch16_224", model_args={**args, "depth": 5})
    with pytest.raises(InputError, match="not a timm architecture"):
        load_model(str(tmp_path / "w.pth"), arch="vit_tinyy")


class Payload:
    pass


def test_pickles_are_never_unpickled(tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "obj": Payload()}, evil)
    with pytest.raises(InputError, match="pickled Python objects, which lrc never unpickles"):
        load_model(str(evil), arch="vit_tiny_patch16_224")
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"\x80\x04 not a torch file")
    with pytest.raises(InputError, match="not a readable PyTorch weights file"):
        load_model(str(broken), arch="vit_tiny_patch16_224")


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
    with pytest.raises(UsageError, match="library timm, but .* is a transformers config"):
        load_model(str(tmp_path), library="timm")
    with pytest.raises(InputError, match="cannot load the weights of"):
        load_model(str(tmp_path))  # a transformers folder without its weights
    with pytest.raises(InputError, match="is not a folder"):
        load_model(f"local-dir:{tmp_path / 'nope'}")


def test_model_args():
    assert parse_model_args(["num_classes=10", "drop_rate=0.1", "global_pool=avg", "img_size=[32, 32]"]) == {
        "num_classes": 10, "drop_rate": 0.1, "global_pool": "avg", "img_size": [32, 32]}
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_model_args(["num_classes"])
