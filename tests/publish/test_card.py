"""The model card: built from real checkpoints (a recovered one, a fresh one, one factorized from a Hub repo in the
offline cache), written, and read back with huggingface_hub's own ModelCard.load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import run_cli, write_lowrank_vit
from huggingface_hub import ModelCard

import lowrank_cli
from lowrank_cli.errors import InputError
from lowrank_cli.evaluation.counting import format_size
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.spec import ModelSpec
from lowrank_cli.publish.card import build_card, pipeline_tag

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_vit.safetensors"  # recovered on digits, 3 steps


def dense_and_lowrank_params(path) -> tuple[int, int]:
    """Counted here, not by lrc report: the model's parameters, and what they would be with every low-rank layer
    put back to its dense d_out x d_in weight."""
    model = lowrank_cli.load(path)
    params = sum(p.numel() for p in model.parameters())
    saved = sum(m.in_features * m.out_features - m.rank * (m.in_features + m.out_features)
                for m in model.modules() if isinstance(m, LowRankLinear))
    return params + saved, params


def saved_card(card, tmp_path) -> ModelCard:
    path = tmp_path / "README.md"
    card.card.save(path)
    return ModelCard.load(path)


def test_recovered_checkpoint_card_parses_back_with_its_numbers(tmp_path):
    card = saved_card(build_card(LEGACY, repo_id="acme/vit-digits-lr2"), tmp_path)
    data = card.data
    assert data.library_name == "lowrank-cli" and data.pipeline_tag == "image-classification"
    assert {"low-rank", "pela", "timm", "distillation"} <= set(data.tags)
    assert data.license == "apache-2.0"  # carried from the source's pretrained_cfg
    assert data.base_model is None  # the source was a local folder: no Hub id to name
    # model-index: the accuracy measured after recovery, on the recovery data's val split, in percent
    info = lowrank_cli.read_info(LEGACY)[0]
    after = info.recovery["accuracy"]["after"]
    results = {r.metric_type: r for r in data.eval_results}
    assert results["accuracy"].metric_value == round(100 * after["top1"], 2) == 3.33
    assert results["top_5_accuracy"].metric_value == round(100 * after["top5"], 2) == 60.0
    assert results["accuracy"].dataset_name == "digits" and results["accuracy"].dataset_split == "val"
    assert data.model_name == "vit-digits-lr2"
    dense, params = dense_and_lowrank_params(LEGACY)
    assert (dense, params) == (67258, 35002)  # as lrc report says (tests/data/legacy_vit.expected.json)
    assert f"| parameters | {format_size(dense)} | {format_size(params)} | {dense / params:.2f}x |" in card.text
    assert "| digits | val | original | 13.33 % | 30.00 % | 30 |" in card.text  # the teacher, before, after
    assert "| digits | val | this model | 3.33 % | 60.00 % | 30 |" in card.text
    assert "3 steps of distillation" in card.text and "kappa 2," in card.text
    assert "ranks: qkv 16, proj 8, fc1 16, fc2 16" in card.text
    assert 'lowrank_cli.load("hf-hub:acme/vit-digits-lr2")' in card.text and "arXiv:2310.10700" in card.text
    assert "/tmp/legacy" not in card.text  # local paths are never written into a public card


def test_eval_file_replaces_the_recovery_figure_for_the_same_data(tmp_path):
    evaluated = tmp_path / "eval.json"
    evaluated.write_text(json.dumps({"model": "x", "data": "/data/digits/val", "top1": 0.5, "top5": 0.9,
                                     "images": 30, "skipped": 0}))
    card = saved_card(build_card(LEGACY, evals=[evaluated]), tmp_path)
    values = sorted((r.dataset_name, r.dataset_split, r.metric_type, r.metric_value) for r in card.data.eval_results)
    assert values == [("digits", "val", "accuracy", 50.0), ("digits", "val", "top_5_accuracy", 90.0)]
    assert "| digits | val | this model (lrc eval) | 50.00 % | 90.00 % | 30 |" in card.text


def test_bench_file_of_this_checkpoint_goes_into_the_card(tmp_path, tiny_vit_folder, capsys):
    ckpt = write_lowrank_vit(tmp_path / "lr.safetensors")
    code, out, err = run_cli(["bench", ckpt, "--against", tiny_vit_folder, "--device", "cpu", "--batch-size", "1",
                              "--repeats", "3", "--min-time", "0.05", "--json"], capsys)
    assert code == 0, err
    (tmp_path / "bench.json").write_text(out)
    doc = json.loads(out)
    rows = {r["model"]: r for r in doc["rows"]}
    card = build_card(ckpt, bench=tmp_path / "bench.json")
    mine, ref = rows["lr.safetensors"], rows[doc["reference"]]
    assert (f"| 1 | this model | {mine['median_ms']:,.2f} | {mine['throughput']:,.1f} | {mine['speedup']:.2f}x |"
            in card.card.text)
    assert f"| 1 | original | {ref['median_ms']:,.2f} | {ref['throughput']:,.1f} | 1.00x |" in card.card.text
    # a bench of another model is refused, naming both parameter counts
    with pytest.raises(InputError, match=r"measured other models \(legacy_vit.safetensors: 35,002\), not this "
                                         r"checkpoint \(900,682 parameters\)"):
        code, out, _ = run_cli(["bench", LEGACY, "--device", "cpu", "--batch-size", "1", "--repeats", "3",
                                "--min-time", "0.05", "--json"], capsys)
        (tmp_path / "other.json").write_text(out)
        build_card(ckpt, bench=tmp_path / "other.json")


def test_card_of_a_text_model_from_the_hub(tmp_path, bert_folder, hub_cache):
    from lowrank_cli.compress.factorize_source import factorize_file

    readme = tmp_path / "README.md"
    readme.write_text("---\nlicense: mit\nlanguage: en\n---\n\n# tiny bert\n")
    names = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]
    hub_cache("acme/tiny-bert", {**{n: bert_folder / n for n in names}, "README.md": readme})
    out = tmp_path / "bert_lr.safetensors"
    factorize_file("hf-hub:acme/tiny-bert", str(out), kappa=2, device="cpu")
    built = build_card(out, repo_id="me/tiny-bert-lr2")
    data = built.card.data
    assert data.base_model == "acme/tiny-bert" and data.license == "mit"  # the license from the source's own card
    assert data.pipeline_tag == "text-classification" and "transformers" in data.tags and built.notes == []
    assert 'AutoTokenizer.from_pretrained("me/tiny-bert-lr2")' in built.card.text
    assert 'pip install "lowrank-cli[transformers]"' in built.card.text
    assert "MACs (64 tokens, batch 1)" in built.card.text  # counted at the model's positions, as lrc report does


def test_a_given_license_wins_over_the_sources(tmp_path):
    ckpt = write_lowrank_vit(tmp_path / "lr.safetensors")
    info = lowrank_cli.read_info(ckpt)[0]
    assert info.spec.pretrained_cfg.get("license") == "apache-2.0"
    built = build_card(ckpt, license="cc-by-4.0")
    assert built.card.data.license == "cc-by-4.0" and built.notes == []


def test_what_is_not_an_lrc_checkpoint_is_refused(tmp_path, tiny_vit_folder):
    with pytest.raises(InputError, match="is not an lrc checkpoint .*lrc factorize"):
        build_card(tiny_vit_folder / "model.safetensors")
    dense = tmp_path / "dense.safetensors"
    from helpers import make_tiny_vit

    lowrank_cli.save(make_tiny_vit(), dense)
    with pytest.raises(InputError, match="has no low-rank layers"):
        build_card(dense)
    with pytest.raises(InputError, match="'missing.safetensors' does not exist"):
        build_card("missing.safetensors")
    bad = tmp_path / "bench.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="bench .* is not valid JSON"):
        build_card(LEGACY, bench=bad)
    bad.write_text(json.dumps({"top1": 3}))
    with pytest.raises(InputError, match="evals .* is not an lrc eval --json document"):
        build_card(LEGACY, evals=[bad])


@pytest.mark.parametrize(("library", "architecture", "args", "cfg", "task"), [
    ("timm", "vit_tiny_patch16_224", {"num_classes": 10}, {"input_size": [3, 32, 32]}, "image-classification"),
    ("timm", "vit_tiny_patch16_224", {"num_classes": 0}, {"input_size": [3, 32, 32]}, "image-feature-extraction"),
    ("transformers", "BertModel", {"model_type": "bert"}, {}, "feature-extraction"),
    ("transformers", "BertForMaskedLM", {"model_type": "bert"}, {}, "fill-mask"),
    ("transformers", "ViTModel", {"model_type": "vit"}, {"input_size": [3, 224, 224]}, "image-feature-extraction"),
    ("transformers", "ViTForImageClassification", {"model_type": "vit"}, {"input_size": [3, 224, 224]},
     "image-classification"),
])
def test_pipeline_tags(library, architecture, args, cfg, task):
    assert pipeline_tag(ModelSpec(architecture, args, cfg, library=library)) == task
