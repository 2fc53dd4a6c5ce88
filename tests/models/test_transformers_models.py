"""Hugging Face transformers models (issue 7): tiny BERT and ViT built here, saved with save_pretrained, loaded by
path or from an offline Hub cache, through every command: factorize, report, recover on text, save / load."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from helpers import error_lines, read_json, run_cli
from hf_fixtures import (
    corpus_sentences,
    write_corpus,
    write_sentence_transformers,
    write_tiny_bert,
    write_tiny_vit,
)
from torch import nn

import lowrank_cli
from lowrank_cli.compress.plan import LayerPlan, Plan, pela_rank
from lowrank_cli.errors import EnvironmentProblem, InputError, Interrupted, UsageError
from lowrank_cli.layers.lowrank_linear import LowRankLinear
from lowrank_cli.models.sources import load_model

transformers = pytest.importorskip("transformers")

ENCODER_LINEARS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "output.dense")


@pytest.fixture(scope="module")
def mlm_folder(tmp_path_factory):
    # No dropout, and weights large enough that the layers matter: the distillation losses then measure the
    # factorization error alone.
    return write_tiny_bert(tmp_path_factory.mktemp("mlm") / "tiny-mlm", head="masked-lm", seed=1, dropout=0.0,
                           initializer_range=0.2)


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return write_tiny_vit(tmp_path_factory.mktemp("vit") / "tiny-vit", image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("text") / "corpus.txt", n=96)


def token_batch(seed: int = 0, batch: int = 4, length: int = 12) -> torch.Tensor:
    from hf_fixtures import vocab_size

    return torch.randint(5, vocab_size(), (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- loading


def test_bert_folder_loads_as_its_transformers_class(bert_folder):
    loaded = load_model(str(bert_folder))
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.spec.library == "transformers" and loaded.spec.architecture == "BertForSequenceClassification"
    assert loaded.spec.model_args["model_type"] == "bert" and loaded.source["kind"] == "local-dir"
    reference = transformers.BertForSequenceClassification.from_pretrained(str(bert_folder)).eval()
    x = token_batch()
    assert torch.equal(loaded.model(x).logits, reference(x).logits)
    assert not loaded.model.training
    # --arch picks another class of the same weights: the encoder alone
    encoder = load_model(str(bert_folder), arch="BertModel").model
    assert type(encoder).__name__ == "BertModel"
    with pytest.raises(InputError, match="arch 'NoSuchModel' is not a transformers model class"):
        load_model(str(bert_folder), arch="NoSuchModel")
    with pytest.raises(UsageError, match="model_args is for timm models"):
        load_model(str(bert_folder), model_args={"num_classes": 3})


def test_corrupt_weights_in_a_transformers_folder(bert_folder, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((bert_folder / "config.json").read_bytes())
    (broken / "model.safetensors").write_bytes((bert_folder / "model.safetensors").read_bytes()[:3000])
    code, _, err = run_cli(["factorize", broken, "--kappa", "2", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 3 and len(error_lines(err)) == 1
    assert "model.safetensors" in err and "truncated" in err  # streaming factorize reads the header itself
    assert not (tmp_path / "x.safetensors").exists()


def test_library_detection_and_override(bert_folder, tiny_vit_folder):
    assert load_model(f"local-dir:{bert_folder}", library="transformers").spec.library == "transformers"
    assert load_model(str(tiny_vit_folder)).spec.library == "timm"  # timm's own layout stays timm
    with pytest.raises(UsageError, match="library timm, but .* is a transformers config"):
        load_model(str(bert_folder), library="timm")
    with pytest.raises(UsageError, match="library transformers, but .* is a timm config"):
        load_model(str(tiny_vit_folder), library="transformers")
    with pytest.raises(UsageError, match="library 'keras' is not one of auto, timm, transformers"):
        load_model(str(bert_folder), library="keras")


def test_missing_extra_is_one_clear_error(bert_folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra looks like
    with pytest.raises(EnvironmentProblem, match=r"transformers is not installed: pip install 'lowrank-cli\[transformers\]'"):
        load_model(str(bert_folder))


def test_hub_repos_from_the_offline_cache(bert_folder, hub_cache):
    files = {p.name: p for p in bert_folder.iterdir()}
    commit = hub_cache("acme/tiny-bert", files)
    via_prefix = load_model("hf-hub:acme/tiny-bert")
    assert via_prefix.source == {"kind": "hf-hub", "id": "acme/tiny-bert", "revision": commit}
    via_id = load_model("acme/tiny-bert")  # a repo id with a slash needs no prefix
    x = token_batch(1)
    assert torch.equal(via_prefix.model(x).logits, via_id.model(x).logits)
    hub_cache("tiny-bert-uncased", files)  # a legacy id without an organisation, like bert-base-uncased
    assert type(load_model("tiny-bert-uncased").model).__name__ == "BertForSequenceClassification"
    with pytest.raises(InputError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_model("hf-hub:acme/not-cached")
    # the tokenizer files of a Hub source come from the same cache
    from lowrank_cli.models.hub import tokenizer_folder

    assert (tokenizer_folder(via_id) / "tokenizer.json").is_file()
    hub_cache("acme/no-tokenizer", {"config.json": bert_folder / "config.json",
                                    "model.safetensors": bert_folder / "model.safetensors"})
    with pytest.raises(InputError, match="hf-hub:acme/no-tokenizer has no tokenizer files"):
        tokenizer_folder(load_model("acme/no-tokenizer"))
    with pytest.raises(InputError, match="'bert-bsae-uncasd' is not a file, a folder or a timm model name"):
        load_model("bert-bsae-uncasd")  # neither a timm name nor a cached repo: the timm hint stays useful


def test_sentence_transformers_folder(tmp_path, capsys):
    folder = write_sentence_transformers(tmp_path / "st-model")
    loaded = load_model(str(folder))
    assert type(loaded.model).__name__ == "BertModel"  # the plain transformers model at the folder's root
    out = tmp_path / "st_lr.safetensors"
    code, stdout, err = run_cli(["factorize", folder, "--kappa", "2", "--rank-multiple", "1", "--save-tokenizer",
                                 tmp_path / "tok", "-o", out, "--json"], capsys)
    assert code == 0, err
    summary = read_json(stdout)
    assert summary["factorized"] == 12 and "tokenizer.json" in summary["tokenizer"]["files"]
    from lowrank_cli.data.texts import load_tokenizer

    original, copied = load_tokenizer(folder), load_tokenizer(tmp_path / "tok")
    text = corpus_sentences(3)
    assert original(text)["input_ids"] == copied(text)["input_ids"]
    assert type(lowrank_cli.load(out)).__name__ == "BertModel"


# ---------------------------------------------------------------------------------------------- factorize


def test_full_rank_reproduces_the_outputs(bert_folder):
    model = load_model(str(bert_folder)).model
    x = token_batch(2)
    with torch.no_grad():
        before = model(x).logits
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n]
    plan = Plan([LayerPlan(n, model.get_submodule(n).in_features, model.get_submodule(n).out_features,
                           min(model.get_submodule(n).in_features, model.get_submodule(n).out_features), "full")
                 for n in names])
    lowrank_cli.factorize(model, plan=plan, rank_multiple=1)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == len(names) == 12
    with torch.no_grad():
        after = model(x).logits
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()


def test_kappa_2_targets_the_encoder_layers_with_exact_shapes_and_counts(bert_folder):
    model = load_model(str(bert_folder)).model
    dense = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    before = sum(p.numel() for p in model.parameters())
    result = lowrank_cli.factorize(model, kappa=2, rank_multiple=1)
    expected = {f"bert.encoder.layer.{i}.{suffix}" for i in range(2) for suffix in ENCODER_LINEARS}
    assert set(result.plan.ranks) == expected  # embeddings, pooler and classifier stay dense
    assert isinstance(model.bert.pooler.dense, nn.Linear) and isinstance(model.classifier, nn.Linear)
    saved = 0
    for name in expected:
        d_in, d_out = dense[name]
        rank = pela_rank(d_in, d_out, 2)
        layer = model.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        assert tuple(layer.first.weight.shape) == (rank, d_in) and tuple(layer.second.weight.shape) == (d_out, rank)
        saved += d_in * d_out - rank * (d_in + d_out)
    assert sum(p.numel() for p in model.parameters()) == before - saved
    assert result.params_before == before and result.params_after == before - saved
    # --include / --exclude work on transformers names as on timm ones
    other = load_model(str(bert_folder)).model
    chosen = lowrank_cli.factorize(other, kappa=2, rank_multiple=1, exclude=[r".*\.attention\..*"])
    assert set(chosen.plan.ranks) == {n for n in expected if ".attention." not in n}


def test_save_load_rebuilds_the_transformers_model_from_the_file_alone(mlm_folder, tmp_path):
    model = load_model(str(mlm_folder)).model
    lowrank_cli.factorize(model, kappa=2, rank_multiple=1)
    path = lowrank_cli.save(model, tmp_path / "mlm_lr.safetensors")
    info, _ = lowrank_cli.read_info(path)
    assert info.spec.library == "transformers" and info.spec.architecture == "BertForMaskedLM"
    assert info.spec.model_args["hidden_size"] == 32 and info.spec.model_args["model_type"] == "bert"
    loaded = lowrank_cli.load(path)
    assert type(loaded).__name__ == "BertForMaskedLM" and not loaded.training
    # The decoder and the word embeddings are one tensor again (the file holds it twice).
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    x = token_batch(3)
    with torch.no_grad():
        # Grouped q/k/v (the default) is one GEMM over the stacked first factors: the same sums in another
        # order; ungrouped, the rebuilt model is bit for bit the one saved.
        assert torch.allclose(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(lowrank_cli.load(path, group=False)(x).logits, model(x).logits)
    # A timm-style model without lrc metadata from a transformers model: lowrank_cli.save describes it too.
    dense = load_model(str(mlm_folder)).model
    again = lowrank_cli.load(lowrank_cli.save(dense, tmp_path / "dense.safetensors"))
    with torch.no_grad():
        assert torch.equal(again(x).logits, dense(x).logits)


def test_report_macs_match_an_independent_count(bert_folder, tmp_path, capsys):
    out = tmp_path / "bert_lr.safetensors"
    assert run_cli(["factorize", bert_folder, "--kappa", "2", "--rank-multiple", "1", "-o", out], capsys)[0] == 0
    code, stdout, err = run_cli(["report", out, "--seq-len", "16", "--json"], capsys)
    assert code == 0, err
    doc = read_json(stdout)
    assert doc["model"]["library"] == "transformers" and doc["model"]["input_size"] == [16]
    model = lowrank_cli.load(out)
    tokens, hidden, layers = 16, 32, 2

    def linear_macs(module, n_tokens):
        return n_tokens * module.in_features * module.out_features

    encoder = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".encoder.layer." in n:
            encoder += linear_macs(m, tokens)
    heads = linear_macs(model.bert.pooler.dense, 1) + linear_macs(model.classifier, 1)  # the [CLS] token only
    attention = layers * tokens * tokens * 2 * hidden  # Q K^T and attn V over all heads
    norms = 5 * tokens * hidden * (1 + 2 * layers)  # fvcore's 5 per element of an affine layer norm
    assert doc["macs"]["total"] == encoder + heads + attention + norms
    assert doc["macs"]["uncounted"] == {}
    assert doc["params"]["total"] == sum(p.numel() for p in model.parameters())
    # the default is 128 tokens, capped by the model's 64 positions
    assert read_json(run_cli(["report", out, "--json"], capsys)[1])["model"]["input_size"] == [64]
    code, _, err = run_cli(["report", out, "--seq-len", "100"], capsys)
    assert code == 2 and error_lines(err) == ["Error: --seq-len 100 is above the 64 positions the model has: lower it"]
    code, _, err = run_cli(["report", out, "--input-size", "3,32,32"], capsys)
    assert code == 2 and "a text model takes --seq-len N" in error_lines(err)[0]


# ---------------------------------------------------------------------------------------------- vision


def test_transformers_vit_folder_through_factorize_report_and_eval(vit_folder, tmp_path, capsys):
    loaded = load_model(str(vit_folder))
    assert type(loaded.model).__name__ == "ViTForImageClassification"
    assert loaded.spec.pretrained_cfg["input_size"] == [3, 32, 32]
    assert loaded.spec.pretrained_cfg["mean"] == [0.5, 0.5, 0.5]  # from preprocessor_config.json
    out = tmp_path / "vit_lr.safetensors"
    code, stdout, err = run_cli(["factorize", vit_folder, "--kappa", "2", "--rank-multiple", "1", "-o", out, "--json"],
                                capsys)
    assert code == 0, err
    ranks = read_json(stdout)["ranks_by_group"]
    assert set(ranks) == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = lowrank_cli.load(out)
    with torch.no_grad():
        again = lowrank_cli.load(out)(x).logits
        assert torch.equal(model(x).logits, again)
    doc = read_json(run_cli(["report", out, "--json"], capsys)[1])
    assert doc["model"]["input_size"] == [3, 32, 32] and doc["macs"]["uncounted"] == {}
    patches = (32 // 8) ** 2 + 1
    linears = sum(patches * m.in_features * m.out_features for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and ".layers." in n)
    assert doc["macs"]["by_operator"]["linear"] == linears + 32 * 10  # the head sees the [CLS] token
    # a model built outside lrc (from_pretrained in a notebook) is described from its own config: 32 px, not 224
    direct = transformers.ViTForImageClassification.from_pretrained(str(vit_folder)).eval()
    lowrank_cli.factorize(direct, kappa=2, rank_multiple=1)
    info, _ = lowrank_cli.read_info(lowrank_cli.save(direct, tmp_path / "direct.safetensors"))
    assert info.spec.library == "transformers" and info.spec.pretrained_cfg["input_size"] == [3, 32, 32]
    # lrc eval uses the processor's normalisation through timm.data and the model's logits
    from digits import write_digits_imagefolder

    images = write_digits_imagefolder(tmp_path / "digits", max_per_class=4)
    code, stdout, err = run_cli(["eval", out, "--data", images, "--json", "--workers", "0"], capsys)
    assert code == 0, err
    result = read_json(stdout)
    assert result["images"] == 10 and 0.0 <= result["top1"] <= result["top5"] <= 1.0


# ---------------------------------------------------------------------------------------------- text data


def test_data_aware_factorization_on_text(mlm_folder, corpus, tmp_path):
    def hidden_error(model, reference, texts):
        from lowrank_cli.data.texts import TextCollate, load_tokenizer

        batch = TextCollate(load_tokenizer(mlm_folder), 64)(texts)
        with torch.no_grad():
            out = model.bert(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            ref = reference.bert(batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        mask = batch.attention_mask.bool()
        return ((out - ref)[mask].norm() / ref[mask].norm()).item()

    reference = load_model(str(mlm_folder)).model
    plain = load_model(str(mlm_folder)).model
    lowrank_cli.factorize(plain, kappa=3, rank_multiple=1)
    aware = load_model(str(mlm_folder)).model
    result = lowrank_cli.factorize(aware, kappa=3, rank_multiple=1, calib=str(corpus), calib_samples=64,
                                   tokenizer=str(mlm_folder))
    assert result.extra["calibration"]["samples"] == 64
    held_out = corpus_sentences(32, seed=7)
    assert hidden_error(aware, reference, held_out) < hidden_error(plain, reference, held_out)
    with pytest.raises(UsageError, match="needs its tokenizer"):
        lowrank_cli.factorize(load_model(str(mlm_folder)).model, kappa=3, rank_multiple=1, calib=str(corpus))


def hidden_state_error(model, teacher, tokenizer_folder, texts) -> float:
    """Mean over layers of the MSE between the hidden states of `model` and `teacher` on the real tokens."""
    from lowrank_cli.data.texts import TextCollate, load_tokenizer

    batch = TextCollate(load_tokenizer(tokenizer_folder), 64)(texts)
    with torch.no_grad():
        ours = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
        ref = teacher(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True).hidden_states
    mask = batch.attention_mask.bool()
    return sum(((a - b)[mask] ** 2).mean().item() for a, b in zip(ours[1:], ref[1:])) / (len(ref) - 1)


def _recover(student, teacher, data, out, **kw):
    options = dict(steps=8, batch_size=8, lr=5e-3, save_every=3, log_every=1, seed=0, device="cpu",
                   warn=lambda msg: None)
    options.update(kw)
    return lowrank_cli.recover(str(student), str(teacher), str(data), output=out, **options)


def test_recover_on_text_lowers_the_hidden_state_loss_and_resumes(mlm_folder, corpus, tmp_path, one_thread):
    student = tmp_path / "mlm_lr.safetensors"
    model = load_model(str(mlm_folder)).model
    lowrank_cli.factorize(model, kappa=4, rank_multiple=1)
    lowrank_cli.save(model, student)

    whole = _recover(student, mlm_folder, corpus, tmp_path / "whole.safetensors", gamma=1.0, delta=1.0)
    assert set(whole.losses) == {"loss", "fd", "kd", "pool"}
    assert whole.losses["fd"]["last"] < 0.8 * whole.losses["fd"]["first"], whole.losses["fd"]
    held_out, teacher = corpus_sentences(32, seed=7), load_model(str(mlm_folder)).model
    before = hidden_state_error(lowrank_cli.load(student), teacher, mlm_folder, held_out)
    after = hidden_state_error(whole.model, teacher, mlm_folder, held_out)
    assert after < 0.8 * before, (before, after)
    assert whole.settings["data_kind"] == "text" and whole.settings["max_length"] == 64
    assert whole.accuracy == {"teacher": None, "before": None, "after": None}
    info, _ = lowrank_cli.read_info(whole.output)
    assert info.recovery["data_kind"] == "text" and info.spec.library == "transformers"

    out = tmp_path / "parts.safetensors"
    with pytest.raises(Interrupted, match="interrupted by request at step 4/8"):
        _recover(student, mlm_folder, corpus, out, gamma=1.0, delta=1.0, on_step=lambda step, m: step == 4)
    resumed = _recover(student, mlm_folder, corpus, out, gamma=1.0, delta=1.0, resume=True)
    assert resumed.resumed_from == 4
    from safetensors.torch import load_file

    a, b = load_file(str(whole.output)), load_file(str(out))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_text_recovery_is_scored_on_held_out_texts(mlm_folder, corpus, tmp_path, one_thread):
    """A quarter of the texts held out: the distillation loss and the pooled-output cosine before and after, every
    4 steps in the metrics, and the best state kept."""
    student = tmp_path / "mlm_lr.safetensors"
    model = load_model(str(mlm_folder)).model
    lowrank_cli.factorize(model, kappa=4, rank_multiple=1)
    lowrank_cli.save(model, student)
    result = _recover(student, mlm_folder, corpus, tmp_path / "r.safetensors", val_fraction=0.25, eval_every=4,
                      delta=1.0)
    held = result.settings["held_out"]
    assert held["samples"] == 24 and held["metric"] == "val_cosine" and result.settings["train_images"] == 72
    before, after = held["before"], held["after"]
    assert after["val_loss"] < before["val_loss"] and after["val_cosine"] > before["val_cosine"]
    assert 0 < before["val_cosine"] < 1
    lines = [json.loads(line) for line in result.metrics.read_text().splitlines()]
    assert [line["step"] for line in lines if "val_cosine" in line] == [4, 8]
    assert result.settings["kept"]["metric"] == "val_cosine"


def test_text_recovery_errors(mlm_folder, bert_folder, corpus, tmp_path, tiny_vit_folder, capsys):
    encoder_folder = write_tiny_bert(tmp_path / "encoder", head=None)
    student = tmp_path / "enc_lr.safetensors"
    assert run_cli(["factorize", encoder_folder, "--kappa", "2", "--rank-multiple", "1", "-o", student], capsys)[0] == 0
    # a model without a head has no logits to distil
    code, _, err = run_cli(["recover", student, "--teacher", encoder_folder, "--data", corpus, "--steps", "2",
                            "--gamma", "1", "-o", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "has no head" in error_lines(err)[0]
    # the pooled output of an encoder is its pooler's
    code, stdout, err = run_cli(["recover", student, "--teacher", encoder_folder, "--data", corpus, "--steps", "2",
                                 "--batch-size", "8", "--alpha", "0", "--delta", "1", "-o", tmp_path / "p.safetensors",
                                 "--json"], capsys)
    assert code == 0, err
    assert set(read_json(stdout)["losses"]) == {"loss", "pool"}
    # texts for an image model, and an empty text file
    vit_student = tmp_path / "vit_lr.safetensors"
    assert run_cli(["factorize", tiny_vit_folder, "--kappa", "2", "-o", vit_student], capsys)[0] == 0
    code, _, err = run_cli(["recover", vit_student, "--teacher", tiny_vit_folder, "--data", corpus, "--steps", "2",
                            "-o", tmp_path / "y.safetensors"], capsys)
    assert code == 2 and "holds texts but the teacher" in error_lines(err)[0]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(["recover", student, "--teacher", encoder_folder, "--data", empty, "--steps", "2",
                            "-o", tmp_path / "z.safetensors"], capsys)
    assert code == 3 and len(error_lines(err)) == 1
    assert not (tmp_path / "z.safetensors").exists()
    # more tokens than the model has positions
    code, _, err = run_cli(["recover", student, "--teacher", encoder_folder, "--data", corpus, "--steps", "2",
                            "--max-length", "100", "-o", tmp_path / "m.safetensors"], capsys)
    assert code == 2 and error_lines(err) == [
        "Error: --max-length 100 is above the 64 tokens the model's positions allow: lower it"]
    code, _, err = run_cli(["recover", student, "--teacher", encoder_folder, "--data", tmp_path / "missing.txt",
                            "--steps", "2", "-o", tmp_path / "z.safetensors"], capsys)
    assert code == 3 and "missing.txt" in error_lines(err)[0] and "image" not in error_lines(err)[0]
    # lrc eval is for labelled images
    code, _, err = run_cli(["eval", student, "--data", tmp_path], capsys)
    assert code != 0 and len(error_lines(err)) == 1
